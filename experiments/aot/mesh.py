"""Multi-chip memory without the chips: a sharded train step compiled ahead of time for a slice.

For a multi-chip target of `experiments.aot.targets.SLICES` (a TPU v5e 2x4 slice: 8 chips of
16 GiB; a v5p-8: 4 megacore chips of 95 GiB; an 8-GPU H100 node), the trainer's train step is
compiled over a ``(data, fsdp, tensor)`` mesh of the slice's devices with the sharding rules of
`revjax.train.sharding` (parameters and AdamW's moments split over fsdp, heads and hidden units
over tensor, the batch over data x fsdp), on abstract shapes: nothing runs, no device is
needed. Per device it reports the parameter + optimizer bytes the shardings give, the compiled
argument / temporary / total bytes (`memory_analysis()` of the partitioned program: one
device's share) and whether the total fits the chip's `Budget` (its memory minus a 10 %
reserve).

    python -m experiments.aot.mesh --target tpu-v5e-2x4 --model revvit_b16 \\
        --overrides '{"embed_dim": 1024, "depth": 24, "num_heads": 16}' --mesh 1,8,1
    python -m experiments.aot.mesh --target h100x8 --model vit_b16 --mesh 8,1,1 --mesh 1,8,1
    python -m experiments.aot.mesh --target tpu-v5e-2x4 --table vit_l16   # a results table
    python -m experiments.aot.mesh --target tpu-v5e-2x4 --table gpt_1b_largest \\
        --cache results/.aot-cache/tpu-v5e-2x4.jsonl   # the largest RevGPT that fits
    python -m experiments.aot.mesh --target h100x1 --table gpt2_small_largest  # one H100

Image models read ``--size`` x ``--size`` images, language models (GPT / RevGPT presets)
``--context`` tokens per sequence (default: the preset's context length). ``--batch`` is the
batch per data shard (per data x fsdp index); the global batch is ``batch * data * fsdp``.

A search table (``gpt_1b_largest``, ``gpt2_small_largest``) doubles one field (depth,
context, batch) from the table's value until a compile no longer fits, then halves the gap
between the last size that fit and the first that did not ``--bisect`` times, for each model at
one mesh; the table lists every compile and the bracket.

The slice's environment is set before JAX is imported, so each target runs in its own process
with the platform's plugin: the TPU targets need ``jax[tpu]``, the H100 node ``jax[cuda12]``
(see the AOT guide). ``--cache FILE`` keeps every record (`experiments.aot.CompileCache`): a
rerun or an interrupted search compiles only what is new.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from experiments.aot.budgets import budget_for
from experiments.aot.targets import ROOT, SLICES, TARGETS_DIR, GiB, Slice, get_slice

# --table NAME: (label, preset, overrides) triples, the meshes (data, fsdp, tensor) by the
# slice's device count, the batch per data shard and the image side or the context.
L16 = {"embed_dim": 1024, "depth": 24, "num_heads": 16}
GPT_1B = (("GPT-1.3B, full remat", "gpt_1b", {"remat": "full"}),
          ("RevGPT-1.3B", "revgpt_1b", {}))
TABLES = {
    "vit_l16": dict(
        models=(("ViT-L/16", "vit_b16", L16), ("RevViT-L/16", "revvit_b16", L16)),
        meshes={8: ((8, 1, 1), (1, 8, 1), (2, 4, 1)), 4: ((4, 1, 1), (1, 4, 1), (2, 2, 1))},
        batch=32, size=224,
    ),
    "gpt_1b": dict(
        models=GPT_1B,
        meshes={8: ((8, 1, 1), (1, 8, 1), (2, 4, 1)), 4: ((4, 1, 1), (1, 4, 1), (2, 2, 1))},
        batch=1, size=2048,
    ),
    # The longest context (8 sequences) and the largest batch (of 1,024 tokens) of GPT-2 small
    # that fit one chip, RevGPT against GPT with full remat.
    "gpt2_small_largest": dict(
        models=(("RevGPT-small", "revgpt2_small", {}),
                ("GPT-small, full remat", "gpt2_small", {"remat": "full"})),
        meshes={1: ((1, 1, 1),)},
        batch=8, size=1024, grow=("context", "batch"),
    ),
    # The largest depth (at the preset's width) and context that fit, RevGPT against GPT with
    # full remat, fsdp over every chip.
    "gpt_1b_largest": dict(
        models=tuple(reversed(GPT_1B)),
        meshes={8: ((1, 8, 1),), 4: ((1, 4, 1),)},
        batch=1, size=2048, grow=("depth", "context"),
    ),
}
CONFIG = {"optimizer": "adamw", "compute_dtype": "bfloat16"}
# Attention of the language models by platform: cuDNN's fused kernel on NVIDIA GPUs (what a
# user of a GPU runs), XLA's elsewhere.
ATTENTION = {"cuda": "cudnn", "tpu": "xla", "cpu": "xla"}


def _is_language_model(model: str) -> bool:
    from revjax import presets

    return presets.get(model).accepts("vocab_size")


def slice_devices(target: Slice) -> list:
    """The slice's devices, described to JAX without the chips."""
    from jax.experimental import topologies

    if target.platform == "cuda":
        config = (TARGETS_DIR / target.chip.config_file).read_text()
        topo = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            **target.topology)
    else:
        topo = topologies.get_topology_desc(platform=target.platform, **target.topology)
    return list(topo.devices)[:target.devices]


