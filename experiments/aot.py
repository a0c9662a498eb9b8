"""Compile for a GPU or TPU target on a host without one (deviceless ahead-of-time compilation).

XLA compiles a program for a device it has only a description of: a GPU from a
``GpuTargetConfig`` text proto (``experiments/targets/*.txtpb``, copied from XLA's own GPU specs),
a TPU from a topology that ``libtpu`` knows (`jax.experimental.topologies.get_topology_desc`).
The compiled program's `memory_analysis()` and `cost_analysis()` are those of the target's
program; nothing is allocated and nothing runs.

Each compile runs in a child process, started by `compile_for_target` in an interpreter that has
the target's JAX plugin (``jax[cuda12]`` or ``jax[tpu]``, same version as ``jax``, each in its
own virtual environment because the CUDA wheels are ~3 GB: ``make aot-venv-cuda`` /
``make aot-venv-tpu``). The child sets
what must be set before JAX is imported (for CUDA: ``CUDA_VISIBLE_DEVICES=-1``, so that no GPU is
looked for, and ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``, without which the plugin's start-up check
fails on ``cuInit`` and the plugin is never registered), reads compile jobs as JSON on stdin and
prints one JSON record per job. The ``cpu`` target compiles for this host's CPU with the current
interpreter: the tests exercise the whole path with it, without any CUDA or TPU wheel.

What the figures are:

- **Lower bounds.** No autotuning happens without a device, so every cuDNN convolution gets a
  0-byte workspace; the CUDA context, cuDNN/cuBLAS handles and allocator fragmentation are not
  counted either. A real run needs more (``experiments/gpu_check.sh`` measures the difference
  where a GPU is at hand).
- **Rolled scans.** In the child `jax.default_backend()` is still ``"cpu"``, so revjax's CPU
  default (full unroll) would be compiled for the GPU; every job passes ``unroll`` explicitly
  (``1``, what GPUs and TPUs run) unless it says otherwise.
- **FLOPs** from `cost_analysis()` count the body of a rolled loop once, not once per trip:
  compare FLOPs of fully unrolled programs (``unroll=True``) only.
- **cuBLAS GEMMs.** GPU compiles get `GPU_XLA_FLAGS` (Triton GEMM fusions off: see there);
  ``$REVJAX_AOT_XLA_FLAGS`` adds flags after them (the parent's own ``XLA_FLAGS`` are for its
  CPU and never reach the child). Table headers name the flags a compile ran with.

    python -m experiments.aot --list                                 # the known targets
    python -m experiments.aot --target h100 --model revnet164 --batch 128  # ...: fits
    python -m experiments.aot --target cpu --model revnet_tiny --batch 2 --size 8 --memory-gib 1

``--batch N`` ends with a verdict: ``fits`` when the compiled step (state donated, as in the
training loop) is within the target's `Budget`, its memory minus ``--reserve`` (10 %), the same
budget as ``experiments.bench_batch --target``; ``does not fit`` otherwise.

Interpreters: ``--python`` (or the ``aot_python`` argument), else ``$REVJAX_AOT_CUDA_PYTHON`` /
``$REVJAX_AOT_TPU_PYTHON``, else ``.venv-aot-cuda/bin/python`` / ``.venv-aot-tpu/bin/python`` in
the repository root (what ``make aot-venv-cuda`` / ``make aot-venv-tpu`` create).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# No `import jax` at module level: the child process must set the target's environment first.

ROOT = Path(__file__).resolve().parent.parent
TARGETS_DIR = Path(__file__).resolve().parent / "targets"
GiB = 2**30

# XLA flags of every compile for a GPU target. Without a device XLA's GEMM autotuner cannot time
# anything: every Triton GEMM fusion keeps one default tiling (16x8 output tiles), and the pass
# that hands such fusions to the generic Triton emitter (convert_triton_gemm_config) then fails
# on fusions no tiling of that size fits, with "INTERNAL: Couldn't find output tile sizes that
# satisfy hlo: dot ...". A ViT's attention output projection is one: with the heads-merge
# transpose fused into the GEMM its rows are batch x tokens, and 196 or 197 tokens (224x224,
# without or with a class token) split into no 8- or 16-row tiles. With Triton GEMMs off every
# dot is a cuBLAS call: one of the two kinds of GEMM a real GPU's autotuner chooses between, and
# the one left where no Triton tiling compiles. Where both compile, the compiled bytes differ by
# well under 1 % (ViT-S/16 and RevViT-S/16 at 32x32, batch 32: temporary bytes within 0.4 %).
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)
# Flags added after the target's (later ones win), for experiments: the child does not inherit
# the parent's XLA_FLAGS.
XLA_FLAGS_VAR = "REVJAX_AOT_XLA_FLAGS"

_TPU_ENV = {
    # Deviceless: no metadata server, one fake host; silences libtpu's start-up warnings.
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    # Several compiles may run at once (tests, benchmarks): libtpu otherwise takes a lockfile.
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A device to compile for without having one.

    Attributes:
      name: the ``--target`` name.
      platform: ``"cuda"``, ``"tpu"`` or ``"cpu"``.
      description: the device, for table headers.
      memory_bytes: device memory the largest-batch search budgets against (``None``: unknown,
        the host CPU).
      memory_source: where ``memory_bytes`` comes from.
      config_file: GPU only, the ``GpuTargetConfig`` text proto under ``experiments/targets``.
      topology: TPU only, keyword arguments of `get_topology_desc`.
      env: environment the child needs before importing JAX.
      install: the pip requirement that provides the plugin.
    """

    name: str
    platform: str
    description: str
    memory_bytes: int | None
    memory_source: str
    config_file: str | None = None
    topology: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    install: str | None = None

    @property
    def memory_label(self) -> str:
        if self.memory_bytes is None:
            return "host memory"
        return f"{self.memory_bytes / GiB:.1f} GiB"


