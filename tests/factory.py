"""Tiny checkpoints in the exact official file layout, for every loader test.

Real weights cannot be downloaded here, so tests write small random models
with the official key names, shard naming, index json and config.json, and
load them through the same loaders that read the released files.  The writers
live in :mod:`stepvideo_core.tiny` (the CLI's smoke checks use them too).
"""

from stepvideo_core.tiny import (DIT_WEIGHTS, TINY_DIT_CONFIG, dit_config_json, random_state_dict,  # noqa: F401
                                 tiny_dit_state_dict, write_dit_checkpoint, write_sharded, write_tiny_dit)