def compile_sharded(devices, model, overrides, mesh_shape, batch, size, config=None) -> dict:
    """Compiles the AdamW train step of ``model`` over ``devices`` as a ``mesh_shape`` mesh.

    Args:
      devices: the mesh's devices (a slice's, or this host's).
      model: a `revjax.presets` name; ``overrides`` its constructor arguments (``unroll``
        defaults to 1: rolled scans, what accelerators run).
      mesh_shape: ``(data, fsdp, tensor)``.
      batch: images or sequences per data x fsdp shard.
      size: the image side, or a language model's context (tokens per sequence).
      config: other `revjax.train.TrainConfig` fields (default: AdamW, bf16 compute).

    Returns:
      Per-device bytes (``state``: parameters + optimizer from the shardings; the compiled
      ``argument``, ``temp``, ``total``...), the all-gathers in / outside loops, ``params`` and
      ``global_batch``; or ``error`` (with the same ``state``) when the compiler refused for
      lack of memory.
    """
    import revjax

    # Traced as for the slice's platform: revjax's trace-time choices (default unroll, how
    # fixed-point F and G are isolated) follow it, not this process's default backend (CPU).
    with revjax.compiling_for(devices[0].platform):
        return _compile_sharded(devices, model, overrides, mesh_shape, batch, size, config)


def _compile_sharded(devices, model, overrides, mesh_shape, batch, size, config) -> dict:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from revjax.measure import compiled_memory, is_out_of_memory
    from revjax.train import TrainConfig, abstract_train_state, make_train_step
    from revjax.train import sharding as S

    data, fsdp, tensor = mesh_shape
    if data * fsdp * tensor != len(devices):
        raise SystemExit(f"mesh {tuple(mesh_shape)} has {data * fsdp * tensor} devices; the "
                         f"slice has {len(devices)}")
    text = _is_language_model(model)
    overrides = {"unroll": 1, **({"context_length": size} if text else {}), **overrides}
    cfg = TrainConfig(model=model, model_overrides=overrides,
                      dataset="shakespeare_char" if text else "digits",
                      **{**CONFIG, **(config or {})})
    from revjax import presets

    num_classes = presets.get(model).num_classes if text else 1000  # a vocabulary: the preset's
    graphdef, state, tx = abstract_train_state(cfg, num_classes, 3)
    mesh = Mesh(np.asarray(devices).reshape(mesh_shape), S.MESH_AXES)
    shardings = S.train_state_shardings(state, mesh, S.family_rules(model))
    global_batch = batch * data * fsdp
    batch_sharding = S.batch_sharding(mesh)
    if text:
        tokens = jax.ShapeDtypeStruct((global_batch, size), jax.numpy.int32,
                                      sharding=batch_sharding)
        inputs = {"tokens": tokens, "targets": tokens}
    else:
        inputs = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jax.numpy.float32,
                                                sharding=batch_sharding),
                  "label": jax.ShapeDtypeStruct((global_batch,), jax.numpy.int32,
                                                sharding=batch_sharding)}
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
            compiled = step.lower(placed, inputs).compile()
    except Exception as error:  # noqa: BLE001 - the TPU compiler refuses what cannot fit
        if not is_out_of_memory(str(error)):
            raise
        # "... the total memory required for HLO temporaries (19.02G) exceeds available HBM"
        return {**record, "error": str(error).splitlines()[0][:300]}
    mem = compiled_memory(compiled)
    gathers = S.all_gathers(compiled.as_text())
    return {
        **record, **mem, "total": mem.total,
        "gathers_in_loops": len(gathers["in_loops"]), "gathers_outside": len(gathers["outside"]),
    }