def _gpu_memory(config_file: str) -> int:
    """``device_memory_size`` of a GpuTargetConfig text proto (the single source of the figure)."""
    text = (TARGETS_DIR / config_file).read_text()
    match = re.search(r"^\s*device_memory_size:\s*(\d+)", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"{config_file}: no device_memory_size field")
    return int(match.group(1))


def _gpu(name: str, description: str, config_file: str) -> Target:
    return Target(
        name=name,
        platform="cuda",
        description=description,
        memory_bytes=_gpu_memory(config_file),
        memory_source=f"device_memory_size of experiments/targets/{config_file} (XLA's spec)",
        config_file=config_file,
        env={
            "CUDA_VISIBLE_DEVICES": "-1",
            "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
            "XLA_FLAGS": " ".join(GPU_XLA_FLAGS),
        },
        install="jax[cuda12]",
    )


def _tpu(
    name: str, description: str, topology: Mapping, accelerator: str, gib: int, source: str
) -> Target:
    return Target(
        name=name,
        platform="tpu",
        description=description,
        memory_bytes=gib * GiB,
        memory_source=source,
        topology=topology,
        env={**_TPU_ENV, "TPU_ACCELERATOR_TYPE": accelerator},
        install="jax[tpu]",
    )


_ONE_V5E = dict(
    topology_name="v5e:1x1",
    chip_config_name="default",
    chips_per_host_bounds=(1, 1, 1),
    num_slices=1,
    wrap=(False, False, False),
)
_MEGACORE_HOST = dict(
    chip_config_name="megacore",
    chips_per_host_bounds=(2, 2, 1),
    num_slices=1,
    wrap=(False, False, False),
)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _gpu("h100", "NVIDIA H100 SXM 80 GB", "h100_sxm.txtpb"),
        _gpu("h200", "NVIDIA H200 141 GB", "h200.txtpb"),
        _gpu("a100-40", "NVIDIA A100 SXM4 40 GB", "a100_sxm_40.txtpb"),
        _gpu("a100-80", "NVIDIA A100 SXM4 80 GB", "a100_sxm_80.txtpb"),
        # One chip each. v4 and v5p chips are two TensorCores fused as one device ("megacore");
        # libtpu describes them only as a 2x2x1 host of 4 chips, of which one is compiled for.
        _tpu(
            "tpu-v5e",
            "TPU v5e (one chip)",
            _ONE_V5E,
            "v5litepod-1",
            16,
            "Cloud TPU docs: 16 GB HBM2 per v5e chip, taken as 16 GiB",
        ),
        _tpu(
            "tpu-v4",
            "TPU v4 (one chip, megacore)",
            {"topology_name": "v4:2x2x1", **_MEGACORE_HOST},
            "v4-8",
            32,
            "Cloud TPU docs: 32 GiB HBM2 per v4 chip",
        ),
        _tpu(
            "tpu-v5p",
            "TPU v5p (one chip, megacore)",
            {"topology_name": "v5:2x2x1", **_MEGACORE_HOST},
            "v5p-8",
            95,
            "Cloud TPU docs: 95 GB HBM2e per v5p chip, taken as 95 GiB",
        ),
        Target(
            name="cpu",
            platform="cpu",
            description="this host's CPU",
            memory_bytes=None,
            memory_source="-",
            env={"JAX_PLATFORMS": "cpu"},
        ),
    )
}


