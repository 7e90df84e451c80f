"""Training: the train state and pure step functions, optimizer, sharding over the mesh, config checks and loading, evaluations, metric reporting, the workdir lock.
"""
