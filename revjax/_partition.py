"""The mesh axes of sharded training and the one activation constraint the models apply.

Under a mesh set with `jax.set_mesh` (the trainer sets it while it compiles a step), each
residual branch's input and output are constrained to be split along the batch over the
`BATCH_AXES` present in the mesh. Parameters split along a feature axis (fully sharded data
parallelism) then have to be gathered where a layer runs, one unit per iteration of a
reversible scan, instead of the activations being re-laid out along the features: without the
constraint XLA's sharding propagation may follow the parameters' feature split into the
activations (and gather the whole batch on every device). Without a mesh the constraint is the
identity.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

__all__ = ["BATCH_AXES", "MESH_AXES", "constrain_batch"]

# The mesh axes, outermost first: data-parallel replicas, parameter shards, tensor shards.
MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every replica and every parameter shard.
BATCH_AXES = ("data", "fsdp")


def constrain_batch(x: jax.Array) -> jax.Array:
    """``x`` constrained to be split along its leading (batch) axis over the batch axes of the
    current mesh; the identity without a mesh, or when the batch does not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))
