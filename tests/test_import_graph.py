"""The package's imports go one way: no cycles, no library -> program edge.

The graph is read from the source with `ast` (every `import` and `from ...
import` statement, including those inside functions: an import deferred to
call time is still a dependency), not by importing anything, so a cycle
that happens to work through import order is still found. `from mixer_jax.x
import y` is an edge to the module `mixer_jax.x.y` when that is a module,
else to `mixer_jax.x`.
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'mixer_jax'
# The command-line programs (`python -m mixer_jax.NAME`): shells over the
# library, which must never import them.
PROGRAMS = {f'{PACKAGE}.{name}' for name in (
    'train', 'evaluate', 'predict', 'fewshot', 'export', 'benchmark',
    'visualize')}


def package_modules():
  """{dotted module name: file path} of every module of the package."""
  modules = {}
  for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        modules[dotted.removesuffix('.__init__')] = path
  return modules


def imported_names(path):
  """Dotted names a file imports (absolute imports only)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f'{path}: relative import'
      for alias in node.names:
        yield f'{node.module}.{alias.name}'


def import_graph():
  """{module: set of package modules it imports}."""
  modules = package_modules()
  graph = {}
  for module, path in modules.items():
    targets = set()
    for name in imported_names(path):
      if name.split('.')[0] != PACKAGE:
        continue
      while name not in modules:  # `from pkg.mod import function`.
        name = name.rpartition('.')[0]
      if name != module:
        targets.add(name)
    graph[module] = targets
  return graph


def find_cycle(graph):
  """One cycle of `graph` as a list of nodes, or None."""
  state = {}  # node -> 'open' while on the path, 'done' after.
  path = []

  def visit(node):
    state[node] = 'open'
    path.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 'open':
        return path[path.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    path.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def subpackage_of(module):
  """'training' for mixer_jax.training.x; top-level modules are their own."""
  parts = module.split('.')
  if len(parts) == 1:
    return '(package API)'  # mixer_jax/__init__.py
  directory = os.path.join(ROOT, *parts[:2])
  return parts[1] if os.path.isdir(directory) else module


def subpackage_graph(graph):
  edges = {}
  for module, targets in graph.items():
    source = subpackage_of(module)
    edges.setdefault(source, set()).update(
        subpackage_of(t) for t in targets if subpackage_of(t) != source)
  return edges


def test_the_cycle_finder_finds_a_cycle():
  # Its own oracle: a hand-made graph with one cycle and one without.
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [
      'a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_the_graph_sees_deferred_and_from_imports():
  graph = import_graph()
  assert f'{PACKAGE}.models' in graph[f'{PACKAGE}.training.train_steps']
  # A program's import inside a function (not at the top) is an edge too.
  assert f'{PACKAGE}.weights.any_checkpoint' in graph[f'{PACKAGE}.fewshot']
  assert set(PROGRAMS) <= set(graph)


def test_no_module_imports_itself_through_others():
  cycle = find_cycle(import_graph())
  assert cycle is None, ' -> '.join(cycle)


def test_no_subpackage_cycle():
  # training, weights, data, checkpointing and the top-level modules: a
  # dependency between two of them goes one way only.
  cycle = find_cycle(subpackage_graph(import_graph()))
  assert cycle is None, ' -> '.join(cycle)


def test_the_library_never_imports_a_program():
  edges = [(module, target) for module, targets in import_graph().items()
           for target in targets
           if target in PROGRAMS and module not in PROGRAMS]
  assert not edges, edges
  # Programs import the library, not each other.
  between = [(module, target) for module, targets in import_graph().items()
             for target in targets if target in PROGRAMS and module in PROGRAMS]
  assert not between, between


def test_the_package_never_imports_the_repository_configs():
  offenders = sorted(
      (module, name) for module, path in package_modules().items()
      for name in imported_names(path) if name.split('.')[0] == 'configs')
  assert not offenders, offenders


def test_no_file_edits_sys_path():
  pattern = re.compile(r'sys\.path\s*(\.(insert|append|extend)|\+=|=|\[)')
  offenders = []
  for directory in (PACKAGE, 'configs', 'tests', 'notebooks'):
    for folder, _, files in os.walk(os.path.join(ROOT, directory)):
      for name in files:
        if name.endswith(('.py', '.ipynb')) and name != os.path.basename(
            __file__):
          path = os.path.join(folder, name)
          with open(path, encoding='utf-8') as f:
            if pattern.search(f.read()):
              offenders.append(os.path.relpath(path, ROOT))
  offenders += [name for name in ('setup.py',) if pattern.search(
      open(os.path.join(ROOT, name), encoding='utf-8').read())]
  assert not offenders, offenders
