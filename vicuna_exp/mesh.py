"""The device-mesh shape `backend.sharding` asks for, by one rule for the job's pre-launch check and
for the FSDP worker, so a shape the worker would refuse is refused before any worker starts."""

from __future__ import annotations

from vicuna_exp.choices import Sharding
from vicuna_exp.errors import UsageError


def mesh_shape(sharding: Sharding, world: int, per_node: int) -> tuple[int, ...]:
    """(world,) for full sharding; (replicas, shards) for hybrid, one shard group per node.

    Raises UsageError naming the keys when the ranks cannot be laid out as whole nodes.
    """
    if sharding == Sharding.full:
        return (world,)
    if per_node < 1 or world % per_node:
        raise UsageError(f"backend.sharding=hybrid: the world size {world} is not a multiple of the node size "
                         f"{per_node} (launcher.nproc_per_node), so the ranks cannot be split into whole nodes "
                         f"that each hold one copy of the shards; use the same launcher.nproc_per_node on every "
                         f"node of the launcher.nnodes, or backend.sharding=full")
    return (world // per_node, per_node)
