"""Strict test setup: several CPU devices, strict dtype promotion, rank promotion raises."""

import os

# Must happen before JAX initialises its backends. The suite spends most of its time in XLA:CPU
# compiles of tiny programs: backend optimisation level 0 and no expensive LLVM passes compile
# ~1.8x faster (measured: 108 s -> 60 s of CPU on four model tests) and leave compiled memory
# (buffer assignment happens before the backend) unchanged.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# Slow checks in files whose tests carry no `slow` mark of their own yet (`make test` deselects
# `slow`; `make test-all` and CI run them): node-id prefixes, each measured at minutes on 2 cores.
SLOW = (
    "tests/test_drift.py::test_presets_float32_as_accurate_as_plain",
    "tests/test_drift.py::test_bench_drift_quick",
    "tests/test_fixed_point.py::test_trainer_names_an_overflowed_carry",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def x64():
    """Run a test with 64-bit types enabled."""
    with jax.enable_x64(True):
        yield