def _table_jobs(table: dict, devices: int) -> list[dict]:
    return [dict(label=label, model=model, overrides=overrides, mesh=mesh,
                 batch=table["batch"], size=table["size"])
            for label, model, overrides in table["models"]
            for mesh in table["meshes"][devices]]


def _jobs(args, devices: int) -> list[dict]:
    if args.table:
        return _table_jobs(TABLES[args.table], devices)
    meshes = [tuple(int(v) for v in m.split(",")) for m in args.mesh]
    size = args.size
    if _is_language_model(args.model):
        from revjax import presets

        size = args.context or presets.get(args.model).architecture["context_length"]
    return [dict(label=args.model, model=args.model, overrides=json.loads(args.overrides),
                 mesh=mesh, batch=args.batch, size=size) for mesh in meshes]


def _fits(rec: dict, budget) -> bool:
    return "error" not in rec and rec["total"] <= budget.bytes


def _search(job: dict, field: str, compile_job, bisect: int) -> tuple[list, int, int | None]:
    """Doubles ``field`` (``"depth"``, ``"context"`` or ``"batch"``) of ``job`` until a compile
    does not fit, then bisects the gap ``bisect`` times. Returns ``(jobs and records tried, the
    largest that fit (0: not even the start), the smallest that did not (None: never
    reached))``."""
    from revjax import presets

    arch = presets.get(job["model"]).architecture
    start = {"context": job["size"], "batch": job["batch"],
             "depth": job["overrides"].get("depth", arch["depth"])}[field]
    step = {"depth": 8, "context": 256, "batch": 1}[field]  # bisect to multiples of this

    def at(value):
        if value == start:  # the job itself (a table's compile of it is then reused)
            return job
        if field == "context":
            return {**job, "size": value}
        if field == "batch":
            return {**job, "batch": value}
        return {**job, "overrides": {**job["overrides"], "depth": value}}

    tried, good, bad, value = [], 0, None, start
    while bad is None:
        trial = at(value)
        tried.append((trial, rec := compile_job(trial)))
        if rec["fits"]:
            good, value = value, value * 2
        else:
            bad = value
    for _ in range(bisect):
        middle = (good + bad) // 2 // step * step
        if middle <= good:
            break
        trial = at(middle)
        tried.append((trial, rec := compile_job(trial)))
        good, bad = (middle, bad) if rec["fits"] else (good, middle)
    return tried, good, bad


def _row(job: dict, rec: dict, budget, text: bool) -> list:
    mib = 2**20
    shape = []
    if text:
        from revjax import presets

        arch = {**presets.get(job["model"]).architecture, **job["overrides"]}
        shape = [f"{arch['depth']} x {arch['embed_dim']}", f"{job['size']:,}",
                 f"{rec['params'] / 1e9:.2f}"]
    head = [job["label"], *shape, str(tuple(job["mesh"])), rec["global_batch"],
            f"{rec['state'] / mib:,.0f}"]
    if "error" in rec:  # the compiler gave up: its own figure for the temporaries
        found = re.search(r"temporaries \(([\d.]+\w)\)", rec["error"])
        needed = f"{found.group(1)}B needed" if found else "-"
        return [*head, "-", needed, "-", "does not fit (the compiler refused)", "-"]
    return [*head, f"{rec['argument'] / mib:,.0f}", f"{rec['temp'] / mib:,.0f}",
            f"{rec['total'] / mib:,.0f}", "fits" if _fits(rec, budget) else "does not fit",
            f"{rec['gathers_in_loops']} / {rec['gathers_outside']}"]


def _columns(text: bool, budget) -> list[str]:
    shape = ["depth x width", "context", "params (B)"] if text else []
    return ["model", *shape, "mesh (data, fsdp, tensor)",
            "global batch" + (" (sequences)" if text else ""), "params + AdamW MiB / device",
            "arguments MiB", "temp MiB", "total MiB", f"within {budget.bytes / GiB:.1f} GiB",
            "all-gathers in loops / outside"]


