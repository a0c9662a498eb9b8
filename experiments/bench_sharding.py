"""Benchmark: the cost of sharding the parameters, side by side with pure data parallelism.

On 8 host CPU devices, the trainer's AdamW train step of RevViT-S/16 (rolled scan,
``unroll=1``, what GPU/TPU run) is compiled with the sharding rules of
`revjax.train.sharding` on each mesh ``(data, fsdp, tensor)``, then timed (median of
interleaved rounds). Per mesh the table gives the compiled per-device argument bytes
(parameters, optimizer state, batch), temporary bytes, the all-gathers inside the while loops
(one unit's parameters per iteration) and outside them, and the step time relative to data
parallelism. CPU devices share the host's cores and memory, so the times only bound the
overhead of the extra collectives; the bytes are what each device holds.

    python -m experiments.bench_sharding                       # RevViT-S/16, 64x64, batch 16
    python -m experiments.bench_sharding --quick               # seconds: revvit_tiny, batch 16

Writes ``<out-dir>/bench_sharding.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from experiments import _report  # noqa: E402
from revjax.measure import time_interleaved  # noqa: E402
from revjax.train import TrainConfig  # noqa: E402
from revjax.train import sharding as S  # noqa: E402
from revjax.train.steps import create_train_state, make_train_step  # noqa: E402

NAME = "bench_sharding"
MODULE = f"experiments.{NAME}"
MESHES = ((8, 1, 1), (1, 8, 1), (2, 4, 1), (1, 4, 2))


def _compiled(model, overrides, size, batch_size, mesh_shape, min_size):
    config = TrainConfig(model=model, model_overrides={"unroll": 1, **overrides},
                         optimizer="adamw", dataset="digits", batch_size=batch_size)
    graphdef, state, tx = create_train_state(config, 10, 3)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(mesh_shape), S.MESH_AXES)
    shardings = S.train_state_shardings(state, mesh, S.family_rules(model), min_size=min_size)
    data = S.batch_sharding(mesh)
    step = jax.jit(make_train_step(graphdef, tx), in_shardings=(shardings, data),
                   out_shardings=(shardings, NamedSharding(mesh, P())))
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "image": jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
    }, data)
    state = jax.device_put(state, shardings)
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    return compiled, state, batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="revvit_tiny on 8x8 images")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-size", type=int, default=S.MIN_SHARDED_SIZE)
    parser.add_argument("--mesh", action="append", default=[],
                        help="data,fsdp,tensor (repeatable; default: the four of MESHES)")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()} (XLA_FLAGS="
                         "--xla_force_host_platform_device_count=8)")
    model, overrides, size = "revvit_s16", {"image_size": args.size}, args.size
    if args.quick:
        model, overrides, size = "revvit_tiny", {}, 8
    meshes = [tuple(int(v) for v in m.split(",")) for m in args.mesh] or list(MESHES)
    rows, fns, memory = [], {}, {}
    for mesh_shape in meshes:
        compiled, state, batch = _compiled(model, overrides, size, args.batch, mesh_shape,
                                           args.min_size)
        gathers = S.all_gathers(compiled.as_text())
        mem = compiled.memory_analysis()
        memory[mesh_shape] = (mem.argument_size_in_bytes, mem.temp_size_in_bytes,
                              len(gathers["in_loops"]), len(gathers["outside"]))
        fns[str(mesh_shape)] = (compiled, (state, batch))
    times = time_interleaved(fns, warmup=1, repeats=args.repeats)
    base = times[str(meshes[0])]["median"]
    for mesh_shape in meshes:
        arg, temp, inside, outside = memory[mesh_shape]
        median = times[str(mesh_shape)]["median"]
        rows.append([str(mesh_shape), _report.fmt_mib(arg, 2), _report.fmt_mib(temp, 2), inside,
                     outside, _report.fmt_ms(median), f"{median / base:.2f}"])
    table = _report.markdown_table(
        ["mesh (data, fsdp, tensor)", "arguments MiB / device", "temp MiB / device",
         "all-gathers in loops", "outside", "step ms", f"vs {meshes[0]}"], rows)
    details = (f"{model} (rolled scan), AdamW train step, batch {args.batch} of {size}x{size}, "
               f"parameters under {args.min_size} elements replicated, median of "
               f"{args.repeats} interleaved rounds")
    line = _report.header("Sharded training on 8 host devices: step time and memory per mesh",
                          details, _report.command_line(MODULE, argv))
    text = f"{line}\n\n{table}\n"
    _report.write_report(args.out_dir, NAME, text)


if __name__ == "__main__":
    main()
