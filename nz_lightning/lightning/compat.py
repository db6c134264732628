"""The private Lightning names the Lightning layer relies on, imported in one place and checked against drift.

Lightning keeps these out of its public API, so any release may rename or remove them. The layer
(``strategy.py``, ``replica.py``, ``checkpoint_io.py``, ``optimizer_bridge.py``) imports them from here only;
``tests/lightning/test_compat.py`` checks that each exists in the installed Lightning and that the installed version
is inside :data:`LIGHTNING_TESTED` (the range pinned in ``pyproject.toml``). A missing symbol fails at import with
an :class:`ImportError` naming it, the installed Lightning version and the tested range.

Private symbols (imported here, :data:`PRIVATE_SYMBOLS`):

* ``lightning.fabric.utilities.types._DEVICE``: the device type (``torch.device | str | int``) of the strategies'
  ``device`` argument, the same annotation as ``SingleDeviceStrategy`` (``strategy.py``, ``replica.py``).
* ``lightning.fabric.utilities.types._PATH``: the path type (``str | Path``) of ``save_checkpoint`` and
  ``atomic_save``, matching ``CheckpointIO``'s signatures (``strategy_checkpoint.py``, ``checkpoint_io.py``).
* ``lightning.fabric.utilities.optimizer._optimizers_to_device``: moves the optimizer state to the CPU in
  ``NeuZipStrategy.teardown`` when the compressed module has to stay on the accelerator, the part of
  ``Strategy.teardown`` that applies then (``strategy.py``).
* ``lightning.pytorch.plugins.io.wrapper._WrappingCheckpointIO``: the base of wrapper plugins such as
  ``AsyncCheckpointIO``. ``ReplicaStrategy.checkpoint_io`` gives one of them an ``AtomicCheckpointIO`` to wrap,
  as ``Strategy.checkpoint_io`` does with ``TorchCheckpointIO`` (``replica.py``).
* ``lightning.fabric.utilities.distributed._init_dist_connection``, ``._distributed_is_initialized``,
  ``._sync_ddp_if_available`` and ``._get_default_process_group_backend_for_device``: the process group, barrier
  and ``reduce`` of ``ReplicaStrategy``, as ``DDPStrategy`` does them (``replica.py``).
* ``lightning.pytorch.strategies.launchers._SubprocessScriptLauncher`` and ``._MultiProcessingLauncher``: the
  launchers of ``ReplicaStrategy`` with several processes (``replica.py``).
* ``lightning.pytorch.trainer.call._call_callback_hooks`` and ``._call_lightning_module_hook``: run the
  ``on_before_optimizer_step`` hooks of the callbacks and of the LightningModule from
  ``NeuZipStrategy.optimizer_step``, which replaces the precision plugin's step where Lightning calls them.


Private attributes of Lightning objects (read or written in place, so not importable; :data:`PRIVATE_ATTRIBUTES`):

* ``LightningModule._trainer``: the trainer or ``None``; the ``trainer`` property raises when there is none
  (``NeuZipStrategy.setup_environment``; also ``nz_lightning/lm/modules.py``).
* ``ParallelStrategy._parallel_devices``: the device list behind ``parallel_devices``, which
  ``ReplicaStrategy`` overrides to honour a forced ``device`` (``replica.py``).
* ``Strategy._checkpoint_io``: the plugin behind the ``checkpoint_io`` property that ``ReplicaStrategy``
  overrides to default to ``AtomicCheckpointIO`` (``replica.py``).
* ``LightningOptimizer._optimizer``: the wrapped optimizer, unwrapped by ``NeuZipStrategy`` to recognise its fused
  optimizer (``strategy.py``, read with ``getattr`` and a default).
* ``_WrappingCheckpointIO.checkpoint_io``: its settable property, set only when the wrapper has no base plugin yet
  (``replica.py``).

Private behaviour: Lightning's accelerator connector assigns ``parallel_devices`` and ``num_nodes`` to strategies
that have those attributes, which is how ``ReplicaStrategy`` takes its devices and nodes from ``Trainer(devices=...,
num_nodes=...)``; it reads ``is_distributed`` of strategies that are not Lightning's own to decide on the
``DistributedSampler`` (covered by ``tests/lightning/test_strategy.py`` and ``tests/distributed``). ``_schedulers``
(``optimizer_bridge.py``) and ``_metadata`` (``checkpoint_io.py``) are torch's, not Lightning's.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib import metadata
from typing import Final

LIGHTNING_TESTED: Final = ">=2.4,<2.7"
"""The Lightning versions the private names were checked against (keep equal to the pin in ``pyproject.toml``)."""

PRIVATE_SYMBOLS: Final[tuple[tuple[str, str], ...]] = (
    ("lightning.fabric.utilities.types", "_DEVICE"),
    ("lightning.fabric.utilities.types", "_PATH"),
    ("lightning.fabric.utilities.optimizer", "_optimizers_to_device"),
    ("lightning.pytorch.plugins.io.wrapper", "_WrappingCheckpointIO"),
    ("lightning.pytorch.trainer.call", "_call_callback_hooks"),
    ("lightning.pytorch.trainer.call", "_call_lightning_module_hook"),
    ("lightning.fabric.utilities.distributed", "_init_dist_connection"),
    ("lightning.fabric.utilities.distributed", "_distributed_is_initialized"),
    ("lightning.fabric.utilities.distributed", "_sync_ddp_if_available"),
    ("lightning.fabric.utilities.distributed", "_get_default_process_group_backend_for_device"),
    ("lightning.pytorch.strategies.launchers", "_SubprocessScriptLauncher"),
    ("lightning.pytorch.strategies.launchers", "_MultiProcessingLauncher"),
)
"""``(module, name)`` of each private Lightning symbol imported here."""

PRIVATE_ATTRIBUTES: Final[tuple[tuple[str, str, str], ...]] = (
    ("lightning.pytorch.core.module", "LightningModule", "_trainer"),
    ("lightning.pytorch.strategies.parallel", "ParallelStrategy", "_parallel_devices"),
    ("lightning.pytorch.strategies.strategy", "Strategy", "_checkpoint_io"),
    ("lightning.pytorch.core.optimizer", "LightningOptimizer", "_optimizer"),
    ("lightning.pytorch.plugins.io.wrapper", "_WrappingCheckpointIO", "checkpoint_io"),
)
"""``(module, class, attribute)`` of each attribute the layer uses on Lightning objects beyond the public API."""


def lightning_version() -> str | None:
    """The installed version of the ``lightning`` distribution, or ``None`` when it is not installed."""
    try:
        return metadata.version("lightning")
    except metadata.PackageNotFoundError:
        return None


def missing_symbols() -> list[str]:
    """The entries of :data:`PRIVATE_SYMBOLS` that the installed Lightning lacks, as dotted names."""
    missing = []
    for module_name, name in PRIVATE_SYMBOLS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"{module_name}.{name}")
            continue
        if not hasattr(module, name):
            missing.append(f"{module_name}.{name}")
    return missing


def drift_message(missing: Iterable[str]) -> str:
    """Explain which private Lightning names are missing, the installed Lightning version and the tested range.

    Args:
        missing: Dotted names of the missing symbols or attributes.

    Returns:
        A message that names the fix (a Lightning version in the tested range, or updating this module).
    """
    version = lightning_version()
    installed = f"the installed lightning {version}" if version is not None else "lightning (not installed)"
    return (
        f"nz_lightning uses private Lightning names that {installed} lacks: {', '.join(missing)}. nz_lightning is "
        f"tested with lightning{LIGHTNING_TESTED}: install a version in that range "
        f"(pip install 'lightning{LIGHTNING_TESTED}'), or update nz_lightning/lightning/compat.py for this version"
    )


try:
    from lightning.fabric.utilities.distributed import (
        _distributed_is_initialized,
        _get_default_process_group_backend_for_device,
        _init_dist_connection,
        _sync_ddp_if_available,
    )
    from lightning.fabric.utilities.optimizer import _optimizers_to_device
    from lightning.fabric.utilities.types import _DEVICE, _PATH
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
    from lightning.pytorch.trainer.call import _call_callback_hooks, _call_lightning_module_hook
except ImportError as err:
    raise ImportError(drift_message(missing_symbols() or [err.name or str(err)]), name=err.name) from err

__all__ = [
    "LIGHTNING_TESTED",
    "PRIVATE_ATTRIBUTES",
    "PRIVATE_SYMBOLS",
    "_DEVICE",
    "_PATH",
    "_MultiProcessingLauncher",
    "_SubprocessScriptLauncher",
    "_WrappingCheckpointIO",
    "_call_callback_hooks",
    "_call_lightning_module_hook",
    "_distributed_is_initialized",
    "_get_default_process_group_backend_for_device",
    "_init_dist_connection",
    "_optimizers_to_device",
    "_sync_ddp_if_available",
    "drift_message",
    "lightning_version",
    "missing_symbols",
]
