"""The package version, in a module of its own so that the modules that
report it (the Hub client's user agent) need not import the package's
public API, which imports them."""

__version__ = '0.1.0'
