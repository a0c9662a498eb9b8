"""The measurement helpers of `revjax.measure` on small inputs."""

import copy
import pickle

import jax
import jax.numpy as jnp
import pytest

from revjax import measure


def _mlp_loss_grad():
    """A function with real temporaries: two matmuls and their gradients."""

    def loss(w1, w2, x):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ w1) @ w2) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _shapes():
    return (
        jax.ShapeDtypeStruct((64, 128), jnp.float32),
        jax.ShapeDtypeStruct((128, 32), jnp.float32),
        jax.ShapeDtypeStruct((256, 64), jnp.float32),
    )


def test_compiled_memory_fields_present_and_positive():
    mem = measure.compiled_memory(_mlp_loss_grad(), *_shapes())
    for field in ("temp", "argument", "output", "alias", "generated_code"):
        assert field in mem, f"{field} missing from {mem}"
        assert isinstance(mem[field], int)
    # Arguments: 64*128 + 128*32 + 256*64 floats; outputs: the two weight gradients.
    assert mem.argument == 4 * (64 * 128 + 128 * 32 + 256 * 64)
    # (plus a few bytes for the output tuple's table of pointers)
    assert 0 <= mem.output - 4 * (64 * 128 + 128 * 32) <= 64
    assert mem.temp > 0  # the [256, 128] hidden activation at least
    assert mem.generated_code >= 0 and mem.alias >= 0
    assert mem.total == mem.argument + mem.output + mem.temp - mem.alias


def test_compiled_memory_accepts_lowered_compiled_and_plain_functions():
    step = _mlp_loss_grad()
    lowered = step.lower(*_shapes())
    expected = measure.compiled_memory(step, *_shapes())
    assert measure.compiled_memory(lowered) == expected
    assert measure.compiled_memory(lowered.compile()) == expected
    # Not jitted: compiled_memory jits it; kwargs reach the function.
    mem = measure.compiled_memory(lambda a, *, b: a * b, jnp.ones(8), b=2.0)
    assert mem.argument > 0 and mem.output >= 32


def test_compiled_memory_missing_field_is_an_attribute_error():
    mem = measure.CompiledMemory(temp=1)
    assert mem.temp == 1
    assert not hasattr(mem, "peak")
    with pytest.raises(AttributeError, match="not reported"):
        _ = mem.generated_code
    assert copy.deepcopy(mem) == mem and pickle.loads(pickle.dumps(mem)) == mem


def test_device_memory_is_none_on_cpu():
    assert jax.default_backend() == "cpu"
    assert measure.device_peak_bytes() is None
    assert measure.device_memory_limit_bytes() is None


class _FakeDevice:
    """Stands in for a GPU: `memory_stats` as a CUDA device reports it."""

    def __init__(self, stats=None, error=None):
        self.stats, self.error = stats, error

    def memory_stats(self):
        if self.error:
            raise self.error
        return self.stats


def test_device_memory_reads_the_allocator_stats():
    gpu = _FakeDevice(
        {
            "bytes_in_use": 10,
            "peak_bytes_in_use": 300,
            "bytes_limit": 1000,
            "largest_alloc_size": 200,
        }
    )
    assert measure.device_peak_bytes(gpu) == 300
    assert measure.device_memory_limit_bytes(gpu) == 1000
    # Fields that are not the peak are never reported as one.
    assert measure.device_peak_bytes(_FakeDevice({"bytes_in_use": 10})) is None
    assert measure.device_peak_bytes(_FakeDevice(error=NotImplementedError())) is None
    assert measure.device_peak_bytes(_FakeDevice({})) is None


def test_is_out_of_memory():
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB.")
    assert measure.is_out_of_memory(oom)
    assert measure.is_out_of_memory(MemoryError("CUDA out of memory"))
    assert not measure.is_out_of_memory(ValueError("Incompatible shapes for broadcasting"))
    # A compile error reported as text by an ahead-of-time compile child (experiments/aot/).
    assert measure.is_out_of_memory("XlaRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory")
    assert not measure.is_out_of_memory("ValueError: Unknown model preset 'revnet39'.")


def test_time_fn_and_time_interleaved():
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    g = jax.jit(lambda x: x + 1)
    x = jnp.ones((32, 32))
    t = measure.time_fn(f, x, warmup=1, repeats=3)
    assert set(t) == {"median", "min", "compile"}
    assert 0 < t["min"] <= t["median"]
    both = measure.time_interleaved({"f": (f, (x,)), "g": (g, (x,))}, warmup=1, repeats=3)
    assert set(both) == {"f", "g"}
    for r in both.values():
        assert 0 < r["min"] <= r["median"] and r["compile"] > 0