def get_target(name: str) -> Target:
    """The `Target` called ``name``; a clear error naming the known ones otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise SystemExit(
            f"unknown target {name!r}; known targets: {', '.join(TARGETS)} "
            "(python -m experiments.aot --list)"
        ) from None


# What a batch may use of a device's memory: the rest is kept for what a compiled program does not
# count (CUDA context, cuDNN workspaces chosen by autotuning, the TPU runtime, fragmentation).
DEFAULT_RESERVE = 0.10


@dataclasses.dataclass(frozen=True)
class Budget:
    """The bytes a compiled train step may take on a device: its memory minus a reserve.

    A compiled program fits when its total (arguments + outputs + temporaries - aliased, state
    donated as in the training loop) is at most `bytes`. The same budget decides
    ``python -m experiments.aot --batch N`` and the largest-batch search of
    ``experiments.bench_batch --target``.

    Attributes:
      memory_bytes: the device's memory.
      source: where ``memory_bytes`` comes from.
      reserve: the fraction of it kept free.
    """

    memory_bytes: float
    source: str
    reserve: float = DEFAULT_RESERVE

    @property
    def bytes(self) -> float:
        return self.memory_bytes * (1 - self.reserve)

    def describe(self) -> str:
        """``"device memory 79.6 GiB (source) minus a 10% reserve = 71.6 GiB"``."""
        return (
            f"device memory {self.memory_bytes / GiB:.1f} GiB ({self.source}) minus a "
            f"{self.reserve:.0%} reserve = {self.bytes / GiB:.2f} GiB"
        )

    def verdict(self, total: float) -> str:
        """``"fits"`` when ``total`` compiled bytes are within the budget, else
        ``"does not fit"``."""
        return "fits" if total <= self.bytes else "does not fit"


def budget_for(
    target: Target, *, reserve: float = DEFAULT_RESERVE, memory_gib: float | None = None
) -> Budget | None:
    """The `Budget` of ``target`` (``memory_gib`` replaces its memory); ``None`` when its memory is
    unknown (the ``cpu`` target) and none is given."""
    if not 0 <= reserve < 1:
        raise SystemExit(f"--reserve is a fraction of device memory in [0, 1), got {reserve}")
    if memory_gib:
        return Budget(memory_gib * GiB, "--memory-gib", reserve)
    if target.memory_bytes is None:
        return None
    return Budget(target.memory_bytes, target.memory_source, reserve)


def target_python(target: Target, python: str | None = None) -> str:
    """The interpreter that compiles for ``target`` (see the module docstring for the order)."""
    if python:
        return python
    if target.platform == "cpu":
        return sys.executable
    var = f"REVJAX_AOT_{target.platform.upper()}_PYTHON"
    if os.environ.get(var):
        return os.environ[var]
    venv = ROOT / f".venv-aot-{target.platform}" / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise SystemExit(
        f"target {target.name!r} needs an interpreter with `{target.install}` (same version as "
        f"jax) and revjax's dependencies: run `make aot-venv-{target.platform}` (creates "
        f"{venv.parent.parent}), "
        f"or set ${var} / pass --aot-python to such an interpreter."
    )


def child_env(target: Target) -> dict[str, str]:
    """The child's environment: this one, minus CPU-only JAX settings, plus the target's, plus
    ``$REVJAX_AOT_XLA_FLAGS`` after the target's XLA flags."""
    env = dict(os.environ)
    # XLA_FLAGS of the parent (e.g. the tests' forced CPU device count) and JAX_PLATFORMS=cpu
    # would be wrong for a GPU/TPU compile; the child gets exactly what its target needs.
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    env.update(target.env)
    flags = " ".join(f for f in (target.env.get("XLA_FLAGS"), env.get(XLA_FLAGS_VAR)) if f)
    if flags:
        env["XLA_FLAGS"] = flags
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def job(
    model: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    batch: int,
    size: int,
    num_classes: int = 10,
    in_channels: int = 3,
    donate: bool = False,
    compile: bool = True,
    key: Any = None,
    config: Mapping[str, Any] | None = None,
) -> dict:
    """One compile job: the trainer's train step of a preset on abstract inputs.

    ``overrides`` are constructor arguments; ``unroll`` defaults to 1 (rolled scans) because the
    child's default backend is the CPU. ``config`` holds other `revjax.train.TrainConfig` fields
    (a fine-tuning recipe: optimizer, layer decay, frozen parts); the defaults otherwise.
    ``donate`` donates the train state as the training loop does (old and new state share
    buffers: counted in ``alias``). ``compile=False`` only traces and lowers (FLOPs of the
    unoptimised program, ``lowered_flops``). ``key`` comes back in the record, to match records
    to jobs.
    """
    return {
        "model": model,
        "overrides": {"unroll": 1, **dict(overrides or {})},
        "batch": int(batch),
        "size": int(size),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "donate": bool(donate),
        "compile": bool(compile),
        "key": key,
        # only when given: the jobs (and cache keys) of the default recipe stay as they were
        **({"config": dict(config)} if config else {}),
    }


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


