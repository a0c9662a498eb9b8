"""Strict test setup: several CPU devices, strict dtype promotion, rank promotion raises."""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backends. The suite spends most of its time in XLA:CPU
# compiles of tiny programs: backend optimisation level 0 and no expensive LLVM passes compile
# them much faster and leave compiled memory (buffer assignment happens before the backend)
# unchanged.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _compilation_cache_for_this_run() -> str | None:
    """One XLA compile per distinct program in a run: the trainer tests, the docs' examples, the
    notebooks and the entry points run as subprocesses build the same tiny steps again and again.

    JAX's persistent compilation cache goes in a directory made for this run, which the xdist
    workers and the subprocesses inherit through the environment; the first process to make it
    removes it at the end. A cache entry is the compiled program of the same HLO, options and
    XLA flags, so what a test checks (values, compiled memory, tracing) is unchanged. The size
    limit turns on JAX's file lock (the `filelock` package), so that processes compiling the
    same program at once never read a half-written entry; without it each process compiles for
    itself. Returns the directory this process made, if any.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return None
    try:
        import filelock  # noqa: F401
    except ImportError:
        return None
    made = tempfile.mkdtemp(prefix="revjax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = made
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return made


_CACHE_MADE_HERE = _compilation_cache_for_this_run()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Run a test with 64-bit types enabled."""
    with jax.enable_x64(True):
        yield


def pytest_collection_modifyitems(config, items):
    """Tests marked slow first (a stable sort). `make test-all` runs `pytest -n 2` (xdist's
    `load` scheduling), whose first chunk of a worker holds them: one worker runs the slow
    tests one after another while the other runs the quick ones (measured faster than dealing
    them to both workers with `--dist worksteal`, where two heavy multi-process tests at once
    oversubscribe two cores). `make test` (no slow tests) uses `--dist worksteal`."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    if _CACHE_MADE_HERE is not None:
        shutil.rmtree(_CACHE_MADE_HERE, ignore_errors=True)
