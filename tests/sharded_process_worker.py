"""One process of the sharded runs in tests/test_sharding.py (not a test itself).

    python tests/sharded_process_worker.py DEVICES train CONFIG_JSON WORKDIR
    python tests/sharded_process_worker.py DEVICES restore CONFIG_JSON WORKDIR OUT_NPZ

Each process has DEVICES CPU devices. ``train``: with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set, every process trains the config (its mesh
spans every device of every process) into WORKDIR's checkpoints. ``restore``: one process
restores WORKDIR's latest checkpoint onto the config's mesh and writes the state's leaves to
OUT_NPZ (``leaf_<i>``), with each parameter's sharding spec (``spec_<i>``).
"""

import json
import sys
from pathlib import Path

from worker_env import use_host_devices

use_host_devices(int(sys.argv[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from helpers import restore_on_mesh  # noqa: E402

from revjax import train  # noqa: E402
from revjax.train.inputs import maybe_initialize_distributed  # noqa: E402


def main() -> int:
    mode, fields, workdir = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
    maybe_initialize_distributed()
    config = train.TrainConfig(**fields)
    if mode == "train":
        train.train_and_evaluate(config, workdir)
        return 0
    _, state, _ = restore_on_mesh(workdir, config)
    leaves = jax.tree.leaves(state)
    np.savez(sys.argv[5], **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)},
             **{f"spec_{i}": str(x.sharding.spec) for i, x in enumerate(leaves)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
