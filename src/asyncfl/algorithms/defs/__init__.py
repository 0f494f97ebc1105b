"""Algorithm definitions (`registry`), one module per algorithm.

The configuration schema is loaded first: it builds the `algorithm:` section from the registry,
which imports every algorithm module, so each of them sees a complete schema to build on.
"""

import asyncfl.config  # noqa: F401
