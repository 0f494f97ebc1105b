"""The server split into processes over PostgreSQL, for populations one process cannot serve.

Roles: *selectors* (stateless HTTP replicas: check-ins, model downloads, uploads validated and
pre-summed where they arrive), the *coordinator* (slot quotas per selector, lease expiry, task to
aggregator assignment) and *aggregators* (each owns some tasks' models: folds selectors' partial
sums, steps, publishes versions). All shared state lives in PostgreSQL (`migrations/`); the
single-process server (`asyncfl.server`) keeps SQLite. See docs/deploy.md.
"""
