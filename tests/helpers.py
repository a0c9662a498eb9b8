"""What several test files share (the suite's own helpers; tests never import a benchmark's)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from revjax.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent

# A tiny RevNet on digits: two stages of two units (one transition + one reversible unit each).
TINY = TrainConfig(
    model="revnet_tiny",
    dataset="digits",
    batch_size=16,
    eval_batch_size=100,
    num_steps=3,
    lr_boundaries=(1000,),
    log_every=1,
    memory_report=False,
    num_devices=1,
)


def config_fields(cfg: TrainConfig) -> dict:
    """``cfg``'s fields by name: JSON for a child process, ``TrainConfig(**fields)`` there."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def child_env() -> dict[str, str]:
    """This process's environment (the suite's XLA flags, its compilation cache) with the
    checkout first on the path: for a child process running a worker script or the CLI."""
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path}


def start_two_processes(args: list[str]) -> list[subprocess.Popen]:
    """``python *args`` as processes 0 and 1 of a jax.distributed run on localhost (a free
    port for the coordinator), output piped to their ``stdout``."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    return [
        subprocess.Popen(
            [sys.executable, *args],
            env={**child_env(), "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": str(index)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(2)
    ]


def train_in_child(cfg: TrainConfig, workdir: Path) -> dict:
    """Trains ``cfg`` in ``workdir`` in a child process (tests/train_worker.py: XLA's
    optimisation level 1, for runs whose time is execution) and returns the summary dict of
    `revjax.train.train_and_evaluate` (its numbers and strings)."""
    fields = config_fields(cfg)
    out = Path(workdir).with_name(Path(workdir).name + ".result.json")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "train_worker.py"), json.dumps(fields),
         str(workdir), str(out)],
        env=child_env(), capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


def one_device_env() -> dict[str, str]:
    """The environment of a child process with one CPU device, as a user has (the notebooks'
    kernels): the suite's other XLA flags (or XLA's defaults when the suite runs without them),
    its compilation cache (an entry belongs to one device count, so such children share
    programs with each other, not with the eight-device workers) and the checkout on the
    path."""
    inherited = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", inherited)
    return {**child_env(), "XLA_FLAGS": " ".join(flags.split()), "JAX_PLATFORMS": "cpu"}


def rel_l2(a, b) -> float:
    """``||a - b|| / ||b||`` over every leaf of two pytrees, in float64 NumPy (no XLA compile:
    op by op on device arrays, each leaf shape would compile its own small programs)."""
    num = den = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        num += float(np.sum((x - y) ** 2))
        den += float(np.sum(y**2))
    return (num / max(den, 1e-300)) ** 0.5


def restore_on_mesh(workdir: Path, config: TrainConfig):
    """The latest checkpoint in ``workdir`` restored onto ``config``'s mesh (every device of
    this process, or of every process under jax.distributed): ``(step, state, shardings)``."""
    from revjax import train
    from revjax.train import resilience

    _, target, _, shardings = train.create_sharded_train_state(
        config, 10, 1, train.make_mesh(config.num_devices, config.mesh))
    manager = resilience.checkpoint_manager(Path(workdir).absolute(), 6)
    try:
        step, state, _ = resilience.restore_latest(manager, target, Path(workdir).absolute())
    finally:
        manager.close()
    return step, state, shardings
