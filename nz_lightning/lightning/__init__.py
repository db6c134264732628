"""The Lightning layer: the ``neuzip`` / ``lomo`` strategies, optimizer translation to fused optimizers, callbacks
and checkpoint IO. Importing it registers the strategies with Lightning's ``StrategyRegistry``."""

from nz_lightning.lightning import strategy as _strategy  # noqa: F401  (registers "neuzip" and "lomo")
