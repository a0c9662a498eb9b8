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
    """Tests marked slow first (a stable sort). Both `make` targets run `pytest -n 3 --dist
    worksteal`: each worker gets a contiguous third of this order, so the first starts on the
    slow tests and the others on quick ones, and an idle worker takes the end of another's
    queue (quick tests first, the last slow ones at the end). xdist's default `load` scheduling
    hands each worker a first chunk of a quarter of its share, which put every slow test on
    one worker for the whole run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _one_multi_process_test_at_a_time(request, tmp_path_factory):
    """Tests marked `two_processes` start two JAX processes that wait on each other's
    collectives; two such tests at once on two cores would each run at a fraction of their
    speed. A file lock shared by the xdist workers (the run's common temporary directory)
    lets one run at a time; every other test runs beside them."""
    if request.node.get_closest_marker("two_processes") is None:
        yield
        return
    import filelock

    shared = tmp_path_factory.getbasetemp().parent
    with filelock.FileLock(str(shared / "two_processes.lock")):
        yield


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-times",
        metavar="PATH",
        help="append each test's wall seconds and CPU seconds (its worker's, and its finished "
        "child processes': subprocesses, notebook kernels) to PATH, one JSON line per test; "
        "`python tests/cpu_times.py PATH` sums them by test and by file",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``--cpu-times``: where a run's CPU time goes. On two busy cores a test's wall time
    depends on what runs beside it; its CPU seconds much less."""
    path = item.config.getoption("--cpu-times")
    if not path:
        yield
        return
    import json
    import time

    before, start = os.times(), time.perf_counter()
    yield
    after = os.times()
    record = {
        "test": item.nodeid,
        "slow": item.get_closest_marker("slow") is not None,
        "wall": time.perf_counter() - start,
        "cpu": after.user - before.user + after.system - before.system,
        "children_cpu": after.children_user - before.children_user
        + after.children_system - before.children_system,
    }
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one write per line: the xdist workers append to the same file
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def pytest_unconfigure(config):
    if _CACHE_MADE_HERE is not None:
        shutil.rmtree(_CACHE_MADE_HERE, ignore_errors=True)
