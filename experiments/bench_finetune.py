"""Benchmark: fine-tuning a pretrained ViT as itself vs as its reversible conversion.

Two parts:

1. **Memory**: the compiled fine-tuning train step (forward, backward, AdamW; the trainer's
   step, abstract shapes, nothing allocated, rolled scans as GPU/TPU run them) of ViT-S/16 and
   ViT-B/16 (class token, timm's layout) against `RevViT.from_vit` of the same model, at
   224x224 and 384x384. On CPU the bytes are XLA:CPU's buffer assignment (temporary bytes
   compare the activation memory); ``--target h100`` would need the CUDA ahead-of-time venv.
2. **Toy transfer** (the notebook ``05_finetune_pretrained``'s experiment): a tiny ViT
   pretrained on digits 0-4, exported to timm's format, loaded back and converted to a RevViT,
   fine-tuned on digits 5-9 (new head, layer decay, frozen embedding), against the same RevViT
   trained from scratch for the same steps; test accuracy on digits 5-9.

    python -m experiments.bench_finetune                  # both parts (CPU: ~10 minutes)
    python -m experiments.bench_finetune --no-memory      # the transfer only
    python -m experiments.bench_finetune --quick          # seconds: tiny sizes, for tests
    python -m experiments.bench_finetune --no-memory --save-source workdirs/digits04_vit.safetensors
                                  # also keep the pretrained ViT (digits_revvit_finetune's start)

Writes ``<out-dir>/bench_finetune.md``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import _report
from revjax import RevViT, finetune, pretrained, train, vit

NAME = "bench_finetune"
MODULE = f"experiments.{NAME}"

# (label, ViT preset, RevViT preset: the conversion has the preset's architecture)
PAIRS = (("ViT-S/16", "vit_s16", "revvit_s16"), ("ViT-B/16", "vit_b16", "revvit_b16"))
SIZES = (224, 384)
BATCH = 32

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


def _abstract_step(preset: str, overrides: dict, *, batch: int, size: int, classes: int):
    """The trainer's fine-tuning train step for a preset, abstract (`_report.abstract_train_step`'s
    recipe with AdamW, layer decay 0.75 and a frozen embedding)."""
    cfg = train.TrainConfig(
        model=preset, model_overrides=overrides, optimizer="adamw", learning_rate=1e-4,
        weight_decay=0.05, lr_schedule="cosine", warmup_steps=1, num_steps=10,
        layer_decay=0.75, freeze=("embed",),
    )
    graphdef, state, tx = train.abstract_train_state(cfg, classes, 3)
    step = jax.jit(train.make_train_step(graphdef, tx))
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }
    return step, state, batch_shapes


def measure_memory(pairs, sizes, *, batch: int, classes: int = 1000, small: dict | None = None):
    """``{(label, size): {"vit": CompiledMemory, "rev": CompiledMemory}}``."""
    out = {}
    for label, vit_preset, rev_preset in pairs:
        for size in sizes:
            row = {}
            for key, preset, extra in (
                ("vit", vit_preset, {"pool": "cls"}),
                ("rev", rev_preset, {}),
            ):
                overrides = {**extra, "image_size": size, "unroll": 1, **(small or {})}
                start = time.perf_counter()
                step, state, data = _abstract_step(
                    preset, overrides, batch=batch, size=size, classes=classes
                )
                row[key] = _report.compiled_step_memory(step, state, data)
                row[key + "_params"] = _report.num_params(state)
                print(
                    f"  {label} {size}x{size} {key}: temp {row[key]['temp'] / 2**20:.1f} MiB "
                    f"(compiled in {time.perf_counter() - start:.0f} s)", flush=True,
                )
            out[(label, size)] = row
    return out


# --------------------------------------------------------------------------------------------
# Toy transfer on digits
# --------------------------------------------------------------------------------------------


def digits_split(classes: range, seed: int = 0):
    """scikit-learn's digits of ``classes`` as ``(x_train, y_train, x_test, y_test)``: images
    [N, 8, 8, 1] in [0, 1], labels renumbered from 0; a seeded 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.isin(data.target, list(classes))
    x = (data.images[keep] / 16.0).astype(np.float32)[..., None]
    y = (data.target[keep] - classes.start).astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n = int(0.8 * len(y))
    return x[:n], y[:n], x[n:], y[n:]


def fit(model, tx, x, y, *, steps: int, batch: int, seed: int = 0):
    """Trains ``model`` in place on (x, y) with ``tx`` for ``steps`` random batches."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest, copy=True)(xb, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(y), batch)
        params, opt_state, _ = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    nnx.update(model, params)
    return model


def accuracy(model, x, y) -> float:
    logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(x))
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y))


def transfer(pretrain_steps: int, finetune_steps: int, batch: int, lr: float,
             layer_decay: float, seeds=(1,), save_source: Path | None = None) -> dict:
    """The toy transfer; returns accuracies on digits 5-9 (test split) and the settings.

    One pretraining run; for each fine-tuning seed (the new head's and the scratch model's
    initialisation, the batch order) the converted model and the scratch model are trained.

    ``save_source``: also write the ViT pretrained on digits 0-4 there (timm .safetensors), the
    checkpoint `experiments/configs/digits_revvit_finetune.py` starts from.
    """
    arch = dict(in_channels=1, num_classes=5, unroll=True)
    xa, ya, _, _ = digits_split(range(0, 5))
    xb, yb, xb_test, yb_test = digits_split(range(5, 10))

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
        "source_on_0_4": accuracy(loaded, *digits_split(range(0, 5))[2:]),
        "test_examples": len(yb_test),
        **dict(pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, batch=batch,
               lr=lr, layer_decay=layer_decay),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def to_markdown(memory: dict | None, result: dict | None, *, batch: int, command: str) -> str:
    parts = [
        _report.header(
            "Fine-tuning pretrained ViTs: ViT vs its RevViT conversion",
            f"compiled trainer step (AdamW, layer decay 0.75, frozen embedding, float32, rolled "
            f"scans), batch {batch}, 1000 classes",
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
                "Compiled by XLA:CPU on this host: its buffer assignment, not a GPU's (the "
                "H100 target needs the CUDA ahead-of-time venv, `make aot-venvs`). Where "
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory part")
    parser.add_argument("--no-transfer", action="store_true", help="skip the transfer part")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument(
        "--save-source", type=Path, default=None,
        help="also save the ViT pretrained on digits 0-4 here (.safetensors, timm's layout)",
    )
    args = parser.parse_args(argv)
    memory = result = None
    if not args.no_memory:
        if args.quick:  # two blocks of width 64 at 32x32: the same code, seconds to compile
            small = dict(embed_dim=64, depth=2, num_heads=2)
            memory = measure_memory(PAIRS[:1], (32,), batch=2, classes=10, small=small)
        else:
            memory = measure_memory(PAIRS, SIZES, batch=args.batch)
    if not args.no_transfer:
        settings = QUICK_TRANSFER if args.quick else TRANSFER
        result = transfer(**settings, save_source=args.save_source)
        print(f"  transfer: {result}", flush=True)
    text = to_markdown(
        memory, result, batch=2 if args.quick else args.batch,
        command=_report.command_line(MODULE, argv),
    )
    _report.write_report(args.out_dir, NAME, text)
    return {"memory": memory, "transfer": result}


if __name__ == "__main__":
    main()
