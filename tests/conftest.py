"""Strict test setup: several CPU devices, strict dtype promotion, rank promotion raises."""

import os

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

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Run a test with 64-bit types enabled."""
    with jax.enable_x64(True):
        yield
