"""Benchmark: fine-tuning a pretrained ViT as itself vs as its reversible conversion.

Two parts:

1. **Memory**: the compiled fine-tuning train step (forward, backward, AdamW; the trainer's
   step, abstract shapes, nothing allocated, rolled scans as GPU/TPU run them) of ViT-S/16 and
   ViT-B/16 (class token, timm's layout) against `RevViT.from_vit` of the same model, at
   224x224 and 384x384. On CPU the bytes are XLA:CPU's buffer assignment (temporary bytes
   compare the activation memory); ``--target h100`` compiles the same steps for an H100 on
   this host (`experiments.aot`: the CUDA ahead-of-time venv, ``make aot-venv-cuda``; state
   donated as in the training loop; nothing runs) and writes ``bench_finetune_<target>.md``.
2. **Toy transfer** (the notebook ``05_finetune_pretrained``'s experiment): a tiny ViT
   pretrained on digits 0-4, exported to timm's format, loaded back and converted to a RevViT,
   fine-tuned on digits 5-9 (new head, layer decay, frozen embedding), against the same RevViT
   trained from scratch for the same steps; test accuracy on digits 5-9.

    python -m experiments.bench_finetune                  # both parts (CPU: ~10 minutes)
    python -m experiments.bench_finetune --no-memory      # the transfer only
    python -m experiments.bench_finetune --quick          # seconds: tiny sizes, for tests
    python -m experiments.bench_finetune --target h100    # the memory part, compiled for an H100
    python -m experiments.bench_finetune --no-memory --save-source workdirs/digits04_vit.safetensors
                                  # also keep the pretrained ViT (digits_revvit_finetune's start)

Writes ``<out-dir>/bench_finetune.md`` (with ``--target``: ``bench_finetune_<target>.md``, the
memory part only).
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from experiments import _report, aot
from revjax import RevViT, data, finetune, pretrained, vit
from revjax.finetune import accuracy, fit

NAME = "bench_finetune"
MODULE = f"experiments.{NAME}"

# (label, ViT preset, RevViT preset: the conversion has the preset's architecture)
PAIRS = (("ViT-S/16", "vit_s16", "revvit_s16"), ("ViT-B/16", "vit_b16", "revvit_b16"))
SIZES = (224, 384)
BATCH = 32
# --quick: two blocks of width 64 at 32x32, the same code, seconds to compile
QUICK_MODEL = dict(embed_dim=64, depth=2, num_heads=2)
# The fine-tuning recipe of the memory part (`revjax.train.TrainConfig` fields): AdamW, layer
# decay 0.75, frozen patch embedding.
RECIPE = dict(
    optimizer="adamw", learning_rate=1e-4, weight_decay=0.05, lr_schedule="cosine",
    warmup_steps=1, num_steps=10, layer_decay=0.75, freeze=("embed",),
)

# The toy transfer: tiny ViT on 8x8 digits (patch 2, D 32, 2 blocks), AdamW.
TRANSFER = dict(
    pretrain_steps=300, finetune_steps=100, batch=64, lr=3e-3, layer_decay=0.75, seeds=(1, 2, 3)
)
QUICK_TRANSFER = dict(
    pretrain_steps=4, finetune_steps=3, batch=16, lr=3e-3, layer_decay=0.75, seeds=(1,)
)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _models(pairs, sizes, small: dict | None = None):
    """``(label, size, "vit" | "rev", preset, constructor overrides)`` for every compile."""
    for label, vit_preset, rev_preset in pairs:
        for size in sizes:
            for key, preset, extra in (
                ("vit", vit_preset, {"pool": "cls"}),
                ("rev", rev_preset, {}),
            ):
                yield label, size, key, preset, {
                    **extra, "image_size": size, "unroll": 1, **(small or {})
                }


def measure_memory(pairs, sizes, *, batch: int, classes: int = 1000, small: dict | None = None):
    """``{(label, size): {"vit": CompiledMemory, "rev": CompiledMemory}}``, compiled here."""
    out = {}
    for label, size, key, preset, overrides in _models(pairs, sizes, small):
        row = out.setdefault((label, size), {})
        start = time.perf_counter()
        step, state, data = _report.abstract_train_step(
            preset, overrides, batch_size=batch, image_size=size, num_classes=classes,
            config=RECIPE,
        )
        row[key] = _report.compiled_step_memory(step, state, data)
        row[key + "_params"] = _report.num_params(state)
        print(
            f"  {label} {size}x{size} {key}: temp {row[key]['temp'] / 2**20:.1f} MiB "
            f"(compiled in {time.perf_counter() - start:.0f} s)", flush=True,
        )
    return out


def measure_on_target(args, pairs, sizes, *, batch: int, classes: int = 1000,
                      small: dict | None = None) -> tuple[dict, dict]:
    """`measure_memory`, compiled for ``args.target`` in `experiments.aot`'s child process, the
    state donated as the training loop does.

    Returns:
      ``(info, memory)``: the target's description and ``{(label, size): {"vit": record,
      "rev": record}}`` (records of `aot.compile_for_target`).
    """
    jobs = [
        aot.job(preset, overrides, batch=batch, size=size, num_classes=classes, donate=True,
                config=RECIPE, key=[label, size, key])
        for label, size, key, preset, overrides in _models(pairs, sizes, small)
    ]

    def progress(r: dict) -> None:
        label, size, key = r["key"]
        if "error" in r:
            print(f"  {label} {size}x{size} {key}: {r['error'][:300]}", flush=True)
            return
        print(
            f"  {label} {size}x{size} {key}: temp {r['temp'] / 2**20:.1f} MiB, total "
            f"{r['total'] / 2**20:.1f} MiB (compiled in {r.get('compile_s', 0):.0f} s"
            f"{', cached' if r.get('cached') else ''})", flush=True,
        )

    info, records = aot.compile_for_target(
        args.target, jobs, python=args.aot_python, processes=args.processes, cache=args.cache,
        on_record=progress,
    )
    aot.require_compiled(records, NAME)
    memory: dict = {}
    for r in records:
        label, size, key = r["key"]
        memory.setdefault((label, size), {})[key] = r
    return info, memory


# --------------------------------------------------------------------------------------------
# Toy transfer on digits
# --------------------------------------------------------------------------------------------


def transfer(pretrain_steps: int, finetune_steps: int, batch: int, lr: float,
             layer_decay: float, seeds=(1,), save_source: Path | None = None) -> dict:
    """The toy transfer; returns accuracies on digits 5-9 (test split) and the settings.

    One pretraining run; for each fine-tuning seed (the new head's and the scratch model's
    initialisation, the batch order) the converted model and the scratch model are trained.

    ``save_source``: also write the ViT pretrained on digits 0-4 there (timm .safetensors), the
    checkpoint `experiments/configs/digits_revvit_finetune.py` starts from.
    """
    arch = dict(in_channels=1, num_classes=5, unroll=True)
    xa, ya = data.digits_arrays("train", range(0, 5))
    xb, yb = data.digits_arrays("train", range(5, 10))
    xb_test, yb_test = data.digits_arrays("test", range(5, 10))

    source = vit.vit_tiny(pool="cls", **arch, rngs=nnx.Rngs(0))
    fit(source, optax.adamw(lr, weight_decay=0.05), xa, ya, steps=pretrain_steps, batch=batch)
    if save_source is not None:
        Path(save_source).parent.mkdir(parents=True, exist_ok=True)
        print(f"  wrote {pretrained.save_timm(source, save_source)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = pretrained.save_timm(source, Path(tmp) / "digits04.safetensors")
        loaded = pretrained.load_timm(path, num_heads=2, unroll=True)  # a timm checkpoint
    finetune_tx = optax.chain(
        optax.adamw(lr, weight_decay=0.05),
        finetune.scale_by_layer_decay(layer_decay),
        finetune.freeze(["embed"]),
    )
    runs = {"pretrained": [], "scratch": []}
    for seed in seeds:
        # New task: same 5 logits, a fresh head (the old one means digits 0-4).
        target = RevViT.from_vit(loaded)
        fresh_head = vit.revvit_tiny(**arch, rngs=nnx.Rngs(seed)).head
        nnx.update(target.head, nnx.state(fresh_head, nnx.Param))
        scratch = vit.revvit_tiny(**arch, rngs=nnx.Rngs(seed))
        fit(target, finetune_tx, xb, yb, steps=finetune_steps, batch=batch, seed=seed)
        fit(scratch, optax.adamw(lr, weight_decay=0.05), xb, yb, steps=finetune_steps,
            batch=batch, seed=seed)
        runs["pretrained"].append(accuracy(target, xb_test, yb_test))
        runs["scratch"].append(accuracy(scratch, xb_test, yb_test))
        print(f"  seed {seed}: pretrained {runs['pretrained'][-1]:.3f}, "
              f"scratch {runs['scratch'][-1]:.3f}", flush=True)
    return {
        **runs,
        "seeds": tuple(seeds),
        "source_on_0_4": accuracy(loaded, *data.digits_arrays("test", range(0, 5))),
        "test_examples": len(yb_test),
        **dict(pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, batch=batch,
               lr=lr, layer_decay=layer_decay),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _carries() -> str:
    """The conversions' carry arithmetic (`RevViT`'s default), for table headers."""
    params = inspect.signature(RevViT.__init__).parameters
    return (
        f"RevViT arithmetic={params['arithmetic'].default!r}, "
        f"exact_every={params['exact_every'].default!r}"
    )


def to_markdown(memory: dict | None, result: dict | None, *, batch: int, command: str) -> str:
    parts = [
        _report.header(
            "Fine-tuning pretrained ViTs: ViT vs its RevViT conversion",
            f"compiled trainer step (AdamW, layer decay 0.75, frozen embedding, float32, rolled "
            f"scans, {_carries()}), batch {batch}, 1000 classes",
            command,
        )
    ]
    if memory:
        rows = []
        for (label, size), row in memory.items():
            vit_t, rev_t = row["vit"]["temp"], row["rev"]["temp"]
            rows.append([
                label, f"{size}x{size}", _report.fmt_mib(vit_t), _report.fmt_mib(rev_t),
                f"{rev_t / vit_t:.3f}", _report.fmt_mib(row["vit"]["argument"]),
                _report.fmt_mib(row["rev"]["argument"]),
            ])
        parts.append(
            f"## Memory ({jax.default_backend().upper()} compile)\n\n"
            "Temporary bytes are the activations and the backward's working set; arguments "
            "are parameters, AdamW moments and the batch. "
            + (
                "Compiled by XLA:CPU on this host: its buffer assignment, not a GPU's (`--target "
                "h100` compiles the same steps for an H100). Where "
                "parameters are large XLA can place activations inside the gradient output "
                "buffers, which temporary bytes do not count.\n\n"
                if jax.default_backend() == "cpu" else "\n\n"
            )
            + _report.markdown_table(
                ["model", "image", "ViT temp MiB", "RevViT temp MiB", "RevViT / ViT",
                 "ViT args MiB", "RevViT args MiB"], rows,
            )
        )
    if result:
        parts.append(
            "## Toy transfer (digits)\n\n"
            f"A tiny ViT (8x8, patch 2, D 32, 2 blocks) pretrained {result['pretrain_steps']} "
            f"steps on digits 0-4 (its own test accuracy {result['source_on_0_4']:.3f}), "
            "saved as a timm .safetensors, loaded back, converted with RevViT.from_vit and "
            f"fine-tuned {result['finetune_steps']} steps on digits 5-9 (new head, layer decay "
            f"{result['layer_decay']}, frozen embedding, AdamW lr {result['lr']}, batch "
            f"{result['batch']}), against the same RevViT from scratch for the same steps "
            f"(AdamW, nothing frozen); fine-tuning seeds {list(result['seeds'])}.\n\n"
            + _report.markdown_table(
                ["start", f"test accuracy on digits 5-9 ({result['test_examples']} images), "
                 "mean", "per seed"],
                [[label, f"{np.mean(result[key]):.3f}",
                  ", ".join(f"{a:.3f}" for a in result[key])]
                 for label, key in (("pretrained on 0-4, converted", "pretrained"),
                                    ("scratch", "scratch"))],
            )
        )
    return "\n\n".join(parts) + "\n"


def to_markdown_target(memory: dict, info: dict, target: aot.Target, *, batch: int,
                       classes: int, command: str) -> str:
    """The memory part compiled for ``target``: temporary and total bytes, ViT vs RevViT."""
    details = (
        f"compiled trainer step (AdamW, layer decay 0.75, frozen embedding, float32, rolled "
        f"scans, {_carries()}, state donated as in the training loop), batch {batch}, "
        f"{classes} classes. "
        + aot.lower_bound_note(target)
    )
    rows = []
    for (label, size), row in memory.items():
        vit_r, rev_r = row["vit"], row["rev"]
        rows.append([
            label, f"{size}x{size}", _report.fmt_mib(vit_r["temp"]), _report.fmt_mib(rev_r["temp"]),
            f"{rev_r['temp'] / vit_r['temp']:.3f}", _report.fmt_mib(vit_r["total"]),
            _report.fmt_mib(rev_r["total"]), f"{rev_r['total'] / vit_r['total']:.3f}",
        ])
    gemm = (
        " GEMMs are cuBLAS calls (the XLA_FLAGS in the header): without a device XLA cannot "
        "autotune its Triton GEMM fusions, and their untuned default tiling does not compile "
        "for these models; a real run autotunes between cuBLAS and Triton, whose compiled bytes "
        "agree to well under 1 % where both compile."
        if target.platform == "cuda" else ""
    )
    return "\n\n".join([
        _report.target_header(
            "Fine-tuning pretrained ViTs: ViT vs its RevViT conversion", details, command,
            aot.describe(target, info),
        ),
        f"## Memory ({target.description}, compiled)",
        "Temporary bytes are the activations and the backward's working set; the total adds "
        "the arguments (parameters, AdamW moments, the batch) and the outputs, less what the "
        "donated state shares with them: what the step needs on the device." + gemm,
        _report.markdown_table(
            ["model", "image", "ViT temp MiB", "RevViT temp MiB", "RevViT / ViT temp",
             "ViT total MiB", "RevViT total MiB", "RevViT / ViT total"], rows,
        ),
    ]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory part")
    parser.add_argument("--no-transfer", action="store_true", help="skip the transfer part")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument(
        "--out-dir", type=Path, default=None,
        help="where the table goes (default: results/ for a full run; a run with --no-memory or "
        "--no-transfer writes no table unless given one, so the committed one stays whole)",
    )
    parser.add_argument(
        "--save-source", type=Path, default=None,
        help="also save the ViT pretrained on digits 0-4 here (.safetensors, timm's layout)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=[vit for _, vit, _ in PAIRS], default=None,
        help="the memory part for these ViT presets only (default: all)",
    )
    aot.add_target_arguments(parser)
    args = parser.parse_args(argv)
    pairs = tuple(p for p in PAIRS if not args.models or p[1] in args.models)
    command = _report.command_line(MODULE, argv)
    partial = args.no_memory or args.no_transfer
    if args.out_dir is None and (args.target or not partial):
        args.out_dir = Path("results")
    if args.target:  # the memory part only: the transfer is trained, and nothing runs here
        if args.no_memory:
            parser.error("--target compiles the memory part only: drop --no-memory")
        target = aot.get_target(args.target)
        if args.quick:
            batch, classes = 2, 10
            info, memory = measure_on_target(
                args, PAIRS[:1], (32,), batch=batch, classes=classes, small=QUICK_MODEL
            )
        else:
            batch, classes = args.batch, 1000
            info, memory = measure_on_target(args, pairs, SIZES, batch=batch, classes=classes)
        text = to_markdown_target(
            memory, info, target, batch=batch, classes=classes, command=command
        )
        _report.write_report(args.out_dir, f"{NAME}_{target.name}", text)
        return {"memory": memory, "transfer": None, "info": info}
    memory = result = None
    if not args.no_memory:
        if args.quick:
            memory = measure_memory(PAIRS[:1], (32,), batch=2, classes=10, small=QUICK_MODEL)
        else:
            memory = measure_memory(pairs, SIZES, batch=args.batch)
    if not args.no_transfer:
        settings = QUICK_TRANSFER if args.quick else TRANSFER
        result = transfer(**settings, save_source=args.save_source)
        print(f"  transfer: {result}", flush=True)
    text = to_markdown(memory, result, batch=2 if args.quick else args.batch, command=command)
    if args.out_dir is None:
        print(f"{NAME}: a partial run writes no table (pass --out-dir DIR for one)", flush=True)
    else:
        _report.write_report(args.out_dir, NAME, text)
    return {"memory": memory, "transfer": result}


if __name__ == "__main__":
    main()
