"""The Lightning layer: the ``neuzip`` / ``lomo`` strategies (one device or data parallel), ``neuzip_fsdp`` /
``lomo_fsdp`` (FSDP2 shards), optimizer translation to fused optimizers, callbacks and checkpoint IO. Importing it
registers the strategies with Lightning's ``StrategyRegistry``."""

from nz_lightning.lightning import fsdp_strategy as _fsdp_strategy  # noqa: F401  ("neuzip_fsdp", "lomo_fsdp")
from nz_lightning.lightning import strategy as _strategy  # noqa: F401  (registers "neuzip" and "lomo")
