"""Multi-chip memory without the chips: a sharded train step compiled ahead of time for a slice.

For a TPU v5e 2x4 slice (8 chips of 16 GiB), a v5p-8 (4 megacore chips of 95 GiB) or an
8-GPU H100 node, the trainer's train step is compiled over a ``(data, fsdp, tensor)`` mesh of
the slice's devices with the sharding rules of `revjax.train.sharding` (parameters and AdamW's
moments split over fsdp, heads and hidden units over tensor, the batch over data x fsdp), on
abstract shapes: nothing runs, no device is needed. Per device it reports the parameter +
optimizer bytes the shardings give, the compiled argument / temporary / total bytes
(`memory_analysis()` of the partitioned program: one device's share) and whether the total
fits the device's memory minus a 10 % reserve.

    python -m experiments.aot.mesh --target tpu-v5e-2x4 --model revvit_b16 \\
        --overrides '{"embed_dim": 1024, "depth": 24, "num_heads": 16}' --mesh 1,8,1
    python -m experiments.aot.mesh --target h100x8 --model vit_b16 --mesh 8,1,1 --mesh 1,8,1
    python -m experiments.aot.mesh --table vit_l16 --target tpu-v5e-2x4   # the results table

Each target runs in its own process (the platform's environment is set before JAX is
imported): the TPU targets need ``jax[tpu]``, the H100 node ``jax[cuda12]`` (see the AOT
guide). ``--batch`` is the batch per data shard (per data x fsdp index); the global batch is
``batch * data * fsdp``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30
RESERVE = 0.10  # of a device's memory, kept for what a compiled program does not count

_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
_NO_WRAP = {"num_slices": 1, "wrap": (False, False, False)}

# name -> platform, description, devices, memory per device (bytes, source), how to get them.
SLICES = {
    "tpu-v5e-2x4": dict(
        platform="tpu", description="TPU v5e 2x4 slice (8 chips, one host)", devices=8,
        memory=16 * GiB, source="Cloud TPU docs: 16 GB HBM2 per v5e chip, taken as 16 GiB",
        topology=dict(topology_name="v5e:2x4", chip_config_name="default",
                      chips_per_host_bounds=(2, 4, 1), **_NO_WRAP),
        env={**_TPU_ENV, "TPU_ACCELERATOR_TYPE": "v5litepod-8"},
    ),
    "tpu-v5p-8": dict(
        platform="tpu", description="TPU v5p-8 (4 megacore chips, one host)", devices=4,
        memory=95 * GiB, source="Cloud TPU docs: 95 GB HBM2e per v5p chip, taken as 95 GiB",
        topology=dict(topology_name="v5:2x2x1", chip_config_name="megacore",
                      chips_per_host_bounds=(2, 2, 1), **_NO_WRAP),
        env={**_TPU_ENV, "TPU_ACCELERATOR_TYPE": "v5p-8"},
    ),
    "h100x8": dict(
        platform="cuda", description="8x NVIDIA H100 SXM 80 GB (one node)", devices=8,
        memory=None, source="device_memory_size of experiments/targets/h100_sxm.txtpb",
        config_file="h100_sxm.txtpb", topology="1x1x8",
        env={"CUDA_VISIBLE_DEVICES": "-1", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
             "XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"},
    ),
}

# --table NAME: (label, preset, overrides) pairs and the meshes (data, fsdp, tensor).
L16 = {"embed_dim": 1024, "depth": 24, "num_heads": 16}
TABLES = {
    "vit_l16": dict(
        models=(("ViT-L/16", "vit_b16", L16), ("RevViT-L/16", "revvit_b16", L16)),
        # by the slice's device count
        meshes={8: ((8, 1, 1), (1, 8, 1), (2, 4, 1)), 4: ((4, 1, 1), (1, 4, 1), (2, 2, 1))},
        batch=32, size=224,
    ),
}
CONFIG = {"optimizer": "adamw", "compute_dtype": "bfloat16"}


def _memory(spec) -> int:
    if spec["memory"] is not None:
        return spec["memory"]
    text = (ROOT / "experiments" / "targets" / spec["config_file"]).read_text()
    return int(next(line.split(":")[1] for line in text.splitlines()
                    if line.strip().startswith("device_memory_size")))


def _devices(spec):
    from jax.experimental import topologies

    if spec["platform"] == "cuda":
        config = (ROOT / "experiments" / "targets" / spec["config_file"]).read_text()
        topo = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology=spec["topology"])
    else:
        topo = topologies.get_topology_desc(platform="tpu", **spec["topology"])
    return list(topo.devices)


def compile_sharded(devices, model, overrides, mesh_shape, batch, size, config=None) -> dict:
    """Compiles the AdamW train step of ``model`` over ``devices`` as a ``mesh_shape`` mesh;
    returns per-device bytes (``state``: parameters + optimizer from the shardings; the
    compiled ``argument``, ``temp``, ``total``) and the all-gathers in / outside loops."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from revjax.measure import compiled_memory
    from revjax.train import TrainConfig, abstract_train_state, make_train_step
    from revjax.train import sharding as S

    data, fsdp, tensor = mesh_shape
    if data * fsdp * tensor != len(devices):
        raise SystemExit(f"mesh {mesh_shape} has {data * fsdp * tensor} devices; the slice has "
                         f"{len(devices)}")
    cfg = TrainConfig(model=model, model_overrides={"unroll": 1, **overrides}, dataset="digits",
                      **{**CONFIG, **(config or {})})
    graphdef, state, tx = abstract_train_state(cfg, 1000, 3)
    mesh = Mesh(np.asarray(devices).reshape(mesh_shape), S.MESH_AXES)
    shardings = S.train_state_shardings(state, mesh, S.family_rules(model))
    global_batch = batch * data * fsdp
    batch_sharding = S.batch_sharding(mesh)
    images = jax.ShapeDtypeStruct((global_batch, size, size, 3), jax.numpy.float32,
                                  sharding=batch_sharding)
    labels = jax.ShapeDtypeStruct((global_batch,), jax.numpy.int32, sharding=batch_sharding)
    placed = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          state, shardings)

    def shard_bytes(tree, trees):
        return sum(math.prod(sh.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
                   for s, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(trees), strict=True))

    step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0,
                   in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, NamedSharding(mesh, P())))
    record = {
        "params": sum(math.prod(s.shape) for s in jax.tree.leaves(state.params)),
        "state": shard_bytes(state.params, shardings.params)
        + shard_bytes(state.opt_state, shardings.opt_state),
        "state_replicated": sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
                                for s in jax.tree.leaves((state.params, state.opt_state))),
        "global_batch": global_batch,
    }
    try:
        with jax.set_mesh(mesh):
            compiled = step.lower(placed, {"image": images, "label": labels}).compile()
    except Exception as error:  # noqa: BLE001 - the TPU compiler refuses what cannot fit
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        # "... the total memory required for HLO temporaries (19.02G) exceeds available HBM"
        return {**record, "error": text.splitlines()[0][:300]}
    mem = compiled_memory(compiled)
    gathers = S.all_gathers(compiled.as_text())
    return {
        **record, **mem, "total": mem.total,
        "gathers_in_loops": len(gathers["in_loops"]), "gathers_outside": len(gathers["outside"]),
    }


