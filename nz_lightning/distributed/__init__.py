"""Multi-process NeuZip: FSDP2-sharded compressed weights and their fused in-backward update.

* :func:`shard_model` applies FSDP2's ``fully_shard`` so that each rank holds its dim-0 shard of each weight,
  compressed (:class:`~nz_lightning.distributed.fsdp_tensor.NZShard`), optionally all-gathering compressed bytes.
* :func:`sharded_fused_optimizer` updates each rank's local shard inside backward (after FSDP's reduce-scatter).
* :func:`full_state_dict` / :func:`load_full_state_dict` move whole dense tensors in and out of the shards;
  :func:`shard_state_dict` / :func:`load_shard_state_dict` save and restore one rank's shards as held (exact resume).
* :func:`comm_stats` and :func:`shard_bytes` report bytes moved and held.
"""

from nz_lightning.distributed.fsdp import comm_stats, local_shard, refresh_gather_capacities, shard_bytes, shard_model
from nz_lightning.distributed.fsdp_optim import ShardedFusedOptimizer, sharded_fused_optimizer
from nz_lightning.distributed.fsdp_state import (
    full_state_dict,
    load_full_state_dict,
    load_shard_state_dict,
    shard_state_dict,
)
from nz_lightning.distributed.fsdp_tensor import CommStats, NZShard

__all__ = [
    "CommStats",
    "NZShard",
    "ShardedFusedOptimizer",
    "comm_stats",
    "full_state_dict",
    "load_full_state_dict",
    "load_shard_state_dict",
    "local_shard",
    "refresh_gather_capacities",
    "shard_bytes",
    "shard_model",
    "shard_state_dict",
    "sharded_fused_optimizer",
]