def _versions(target: Slice) -> dict:
    from importlib import metadata

    import jax

    package = {"cuda": "jax-cuda12-plugin", "tpu": "libtpu"}[target.platform]
    try:
        return {"jax": jax.__version__, package: metadata.version(package)}
    except metadata.PackageNotFoundError:
        return {"jax": jax.__version__, package: "not installed"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, choices=sorted(SLICES))
    parser.add_argument("--model", default="revvit_s16")
    parser.add_argument("--overrides", default="{}", help="constructor arguments as JSON")
    parser.add_argument("--mesh", action="append", default=[],
                        help="data,fsdp,tensor sizes (repeatable)")
    parser.add_argument("--batch", type=int, default=32,
                        help="images or sequences per data x fsdp shard")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--context", type=int, default=None,
                        help="tokens per sequence of a language model (default: its preset's)")
    parser.add_argument("--attention", choices=("xla", "cudnn", "plain"),
                        help="a language model's attention (default: cudnn on GPUs, else xla)")
    parser.add_argument("--table", choices=sorted(TABLES), help="a predefined set of compiles")
    parser.add_argument("--bisect", type=int, default=1,
                        help="search tables: compiles between the last fit and the first miss")
    parser.add_argument("--cache", type=Path, metavar="FILE",
                        help="reuse compile records from this JSON-lines file, add new ones")
    parser.add_argument("--out-dir", type=Path, help="write the table as Markdown here")
    args = parser.parse_args(argv)
    if not args.table and not args.mesh:
        parser.error("give --mesh data,fsdp,tensor (repeatable) or --table")
    target = get_slice(args.target)
    for var, value in target.env.items():  # before JAX is imported
        os.environ.setdefault(var, value)
    sys.path.insert(0, str(ROOT))
    import jax

    from experiments import _report
    from experiments.aot.cache import open_cache

    devices = slice_devices(target)
    budget = budget_for(target.chip)
    cache = open_cache(args.cache)
    info = {"versions": _versions(target), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    attention = args.attention or ATTENTION[target.platform]

    def compile_job(job):
        job = {**job, "overrides": dict(job["overrides"])}
        if _is_language_model(job["model"]):
            job["overrides"].setdefault("attention", attention)
        key = cache.key(target, info, job) if cache is not None else None
        rec = cache.get(key) if cache is not None else None
        if rec is None:
            rec = compile_sharded(devices, job["model"], job["overrides"], job["mesh"],
                                  job["batch"], job["size"])
            if cache is not None:
                cache.put(key, rec)
        rec = {**rec, "fits": _fits(rec, budget)}
        print(json.dumps({**job, **rec}), flush=True)
        return rec

    table = TABLES.get(args.table, {})
    text = _is_language_model(table["models"][0][1] if table else args.model)
    rows, brackets = [], []
    if "grow" in table:
        for job in _table_jobs(table, len(devices)):
            for field in table["grow"]:
                tried, good, bad = _search(job, field, compile_job, args.bisect)
                rows += [_row(j, rec, budget, text) for j, rec in tried]
                brackets.append(
                    f"- {job['label']}, {field}: largest that fits {good:,}"
                    + (f", smallest that does not {bad:,}" if bad else "")
                    + f" ({len(tried)} compiles)")
    else:
        for job in _jobs(args, len(devices)):
            rows.append(_row(job, compile_job(job), budget, text))
    body = _report.markdown_table(_columns(text, budget), rows)
    if brackets:
        body += "\n\n" + "\n".join(brackets)
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    attention_note = f", {attention} attention" if text else ""
    details = (f"{target.description}, device kind {kind!r}, {budget.describe()}; AdamW train "
               f"step, bf16 compute, float32 parameters, rolled scans{attention_note}, per-device "
               f"bytes of the partitioned program; compiled on a host without the devices, "
               f"nothing run (jax {jax.__version__})")
    command = _report.command_line("experiments.aot.mesh", argv)
    title = f"Sharded train step per device, {args.target}"
    head = _report.target_header(title, details, command,
                                 f"compiled on {_report.hardware_label()} without the devices")
    report = f"{head}\n\n{body}\n"
    if args.out_dir:
        name = f"aot_mesh_{args.table or args.model}_{args.target}"
        _report.write_report(args.out_dir, name, report)
    else:
        print(report)


if __name__ == "__main__":
    main()