def _jobs(args, devices: int):
    if args.table:
        table = TABLES[args.table]
        return [dict(label=label, model=model, overrides=overrides, mesh=mesh,
                     batch=table["batch"], size=table["size"])
                for label, model, overrides in table["models"]
                for mesh in table["meshes"][devices]]
    meshes = [tuple(int(v) for v in m.split(",")) for m in args.mesh]
    return [dict(label=args.model, model=args.model, overrides=json.loads(args.overrides),
                 mesh=mesh, batch=args.batch, size=args.size) for mesh in meshes]


def _row(job, rec, budget):
    mib = 2**20
    if "error" in rec:  # the compiler gave up: its own figure for the temporaries
        found = re.search(r"temporaries \(([\d.]+\w)\)", rec["error"])
        needed = f"{found.group(1)}B needed" if found else "-"
        return [job["label"], str(tuple(job["mesh"])), rec["global_batch"],
                f"{rec['state'] / mib:,.0f}", "-", needed, "-",
                "does not fit (the compiler refused)", "-"]
    return [job["label"], str(tuple(job["mesh"])), rec["global_batch"],
            f"{rec['state'] / mib:,.0f}", f"{rec['argument'] / mib:,.0f}",
            f"{rec['temp'] / mib:,.0f}", f"{rec['total'] / mib:,.0f}",
            "fits" if rec["total"] <= budget else "does not fit",
            f"{rec['gathers_in_loops']} / {rec['gathers_outside']}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, choices=sorted(SLICES))
    parser.add_argument("--model", default="revvit_s16")
    parser.add_argument("--overrides", default="{}", help="constructor arguments as JSON")
    parser.add_argument("--mesh", action="append", default=[],
                        help="data,fsdp,tensor sizes (repeatable)")
    parser.add_argument("--batch", type=int, default=32, help="images per data x fsdp shard")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--table", choices=sorted(TABLES), help="a predefined set of compiles")
    parser.add_argument("--out-dir", type=Path, help="write the table as Markdown here")
    args = parser.parse_args(argv)
    if not args.table and not args.mesh:
        parser.error("give --mesh data,fsdp,tensor (repeatable) or --table")
    spec = SLICES[args.target]
    for var, value in spec["env"].items():  # before JAX is imported
        os.environ.setdefault(var, value)
    sys.path.insert(0, str(ROOT))
    import jax

    from experiments import _report

    devices = _devices(spec)[:spec["devices"]]
    memory = _memory(spec)
    budget = memory * (1 - RESERVE)
    rows = []
    for job in _jobs(args, len(devices)):
        rec = compile_sharded(devices, job["model"], job["overrides"], job["mesh"], job["batch"],
                              job["size"])
        rows.append(_row(job, rec, budget))
        print(json.dumps({**job, **rec}), flush=True)
    table = _report.markdown_table(
        ["model", "mesh (data, fsdp, tensor)", "global batch", "params + AdamW MiB / device",
         "arguments MiB", "temp MiB", "total MiB", f"within {budget / GiB:.1f} GiB",
         "all-gathers in loops / outside"], rows)
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    details = (f"{spec['description']}, device kind {kind!r}, {memory / GiB:.1f} GiB per device "
               f"({spec['source']}) minus a {RESERVE:.0%} reserve; AdamW train step, bf16 "
               f"compute, float32 parameters, rolled scans, per-device bytes of the partitioned "
               f"program; compiled on a host without the devices, nothing run (jax "
               f"{jax.__version__})")
    command = _report.command_line("experiments.aot.mesh", argv)
    title = f"Sharded train step per device, {args.target}"
    head = _report.target_header(title, details, command,
                                 f"compiled on {_report.hardware_label()} without the devices")
    text = f"{head}\n\n{table}\n"
    if args.out_dir:
        name = f"aot_mesh_{args.table or args.model}_{args.target}"
        _report.write_report(args.out_dir, name, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