class TargetCompiler:
    """A child process compiling for one target, one job at a time (adaptive searches).

    ``with TargetCompiler("h100") as c: record = c.compile(job(...))``; ``c.info`` describes the
    target (``device_kind``, versions, host). The child keeps JAX and the plugin loaded between
    jobs (a TPU child takes ~10 s to start); its stderr goes to a temporary file, so that
    libtpu's chatter can never block it.

    Raises (from the constructor and `compile`):
      RuntimeError: the child died (the message holds its stderr's tail).
      TimeoutError: no record within ``timeout`` seconds.
    """

    def __init__(
        self,
        target: str | Target,
        *,
        python: str | None = None,
        timeout=None,
        cache: str | Path | CompileCache | None = None,
    ):
        self.target = get_target(target) if isinstance(target, str) else target
        self.timeout = timeout
        self.cache = open_cache(cache)
        self.cmd = [target_python(self.target, python), "-m", "experiments.aot", "--child"]
        self.cmd.append(self.target.name)
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env=child_env(self.target),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.info = self._read()["info"]

    def _read(self) -> dict:
        """The child's next JSON line (other output is skipped)."""
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            self.proc.kill()

        timer = threading.Timer(self.timeout, kill) if self.timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("{"):
                    try:
                        return json.loads(line)
                    except json.JSONDecodeError:
                        pass
        finally:
            if timer is not None:
                timer.cancel()
        self.proc.wait()
        if timed_out.is_set():
            raise TimeoutError(f"{shlex.join(self.cmd)}: killed after the {self.timeout} s timeout")
        self._stderr.seek(0)
        raise RuntimeError(
            f"compile child for target {self.target.name!r} (`{shlex.join(self.cmd)}`) exited "
            f"with status {self.proc.returncode}:\n{self._stderr.read()[-6000:]}"
        )

    def compile(self, spec: Mapping[str, Any]) -> dict:
        """Compiles one `job`; its record (see `compile_for_target`). With a ``cache``, a job
        compiled before for the same target, versions and sources is answered from it (the
        record then has ``cached: True``), and every new record is added to it."""
        if self.cache is not None:
            key = self.cache.key(self.target, self.info, spec)
            hit = self.cache.get(key)
            if hit is not None:
                return {**hit, "cached": True}
            record = self._compile(spec)
            self.cache.put(key, record)
            return record
        return self._compile(spec)

    def _compile(self, spec: Mapping[str, Any]) -> dict:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(dict(spec)) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: `_read` reports why
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass

    def __enter__(self) -> TargetCompiler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def source_fingerprint() -> str:
    """A hash of everything a compiled record depends on besides the job and the versions: the
    library's sources, this file, `experiments._report` (which builds the step) and the GPU
    target configs."""
    h = hashlib.sha256()
    files = sorted((ROOT / "revjax").rglob("*.py")) + [
        Path(__file__).resolve(),
        ROOT / "experiments" / "_report.py",
        *sorted(TARGETS_DIR.glob("*")),
    ]
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class CompileCache:
    """Compile records kept in a JSON-lines file, so that a search or table interrupted or rerun
    does not compile again what it already compiled (a TPU compile takes minutes).

    A record is reused only for the same job, target, versions (JAX, plugin / libtpu), XLA flags
    and `source_fingerprint`: any change to revjax or to the step builder invalidates it. Lines are
    appended whole, so a killed run leaves every finished compile behind; a truncated last line
    is skipped. Failed compiles are kept only when they ran out of memory (a real answer), not
    when something else went wrong."""

    _lock = threading.Lock()

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fingerprint = source_fingerprint()
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.records[entry["key"]] = entry["record"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def key(self, target: Target, info: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
        blob = json.dumps(
            {
                "target": target.name,
                "versions": info.get("versions"),
                "xla_flags": info.get("xla_flags"),
                "sources": self.fingerprint,
                "job": spec,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        from revjax.measure import is_out_of_memory  # imports JAX: the parent side only

        if "error" in record and not is_out_of_memory(record["error"]):
            return
        with self._lock:
            self.records[key] = dict(record)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "record": record}) + "\n")
                f.flush()


def open_cache(cache: str | Path | CompileCache | None) -> CompileCache | None:
    """A `CompileCache` from a file name (read once; children compiling in parallel share the
    returned object), an existing one, or None."""
    return cache if cache is None or isinstance(cache, CompileCache) else CompileCache(cache)


def compile_for_target(
    target: str | Target,
    jobs: Sequence[Mapping[str, Any]],
    *,
    python: str | None = None,
    timeout: float | None = None,
    on_record: Callable[[dict], None] | None = None,
    processes: int = 1,
    cache: str | Path | CompileCache | None = None,
) -> tuple[dict, list[dict]]:
    """Compiles every job for ``target`` in child processes (`TargetCompiler`).

    Args:
      target: a `TARGETS` name or a `Target`.
      jobs: `job` dicts.
      python: the interpreter (default: `target_python`).
      timeout: seconds per compile (``None``: no limit).
      on_record: called with each record as it arrives (progress of long TPU compiles).
      processes: child processes compiling at once (XLA compiles mostly on one core).
      cache: a `CompileCache` file: jobs compiled before are answered from it.

    Returns:
      ``(info, records)``: the child's description of the target (``device_kind``, versions,
      host) and one record per job, in the order of ``jobs``: the job's fields, the compiled
      memory (``temp``, ``argument``, ``output``, ``alias``, ``total``), ``flops``,
      ``lowered_flops``, ``trace_lower_s``, ``compile_s``, ``params``; or ``error`` when that
      job failed to compile.
    """

    def handle(compiler: TargetCompiler, spec: Mapping[str, Any]) -> dict:
        record = compiler.compile(spec)
        record["target_info"] = compiler.info  # for partial reports
        return record

    def report(info: dict, record: dict, done: list) -> None:
        if on_record is not None:
            on_record(record)

    return share_out(
        target,
        jobs,
        handle,
        processes=processes,
        python=python,
        timeout=timeout,
        cache=cache,
        on_result=report,
    )


def share_out(
    target: str | Target,
    items: Sequence[Any],
    handle: Callable[[TargetCompiler, Any], Any],
    *,
    processes: int = 1,
    python: str | None = None,
    timeout: float | None = None,
    cache: str | Path | CompileCache | None = None,
    on_result: Callable[[dict, Any, list], None] | None = None,
) -> tuple[dict, list]:
    """Runs ``handle(compiler, item)`` for every item over ``processes`` `TargetCompiler`
    children, each thread taking the next item as it finishes one (a search of many compiles
    or a single compile alike).

    Args:
      target: a `TARGETS` name or a `Target`.
      items: what to handle (compile jobs, models to search).
      handle: ``(compiler, item) -> result``, run in the thread that owns ``compiler``.
      processes: child processes at once (at most one per item).
      python: the interpreter (default: `target_python`).
      timeout: seconds per compile (``None``: no limit).
      cache: a `CompileCache` (or its file) all children share.
      on_result: ``(target info, result, results so far in item order)`` after each item,
        called under a lock (partial reports).

    Returns:
      ``(info, results)``: the target's description from the first child, and one result per
      item in the order of ``items``.
    """
    pending = list(enumerate(items))
    results: list = [None] * len(pending)
    finished = [False] * len(pending)
    infos: list[dict] = []
    lock = threading.Lock()
    cache = open_cache(cache)

    def work() -> None:
        with TargetCompiler(target, python=python, timeout=timeout, cache=cache) as compiler:
            infos.append(compiler.info)
            while True:
                with lock:
                    if not pending:
                        return
                    i, item = pending.pop(0)
                result = handle(compiler, item)
                with lock:
                    results[i], finished[i] = result, True
                    if on_result is not None:
                        done = [r for r, f in zip(results, finished) if f]
                        on_result(compiler.info, result, done)

    run_in_threads(work, min(max(1, processes), max(1, len(pending))))
    return infos[0], [r for r, f in zip(results, finished) if f]


def require_compiled(records: Sequence[dict], owner: str) -> None:
    """Exits naming ``owner`` (a benchmark) and the first error when any job failed to compile
    (for tables that need every job: memory vs depth, compile times)."""
    failed = [r for r in records if "error" in r]
    if failed:
        raise SystemExit(f"{owner}: {len(failed)} compiles failed, first: {failed[0]['error']}")


def run_in_threads(work: Callable[[], None], n: int) -> None:
    """Runs ``work`` in ``n`` threads (each owns its child process); re-raises the first error."""
    if n == 1:
        work()
        return
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=guarded) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def describe(target: Target, info: Mapping[str, Any]) -> str:
    """``"H100 ... (device kind ..., cuda plugin ...), compiled on <host>"`` for table headers."""
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    flags = f", XLA_FLAGS `{info['xla_flags']}`" if info.get("xla_flags") else ""
    return (
        f"target **{target.name}**: {target.description}, device kind "
        f"{info.get('device_kind', '?')!r}, {target.memory_label} ({versions}{flags}); compiled "
        f"ahead of time on a host without one ({info.get('host', '?')}), nothing run"
    )


