"""A training run in a child process (not a test itself): tests whose time is execution, not
compilation, run here under XLA's optimisation level 1, which runs a train step about ten times
faster than the suite's level 0 at about the same compile time.

    python tests/train_worker.py CONFIG_JSON WORKDIR RESULT_JSON

trains ``revjax.train.TrainConfig(**CONFIG_JSON)`` in ``WORKDIR`` and writes the summary that
`revjax.train.train_and_evaluate` returns to ``RESULT_JSON``.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from revjax import train  # noqa: E402


def main() -> int:
    fields, workdir, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    _, result = train.train_and_evaluate(train.TrainConfig(**fields), workdir)
    with open(out, "w") as f:
        json.dump({k: v for k, v in result.items() if isinstance(v, (int, float, str))}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
