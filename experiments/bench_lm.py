"""Benchmark: RevGPT vs its GPT twin on character-level Shakespeare, memory, step time, exactness.

Four measurements, each its own subcommand, each writing ``<out-dir>/bench_lm_<what>.md``:

* ``accuracy``: nanoGPT's CPU recipe (4 blocks, 4 heads, width 128, context 64, batch 12,
  2000 iterations, dropout 0, AdamW lr 1e-3 -> 1e-4 cosine after nanoGPT's 100 warmup steps
  (from lr / 101), beta2 0.99, weight decay 0.1 on the kernels and both embeddings as the
  trainer's, gradient clip 1.0, the exact GELU) on ``shakespeare_char`` (prepare it first:
  ``python -m revjax.prepare shakespeare_char``), GPT and RevGPT for each seed; validation loss
  over 2,400 fixed windows of the validation split (nanoGPT: 200 random batches of 12).
  Target: RevGPT within 0.03 of GPT, both <= 1.88 (nanoGPT's figure on tiny-shakespeare).
* ``finetune``: a GPT of that shape pretrained with that recipe on
  ``shakespeare_char_pretrain`` (every work but four plays), converted with `RevGPT.from_gpt`
  and fine-tuned on the four held-out plays (``shakespeare_char_heldout``, the same
  vocabulary), against the same RevGPT trained from scratch on them for the same steps and the
  GPT fine-tuned without conversion; held-out validation loss (prepare both datasets first).
* ``recipe``: the trainer's configs (default the GPU recipe's, ``shakespeare_char_gpt_gpu``
  and ``shakespeare_char_revgpt_gpu``) for ``--steps`` steps: validation loss, step time and
  device peak (``experiments/gpu_check.py``'s language-model stage; refuses the CPU unless
  ``--allow-cpu``).
* ``memory``: temporary bytes of the compiled train step (forward, backward, AdamW update) of
  GPT, GPT with ``remat="full"``, GPT with ``remat="dots"`` and RevGPT, over depth and context,
  for a width (``--width 768``: GPT-2 small's blocks; ``2048``: the 1.3B pair's). Compiled for
  the CPU here, or ahead of time for an NVIDIA H100 (``--target h100``: needs an interpreter
  with ``jax[cuda12]``, ``--python``; nothing runs). bfloat16 compute, float32 parameters,
  rolled scans; on the H100 ``attention="cudnn"`` (the fused kernel).
* ``speed``: CPU step time of RevGPT, GPT + full remat and plain GPT, interleaved medians.
* ``exact``: RevGPT's rebuild of its input from its output, fixed-point streams, float32 and
  bfloat16 compute: elements whose bits differ (`revjax.inverse_sequence`).

    python -m experiments.bench_lm accuracy --seeds 0 1 2 --data-dir DIR
    python -m experiments.bench_lm accuracy --seeds 2 --merge results/bench_lm_accuracy.md
    python -m experiments.bench_lm finetune --pretrain-steps 2000 --steps 500 --data-dir DIR
    python -m experiments.bench_lm recipe --steps 500        # on a GPU
    python -m experiments.bench_lm memory --width 768 --depths 6 12 24 48 --contexts 1024
    python -m experiments.bench_lm memory --target h100 --python .venv-aot-cuda/bin/python
    python -m experiments.bench_lm speed
    python -m experiments.bench_lm exact
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "bench_lm"
MODULE = f"experiments.{NAME}"

# nanoGPT's CPU recipe (its README's command line for shakespeare_char).
RECIPE = dict(batch=12, context=64, steps=2000, lr=1e-3, min_lr=1e-4, warmup=100, b2=0.99,
              weight_decay=0.1, clip=1.0, eval_windows=2400)
VARIANTS = {  # memory / speed lines: (label, class, overrides)
    "gpt": ("GPT", "GPT", {}),
    "remat": ("GPT + full remat", "GPT", {"remat": "full"}),
    "dots": ("GPT + dots saveable", "GPT", {"remat": "dots"}),
    "rev": ("RevGPT", "RevGPT", {}),
}
# The memory tables add two RevGPTs: with float streams, and with fixed-point streams rebuilt
# from the pullback's recomputation (``blocks.rebuild="pullback"``). The default fixed-point
# rebuild evaluates F and G in isolation (exact on any compiler), which on GPUs holds more of a
# unit's activations at once.
MEMORY_VARIANTS = {
    **VARIANTS,
    "rev_pullback": ("RevGPT, pullback rebuild", "RevGPT", {"rebuild": "pullback"}),
    "rev_float": ("RevGPT, float", "RevGPT", {"arithmetic": "float"}),
}


# --------------------------------------------------------------------------------------------
# A language-model train step (the trainer's recipe, self-contained for the benchmarks)
# --------------------------------------------------------------------------------------------


def lm_optimizer(steps: int, lr: float, min_lr: float, warmup: int, b2: float,
                 weight_decay: float, clip: float):
    """nanoGPT's optimizer: clipping, then AdamW on its schedule (the update at step t, from 0,
    runs at ``lr * (t + 1) / (warmup + 1)`` during the warmup, then a cosine from ``lr`` at
    ``warmup`` to ``min_lr`` at ``steps``: the trainer's ``warmup_start="nanogpt"``), weight
    decay on what the trainer decays for a language model (`revjax.train.weight_decay_mask`:
    the kernels and both embeddings)."""
    import functools

    import optax

    from revjax import GPT
    from revjax.train import weight_decay_mask
    from revjax.train.optim import cosine_decay, with_warmup

    schedule = with_warmup(cosine_decay(lr, min_lr, warmup, steps), warmup, start="nanogpt")
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, b1=0.9, b2=b2, weight_decay=weight_decay,
                    mask=functools.partial(weight_decay_mask, model=GPT)),
    )


def lm_loss(graphdef, params, rest, batch, key=None):
    """Mean next-token cross-entropy of ``batch`` (``tokens``, ``targets`` [B, T]), through the
    model's ``token_losses`` (the head and the loss in chunks of its ``logits_chunk`` tokens,
    as the trainer's step)."""
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, params, rest, copy=True)
    train = key is not None and model.uses_dropout_rng
    losses, _ = model.token_losses(batch["tokens"], batch["targets"], train=train,
                                   rngs=key if train else None)
    return jnp.mean(losses.astype(jnp.float32))