LOWER_BOUND_NOTE = (
    "Compiled bytes are a lower bound of what the device needs: no autotuning without a device, "
    "so every cuDNN convolution gets a 0-byte workspace, and the CUDA context, library handles "
    "and allocator fragmentation are not counted."
)
_LOWER_BOUND_NOTES = {
    "cuda": LOWER_BOUND_NOTE,
    "tpu": (
        "Compiled bytes are a lower bound of what the chip needs: the program's code, what the "
        "TPU runtime reserves for itself and any fragmentation are not counted."
    ),
    "cpu": (
        "Compiled bytes are a lower bound of what this host's process needs (the cpu target "
        "tests the plumbing): the runtime's own allocations are not counted."
    ),
}


def lower_bound_note(target: Target) -> str:
    """What a table's compiled bytes leave out, for ``target``'s kind of device."""
    return _LOWER_BOUND_NOTES[target.platform]


def records_by_key(records: Iterable[dict]) -> dict:
    """Records indexed by their job's ``key`` (JSON turns tuples into lists: keys are tuples)."""
    out = {}
    for r in records:
        key = r.get("key")
        out[tuple(key) if isinstance(key, list) else key] = r
    return out


# --------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------


def _devices(target: Target):
    import jax
    from jax.experimental import topologies

    if target.platform == "cpu":
        return jax.devices("cpu")[:1]
    if target.platform == "cuda":
        config = (TARGETS_DIR / target.config_file).read_text()
        topo = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
    else:
        topo = topologies.get_topology_desc(platform="tpu", **target.topology)
    return list(topo.devices)[:1]


