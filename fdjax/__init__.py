"""fdjax: a JAX training framework for facial dynamics research.

The package is a set of pure functions over pytrees: configs (`fdjax.config`), the device mesh
(`fdjax.sharding`), the train state and steps (`fdjax.state`, `fdjax.step`), the loop
(`fdjax.trainer`), checkpoints (`fdjax.checkpoint`), export (`fdjax.export`), metrics, models
and task families. See docs/design.md for how they fit together.
"""

__version__ = "0.1.0"
