"""One process of the sharded multi-process run in tests/test_sharding.py (not a test itself).

    python tests/sharded_process_worker.py DEVICES CONFIG_JSON WORKDIR

with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set (or none of
them: one process). Each process has DEVICES CPU devices; the config's mesh spans every device
of every process. Trains the config in WORKDIR (its checkpoint is what the test compares) and
exits 0.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from revjax import train  # noqa: E402
from revjax.train.inputs import maybe_initialize_distributed  # noqa: E402


def main() -> int:
    fields, workdir = json.loads(sys.argv[2]), sys.argv[3]
    maybe_initialize_distributed()
    fields["mesh"] = tuple(fields["mesh"])
    train.train_and_evaluate(train.TrainConfig(**fields), workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