def _versions(target: Target) -> dict[str, str]:
    from importlib import metadata

    import jax

    versions = {"jax": jax.__version__}
    package = {"cuda": "jax-cuda12-plugin", "tpu": "libtpu"}.get(target.platform)
    if package:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _compile_one(spec: Mapping[str, Any], sharding, options) -> dict:
    import jax

    from experiments import _report
    from revjax.measure import compiled_memory

    start = time.perf_counter()
    step, state, batch = _report.abstract_train_step(
        spec["model"],
        spec["overrides"],
        batch_size=spec["batch"],
        image_size=spec["size"],
        in_channels=spec["in_channels"],
        num_classes=spec["num_classes"],
        donate=spec.get("donate", False),
        config=spec.get("config"),
    )
    params = _report.num_params(state)
    placed = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding, weak_type=s.weak_type),
        (state, batch),
    )
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered = step.lower(*placed)  # trace + lower
    lower_s = time.perf_counter() - start
    record = {
        "params": params,
        "build_s": build_s,
        "trace_lower_s": lower_s,
        # XLA's cost analysis of the unoptimised HLO: the program as JAX wrote it, the same for
        # every target (only a backend with a client computes it: not a deviceless GPU)
        "lowered_flops": _cost(lowered).get("flops"),
    }
    if not spec.get("compile", True):
        return record
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=spec.get("compiler_options") or options)
    record["compile_s"] = time.perf_counter() - start
    mem = compiled_memory(compiled)
    cost = _cost(compiled)
    return {
        **mem,
        "total": mem.total,
        # after the target's optimisations; None where the backend has no cost analysis
        "flops": cost.get("flops"),
        "bytes_accessed": cost.get("bytes accessed"),
        **record,
    }


