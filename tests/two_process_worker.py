"""One process of the two-process run in tests/test_reliability.py (not a test itself).

    python tests/two_process_worker.py CONFIG_JSON WORKDIR OUT_PREFIX

with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set. Each process
has 2 CPU devices and reads its own shard of the data. In ``WORKDIR``: 1. train to step 2 (a
checkpoint); 2. run again towards 1,000 steps, which resumes from it, until the test sends
SIGTERM to process 1 only: every process must stop at the same step, after one coordinated
save. Each process writes ``OUT_PREFIX.<index>.json`` (stop step, signal, the cost of one
agreement on the stop flag) and exits with the command line's status (143).
"""

import json
import sys
import time

from worker_env import use_host_devices

use_host_devices(2)

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from revjax import train  # noqa: E402
from revjax.train.inputs import maybe_initialize_distributed  # noqa: E402
from revjax.train.resilience import StopSignals  # noqa: E402


def main() -> int:
    fields, workdir, prefix = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    maybe_initialize_distributed()
    assert jax.process_count() == 2 and jax.local_device_count() == 2, jax.devices()
    report = {"process": jax.process_index(), "devices": jax.device_count()}
    train.train_and_evaluate(train.TrainConfig(**{**fields, "num_steps": 2}), workdir)

    # Cost of one agreement on the stop flag (an all-gather of one int over the processes).
    stop = StopSignals()
    stop.agreed(1)
    start = time.perf_counter()
    for step in range(20):
        stop.agreed(step)
    report["agreement_ms"] = (time.perf_counter() - start) / 20 * 1e3

    with open(f"{prefix}.{jax.process_index()}.ready", "w") as f:
        f.write("resuming")
    long = train.TrainConfig(**{**fields, "num_steps": 1000, "checkpoint_every": 0})
    try:
        train.train_and_evaluate(long, workdir)  # resumes at 2
        report["stopped"], code = None, 0
    except train.Preempted as stopped:
        report["stopped"], report["signal"] = stopped.step, stopped.signal_name
        code = stopped.exit_code
    with open(f"{prefix}.{jax.process_index()}.json", "w") as f:
        json.dump(report, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