def make_step(graphdef, tx):
    import jax
    import optax

    def step(params, rest, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, rest, batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def build(cls_name: str, seed: int = 0, **options):
    from flax import nnx

    import revjax

    return getattr(revjax, cls_name)(rngs=nnx.Rngs(seed), **options)


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------


def train_lm(model, tokens, *, steps: int, seed: int, warmup: int = RECIPE["warmup"]):
    """Trains ``model`` with nanoGPT's CPU recipe (`RECIPE`, ``steps`` iterations, ``warmup``
    of them but at most half) on random windows of ``tokens`` drawn with ``seed``; returns
    ``(model, last train loss, seconds)``."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from revjax.data.text import TextTrainInput

    r = RECIPE
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    warmup = min(warmup, steps // 2)
    tx = lm_optimizer(steps, r["lr"], r["min_lr"], warmup, r["b2"], r["weight_decay"], r["clip"])
    opt_state = tx.init(params)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    inp = TextTrainInput(tokens, batch_size=r["batch"], context=model.context_length, seed=seed,
                         batch_sharding=NamedSharding(mesh, P("data")))
    step = make_step(graphdef, tx)

    @jax.jit
    def train_step(params, opt_state, k, tokens):
        return step(params, rest, opt_state, inp.batch({"tokens": tokens}, k))

    start = time.perf_counter()
    loss = float("nan")
    for k in range(steps):
        params, opt_state, loss = train_step(params, opt_state, np.int32(k), inp.data["tokens"])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    return nnx.merge(graphdef, params, rest), float(loss), seconds


def eval_lm(model, tokens, windows: int = RECIPE["eval_windows"]) -> float:
    """Mean next-token loss over ``windows`` fixed windows of ``tokens`` (`TextEvalInput`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from revjax.data.text import TextEvalInput

    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    ev = TextEvalInput(tokens, batch_size=240, context=model.context_length,
                       num_windows=windows, batch_sharding=NamedSharding(mesh, P("data")))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_sum(params, batch):
        logits = nnx.merge(graphdef, params, rest, copy=True)(batch["tokens"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(jnp.mean(losses, axis=1) * batch["mask"])

    return sum(float(loss_sum(params, b)) for b in ev) / ev.num_windows


def char_model(cls_name: str, seed: int, vocab_size: int, bias: bool = True):
    """nanoGPT's CPU character model (4 blocks, 4 heads, width 128, context 64, the exact erf
    GELU of its ``nn.GELU()``); ``bias=False``: no biases in the linear layers and LayerNorms
    (nanoGPT's train.py default)."""
    return build(cls_name, seed, vocab_size=vocab_size, context_length=RECIPE["context"],
                 embed_dim=128, depth=4, num_heads=4, bias=bias, mlp="gelu_exact")


def train_one(cls_name: str, seed: int, data, args) -> dict:
    model = char_model(cls_name, seed, data.vocab_size, getattr(args, "bias", True))
    model, loss, seconds = train_lm(model, data.train, steps=args.steps, seed=seed)
    return {"model": cls_name, "seed": seed, "val_loss": eval_lm(model, data.val),
            "train_loss": loss, "seconds": seconds, "steps": args.steps}


def run_accuracy(args) -> None:
    from revjax.data.text import load_text_dataset

    data = load_text_dataset("shakespeare_char", args.data_dir)
    records, args.merged_from = [], None
    if args.merge:  # the runs of other seeds or models from an earlier report (its JSON block)
        earlier = Path(args.merge).read_text()
        block = earlier.split("```json\n", 1)[1].split("\n```", 1)[0]
        records = [r for r in json.loads(block)
                   if r["seed"] not in args.seeds or r["model"] not in args.models]
        args.merged_from = earlier.split("`", 2)[1]  # the earlier command, from the header
        args.merged_runs = ", ".join(f"{r['model']} seed {r['seed']}" for r in records)
    for seed in args.seeds:
        for cls_name in args.models:
            rec = train_one(cls_name, seed, data, args)
            print(json.dumps(rec), flush=True)
            records.append(rec)
            _accuracy_report(args, data, records)  # after every run: partial results survive


def _accuracy_report(args, data, records) -> None:
    import numpy as np

    from experiments import _report
    from revjax.data.text import unigram_entropy

    rows, summary = [], {}
    for cls_name in ("GPT", "RevGPT"):
        losses = [r["val_loss"] for r in records if r["model"] == cls_name]
        secs = [r["seconds"] for r in records if r["model"] == cls_name]
        if not losses:
            continue
        summary[cls_name] = float(np.mean(losses))
        rows.append([cls_name, " / ".join(f"{v:.4f}" for v in losses), f"{np.mean(losses):.4f}",
                     f"{np.std(losses):.4f}", f"{np.mean(secs):.0f}"])
    h = unigram_entropy(data.val, data.vocab_size)
    diff = ""
    if len(summary) == 2:
        d = summary["RevGPT"] - summary["GPT"]
        above = [k for k, v in summary.items() if v > 1.88]
        diff = (f"RevGPT - GPT: {d:+.4f} nats (target within 0.03: "
                f"{'met' if abs(d) <= 0.03 else 'not met'}); mean validation loss <= 1.88: "
                + (f"{' and '.join(above)} above it. " if above else "both. "))
    seeds = sorted({r["seed"] for r in records})
    text = "\n\n".join([
        _report.header("RevGPT vs GPT, nanoGPT's CPU recipe on shakespeare_char",
                       f"{args.steps} iterations, seeds {seeds}, nanoGPT's warmup (lr / 101 "
                       "at the first step), exact GELU, weight decay on the kernels and both "
                       "embeddings"
                       + ("" if args.bias else ", no biases (nanoGPT's train.py: bias=False)"),
                       _report.command_line(MODULE, args.argv)),
        _report.markdown_table(
            ["model", "validation loss per seed", "mean", "std", "train s / run"], rows),
        f"{diff}Unigram entropy of the validation split: {h:.4f} nats. Train seconds include "
        "the compile and a shared machine's load."
        + (f" The runs {args.merged_runs} are those of `{args.merged_from}` (--merge)."
           if args.merged_from else ""),
        "```json\n" + json.dumps(records) + "\n```",
    ])
    suffix = "" if args.bias else "_nobias"
    _report.write_report(Path(args.out_dir), f"{NAME}_accuracy{suffix}", text)


# --------------------------------------------------------------------------------------------
# memory (compiled, CPU or ahead of time for an H100)
# --------------------------------------------------------------------------------------------


def memory_record(variant: str, width: int, depth: int, context: int, batch: int,
                  attention: str, step_kind: str = "grad", logits_chunk: int | None = None
                  ) -> dict:
    """Compiles one step on shapes only; returns its memory_analysis() figures.

    ``step_kind``: ``"grad"`` (loss and parameter gradients: the gradients are outputs, so
    temp is the activations' working set) or ``"train"`` (with the AdamW update: temp also holds
    the gradients). ``logits_chunk``: every variant's (None: the models' automatic chunk).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import revjax

    _, cls_name, overrides = MEMORY_VARIANTS[variant]
    overrides = dict(overrides)
    rebuild = overrides.pop("rebuild", None)  # the sequence's attribute, not a model option
    options = dict(vocab_size=50257, context_length=context, embed_dim=width, depth=depth,
                   num_heads=width // 64, dtype=jnp.bfloat16, unroll=1, attention=attention,
                   logits_chunk=logits_chunk, **overrides)
    holder = {}

    def init():
        model = build(cls_name, 0, **options)
        if rebuild is not None:
            model.blocks.rebuild = rebuild
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = lm_optimizer(1000, 1e-3, 1e-4, 10, 0.99, 0.1, 1.0)
        holder["graphdef"], holder["tx"] = graphdef, tx
        return params, rest, tx.init(params)

    params, rest, opt_state = jax.eval_shape(init)
    if step_kind == "train":
        step = make_step(holder["graphdef"], holder["tx"])
    else:
        def step(params, rest, opt_state, batch):
            return jax.value_and_grad(lambda p: lm_loss(holder["graphdef"], p, rest, batch))(
                params)
    batch = {k: jax.ShapeDtypeStruct((batch, context), jnp.int32) for k in ("tokens", "targets")}
    devices = _target_devices()
    if devices is not None:
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        rep = NamedSharding(Mesh(devices, ("data",)), P())
        place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)  # noqa: E731
        params, rest, opt_state, batch = jax.tree.map(place, (params, rest, opt_state, batch))
    start = time.perf_counter()
    donate = (0, 2) if step_kind == "train" else ()
    # Traced as for the target's platform: the fixed-point rebuild's isolation differs between
    # CPU (conditionals) and GPUs (barriers), and this process's backend is the CPU.
    with revjax.compiling_for("cpu" if devices is None else "gpu"):
        lowered = jax.jit(step, donate_argnums=donate).lower(params, rest, opt_state, batch)
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    return {"variant": variant, "step": step_kind, "width": width, "depth": depth,
            "context": context, "logits_chunk": logits_chunk,
            "batch": batch["tokens"].shape[0], "temp": m.temp_size_in_bytes,
            "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "compile_s": time.perf_counter() - start}


_DEVICES: list = []


def _target_devices():
    """The H100 target's device when this process compiles for it (``REVJAX_LM_TARGET``)."""
    if os.environ.get("REVJAX_LM_TARGET") != "h100":
        return None
    if not _DEVICES:
        import numpy as np
        from jax.experimental import topologies

        config = (ROOT / "experiments" / "targets" / "h100_sxm.txtpb").read_text()
        topo = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology="1x1x1")
        _DEVICES.append(np.asarray(list(topo.devices)[:1]))
    return _DEVICES[0]


def run_memory(args) -> None:
    from experiments import _report
    from revjax._lm_loss import resolve_chunk

    # Depth sweep at the first context, context sweep at --context-depth.
    grid = [(d, args.contexts[0]) for d in args.depths]
    grid += [(args.context_depth, c) for c in args.contexts[1:]]
    specs = [(v, args.width, d, c) for d, c in grid for v in MEMORY_VARIANTS]
    records = []
    if args.target == "h100":
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="-1", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1",
                   REVJAX_LM_TARGET="h100", PYTHONPATH=str(ROOT))
        env.pop("JAX_PLATFORMS", None)
        env.pop("XLA_FLAGS", None)
        for spec in specs:
            cmd = [args.python or sys.executable, "-m", MODULE, "memory-child",
                   json.dumps([*spec, args.batch, "cudnn", args.step,
                                                     args.logits_chunk])]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            if done.returncode or not lines:
                print(done.stderr[-2000:], file=sys.stderr)
                records.append({"variant": spec[0], "width": spec[1], "depth": spec[2],
                                "context": spec[3], "temp": None})
                continue
            records.append(json.loads(lines[-1]))
            print(lines[-1], flush=True)
    else:
        for spec in specs:
            records.append(memory_record(*spec, args.batch, "xla", args.step,
                                         args.logits_chunk))
            print(json.dumps(records[-1]), flush=True)
    table = {(r["variant"], r["depth"], r["context"]): r["temp"] for r in records}
    rows = []
    for d, c in grid:
        temps = {v: table.get((v, d, c)) for v in MEMORY_VARIANTS}
        ratios = [f"{temps[v] / temps['remat']:.2f}" if temps[v] and temps["remat"] else "-"
                  for v in ("rev", "rev_pullback", "rev_float")]
        rows.append([f"{d} x {c}", *(_report.fmt_mib(temps[v]) for v in MEMORY_VARIANTS),
                     *ratios])
    where = "H100 (deviceless AOT compile, cuDNN attention)" if args.target == "h100" else "CPU"
    text = "\n\n".join([
        _report.header(f"LM train-step temp memory (MiB), {where}",
                       f"width {args.width}, heads {args.width // 64}, vocabulary 50257, batch "
                       f"{args.batch}, bf16 compute, f32 params, rolled, head and loss in chunks "
                       f"of {resolve_chunk(args.logits_chunk, 50257)} tokens; step: {args.step} "
                       "(grad: loss and gradients, the gradients are outputs; train: with the "
                       "AdamW update, gradients in temp)",
                       _report.command_line(MODULE, args.argv)),
        _report.markdown_table(["depth x context", *(v[0] for v in MEMORY_VARIANTS.values()),
                                *(f"{MEMORY_VARIANTS[v][0]} / full remat"
                                  for v in ("rev", "rev_pullback", "rev_float"))], rows),
        "```json\n" + json.dumps(records) + "\n```",
    ])
    suffix = f"_{args.target}" if args.target != "cpu" else ""
    batch = f"_b{args.batch}" if args.batch != 1 else ""
    name = f"{NAME}_memory_w{args.width}{batch}_{args.step}{suffix}"
    _report.write_report(Path(args.out_dir), name, text)


# --------------------------------------------------------------------------------------------
# speed and exactness (CPU)
# --------------------------------------------------------------------------------------------


def run_speed(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments import _report
    from revjax.measure import time_interleaved

    options = dict(vocab_size=65, context_length=args.context, embed_dim=args.width,
                   depth=args.depth, num_heads=args.width // 32)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.context), 0, 65)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    fns = {}
    for name, (label, cls_name, overrides) in VARIANTS.items():
        if name == "dots":
            continue
        model = build(cls_name, 0, **options, **overrides)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = lm_optimizer(1000, 1e-3, 1e-4, 10, 0.99, 0.1, 1.0)
        fns[label] = (jax.jit(make_step(graphdef, tx)), (params, rest, tx.init(params), batch))
    times = time_interleaved(fns, warmup=2, repeats=args.repeats)
    med = {k: v["median"] for k, v in times.items()}
    rows = [[k, _report.fmt_ms(v)] for k, v in med.items()]
    text = "\n\n".join([
        _report.header("LM train-step time on CPU (median of interleaved rounds)",
                       f"width {args.width}, depth {args.depth}, context {args.context}, batch "
                       f"{args.batch}, float32, default unroll",
                       _report.command_line(MODULE, args.argv)),
        _report.markdown_table(["model", "step ms"], rows),
        f"RevGPT / GPT + full remat: {med['RevGPT'] / med['GPT + full remat']:.3f} (target "
        f"<= 1.10); RevGPT / GPT: {med['RevGPT'] / med['GPT']:.3f}.",
    ])
    _report.write_report(Path(args.out_dir), f"{NAME}_speed", text)


def run_exact(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import revjax
    from experiments import _report

    rows = []
    for dtype in ("float32", "bfloat16"):
        model = build("RevGPT", 0, vocab_size=65, context_length=args.context,
                      embed_dim=args.width, depth=args.depth, num_heads=args.width // 32,
                      dtype=jnp.dtype(dtype))
        tokens = jax.random.randint(jax.random.key(1), (args.batch, args.context), 0, 65)

        @nnx.jit
        def rebuild(model, tokens):
            h = model._embed(tokens)
            y1, y2 = model.streams(tokens)
            f_def, f_state = nnx.split(model.blocks.f)
            g_def, g_state = nnx.split(model.blocks.g)
            f, g = revjax.pure_call(f_def), revjax.pure_call(g_def)
            x1, x2 = revjax.inverse_sequence(
                lambda s, x: f(s, x)[0], lambda s, x: g(s, x)[0], f_state, g_state, y1, y2,
                arithmetic="fixed", frac_bits=model.frac_bits)
            grid = lambda a: jnp.round(a.astype(jnp.float32) * 2.0**model.frac_bits)  # noqa
            off = jnp.sum(grid(x1) != grid(h)) + jnp.sum(grid(x2) != grid(h))
            return off, jnp.maximum(jnp.max(jnp.abs(y1)), jnp.max(jnp.abs(y2)))

        off, peak = rebuild(model, tokens)
        rows.append([dtype, int(off), 2 * h_size(args), f"{float(peak):.2f}"])
    text = "\n\n".join([
        _report.header("RevGPT rebuild exactness (fixed-point streams, 16 fraction bits)",
                       f"width {args.width}, depth {args.depth}, context {args.context}, batch "
                       f"{args.batch}; input rebuilt from the output by revjax.inverse_sequence",
                       _report.command_line(MODULE, args.argv)),
        _report.markdown_table(["compute", "elements off", "elements", "largest |stream|"],
                               rows),
    ])
    _report.write_report(Path(args.out_dir), f"{NAME}_exact", text)


def h_size(args) -> int:
    return args.batch * args.context * args.width


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    acc.add_argument("--steps", type=int, default=RECIPE["steps"])
    acc.add_argument("--data-dir", default=None)
    acc.add_argument("--models", nargs="+", choices=("GPT", "RevGPT"), default=["GPT", "RevGPT"])
    acc.add_argument("--no-bias", dest="bias", action="store_false",
                     help="no biases (nanoGPT's train.py); writes bench_lm_accuracy_nobias.md")
    acc.add_argument("--merge", default=None, metavar="REPORT",
                     help="keep the runs of other seeds or models of an earlier report")
    ft = sub.add_parser("finetune")
    ft.add_argument("--seeds", type=int, nargs="+", default=[0])
    ft.add_argument("--pretrain-steps", type=int, default=RECIPE["steps"])
    ft.add_argument("--steps", type=int, default=500, help="fine-tuning iterations")
    ft.add_argument("--warmup", type=int, default=50, help="fine-tuning warmup iterations")
    ft.add_argument("--eval-windows", type=int, default=RECIPE["eval_windows"])
    ft.add_argument("--data-dir", default=None)
    rec = sub.add_parser("recipe", help="train configs for --steps steps (a GPU check)")
    rec.add_argument("--configs", nargs="+",
                     default=["shakespeare_char_gpt_gpu", "shakespeare_char_revgpt_gpu"])
    rec.add_argument("--steps", type=int, default=500)
    rec.add_argument("--quick", action="store_true", help="the configs' quick variants")
    rec.add_argument("--allow-cpu", action="store_true", help="run on the CPU too (tests)")
    rec.add_argument("--data-dir", default=None)
    mem = sub.add_parser("memory")
    mem.add_argument("--width", type=int, default=768)
    mem.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48])
    mem.add_argument("--contexts", type=int, nargs="+", default=[1024],
                     help="the depth sweep runs at the first; the others at --context-depth")
    mem.add_argument("--context-depth", type=int, default=12)
    mem.add_argument("--step", choices=("grad", "train"), default="grad")
    mem.add_argument("--batch", type=int, default=1)
    mem.add_argument("--logits-chunk", type=int, default=None,
                     help="tokens per chunk of every variant's head and loss (default: the "
                     "models' automatic chunk)")
    mem.add_argument("--target", choices=("cpu", "h100"), default="cpu")
    mem.add_argument("--python", default=None, help="interpreter with jax[cuda12] for h100")
    child = sub.add_parser("memory-child")
    child.add_argument("spec")
    for name in ("speed", "exact"):
        s = sub.add_parser(name)
        s.add_argument("--width", type=int, default=128)
        s.add_argument("--depth", type=int, default=8)
        s.add_argument("--context", type=int, default=256)
        s.add_argument("--batch", type=int, default=8)
        s.add_argument("--repeats", type=int, default=7)
    # --out-dir before the subcommand too (how experiments/gpu_check.py calls its stages)
    p.add_argument("--out-dir", dest="top_out_dir", default=None)
    for s in sub.choices.values():
        s.add_argument("--out-dir", default=None, help="default: results")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or args.top_out_dir or "results"
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.what == "memory-child":
        print(json.dumps(memory_record(*json.loads(args.spec))), flush=True)
        return
    from experiments._bench_lm_train import run_finetune, run_recipe

    {"accuracy": run_accuracy, "finetune": run_finetune, "recipe": run_recipe,
     "memory": run_memory, "speed": run_speed,
     "exact": run_exact}[args.what](args)


if __name__ == "__main__":
    main()