def _cost(obj) -> dict:
    """``cost_analysis()`` as a dict, empty where the backend offers none."""
    try:
        cost = obj.cost_analysis()
    except Exception:  # noqa: BLE001 - e.g. no client for a compile-only platform
        return {}
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _child_main(name: str) -> None:
    """The child: target environment, then JAX; jobs from stdin, one JSON record per line."""
    target = get_target(name)
    for var, value in target.env.items():  # before JAX is imported (also when run by hand)
        os.environ.setdefault(var, value)
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = _devices(target)
    mesh = Mesh(np.array(devices), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec())
    info = {
        "target": target.name,
        "platform": devices[0].platform,
        "device_kind": getattr(devices[0], "device_kind", devices[0].platform),
        "default_backend": jax.default_backend(),
        "versions": _versions(target),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    print(json.dumps({"info": info}), flush=True)
    # The CPU target compiles only for memory and cost: LLVM's optimisation level does not change
    # buffer assignment, so level 0 gives the same bytes faster (see `_report`).
    options = {"xla_backend_optimization_level": 0} if target.platform == "cpu" else None
    for line in sys.stdin:  # one job per line, until the parent closes stdin
        if not line.strip():
            continue
        one = json.loads(line)
        try:
            record = _compile_one(one, sharding, options)
        except Exception as error:  # noqa: BLE001 - reported to the parent, which decides
            record = {"error": f"{type(error).__name__}: {str(error)[:2000]}"}
        print(json.dumps({**one, **record}), flush=True)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--target`` and ``--aot-python`` for the benchmarks."""
    parser.add_argument(
        "--target",
        choices=list(TARGETS),
        default=None,
        help="compile ahead of time for this device instead of measuring this host "
        "(experiments/aot.py; nothing runs)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="with --target: child processes compiling at once (default 1)",
    )
    parser.add_argument(
        "--aot-python",
        default=None,
        help="interpreter with the target's JAX plugin (default: $REVJAX_AOT_<CUDA|TPU>_PYTHON, "
        "else .venv-aot-<cuda|tpu>)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --target: reuse compile records from this JSON-lines file and add new ones "
        "(same job, target, versions and revjax sources only); reruns and interrupted searches "
        "then skip what was compiled",
    )


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """``--reserve`` and ``--memory-gib``: the `Budget` a compiled step is held against."""
    parser.add_argument(
        "--reserve",
        type=float,
        default=DEFAULT_RESERVE,
        help="with --target: fraction of device memory kept free (CUDA context, cuDNN "
        f"workspace, fragmentation; default {DEFAULT_RESERVE:.2f})",
    )
    parser.add_argument(
        "--memory-gib", type=float, default=None, help="with --target: override device memory"
    )


def print_verdict(record: Mapping[str, Any], budget: Budget | None, target: Target) -> None:
    """The last line of ``--batch N``: whether the compiled step fits ``budget``."""
    if budget is None:
        print(
            f"no verdict: target {target.name!r} has no device memory to budget against; pass "
            "--memory-gib (or pick a GPU/TPU target)"
        )
        return
    if "error" in record:  # the compiler itself ran out of the target's memory
        print(f"does not fit: the compile ran out of memory; budget: {budget.describe()}")
        return
    print(
        f"{budget.verdict(record['total'])}: {record['total'] / GiB:.2f} GiB compiled "
        f"(arguments + outputs + temporaries - aliased) against {budget.describe()}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help="list the known targets")
    add_target_arguments(parser)
    add_budget_arguments(parser)
    parser.add_argument("--model", default="revnet164", help="a revjax.models preset")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--overrides", default="{}", help="constructor arguments as JSON (unroll defaults to 1)"
    )
    parser.add_argument(
        "--donate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="donate the train state as the training loop does (default; the fits verdict "
        "assumes it)",
    )
    args = parser.parse_args(argv)
    if args.child:
        _child_main(args.child)
        return
    if args.list or not args.target:
        for t in TARGETS.values():
            print(f"{t.name:8s} {t.description}; memory {t.memory_label} ({t.memory_source})")
        return
    target = get_target(args.target)
    budget = budget_for(target, reserve=args.reserve, memory_gib=args.memory_gib)
    info, (record,) = compile_for_target(
        target,
        [
            job(
                args.model,
                json.loads(args.overrides),
                batch=args.batch,
                size=args.size,
                num_classes=args.num_classes,
                donate=args.donate,
            )
        ],
        python=args.aot_python,
        cache=args.cache,
    )
    print(describe(target, info))
    if "error" in record:
        from revjax.measure import is_out_of_memory

        if not is_out_of_memory(record["error"]):
            raise SystemExit(record["error"])
        print(record["error"].splitlines()[0][:300])
    else:
        for field in ("temp", "argument", "output", "alias", "total"):
            print(f"{field:>9s}: {record[field] / 2**20:10.1f} MiB")
        if record.get("flops") is not None:
            print(f"    flops: {record['flops']:.4g} (a rolled loop's body counts once)")
        print(
            f"  compile: {record['trace_lower_s']:.1f} s trace + lower, "
            f"{record.get('compile_s', 0):.1f} s"
        )
    print_verdict(record, budget, target)


if __name__ == "__main__":
    main()
