"""Algorithm definitions (`registry`), one module per algorithm.

Each algorithm module builds its `algorithm:` config class on the configuration's schema pieces
(`asyncfl.config.base`, `training`, ...), which never import the registry back; the run schema
(`asyncfl.config.experiment`) is built from the registry.
"""
