"""Process entry points: `kubetrain`, the per-stage CLI, Katib trials and torchrun ranks.

Every entry point imports this package first, so it sets what must be set before
pyarrow loads: Arrow's allocator (`kubetrain.core.memory.ARROW_POOL`), which Arrow's
C++ side (the Parquet reader) only takes from the environment. The images set it
too; a value already in the environment wins.
"""

import os

from kubetrain.core.memory import ARROW_POOL

for _name, _value in ARROW_POOL.items():
    os.environ.setdefault(_name, _value)
