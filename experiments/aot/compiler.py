"""The parent side of a compile: `job` (one compile, as JSON) and `TargetCompiler` (a child
process in the target's interpreter, `python -m experiments.aot --child TARGET`, reading jobs on
stdin and printing one JSON record per job)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments.aot.cache import CompileCache, open_cache
from experiments.aot.targets import ROOT, XLA_FLAGS_VAR, Target, get_target


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



class TargetCompiler:
    """A child process compiling for one target, one job at a time (adaptive searches).

    ``with TargetCompiler("h100") as c: record = c.compile(job(...))``; ``c.info`` describes the
    target (``device_kind``, versions, host). The child keeps JAX and the plugin loaded between
    jobs (a TPU child takes seconds to start); its stderr goes to a temporary file, so that
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
