"""Print text sampled from a language model a training run saved, or export its GPT.

    python -m experiments.sample --workdir workdirs/sc_revgpt
    python -m experiments.sample --workdir w --prompt "ROMEO:" --tokens 300 --temperature 0.8
    python -m experiments.sample --workdir workdirs/sc_gpt --save-gpt2 workdirs/sc_gpt/gpt2

The run's config is read from its latest checkpoint (the name it was trained with; ``--config``
names it when the checkpoint does not, ``--quick`` for a quick run), the parameters restored
into the model, and `revjax.generate` continues the prompt with the key-value cache.
``--save-gpt2 DIR`` writes a GPT run's model as a Hugging Face GPT-2 checkpoint instead
(``DIR/model.safetensors``, ``config.json``, and the dataset's ``vocab.json``): a fine-tuning
config's ``init_from`` (`RevGPT.from_gpt` converts it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def load_run(workdir: str, config_name: str | None = None, quick: bool = False,
             data_dir: str | None = None):
    """``(model, dataset, config)`` of the latest checkpoint in ``workdir``."""
    from flax import nnx

    from experiments.train import load_config
    from revjax.data import text
    from revjax.train import resilience
    from revjax.train.steps import abstract_train_state

    path = Path(workdir).expanduser().absolute()
    manager = resilience.checkpoint_manager(path, 1)
    try:
        step = manager.latest_step()
        if step is None:
            raise SystemExit(f"error: no checkpoint in {path}; train first "
                             "(python -m experiments.train --config ... --workdir ...).")
        record = resilience.read_record(manager, step) or {}
        name = config_name or record.get("name")
        if not name:
            raise SystemExit(f"error: the checkpoint in {path} does not name its config; pass "
                             "--config NAME.")
        name, *flags = name.split()  # a recorded name may read "shakespeare_char_gpt --quick"
        config = load_config(name, quick or "--quick" in flags)
        if data_dir is not None:
            config = dataclasses.replace(config, data_dir=data_dir)
        data = text.load_text_dataset(config.dataset, config.data_dir)
        graphdef, target, _ = abstract_train_state(config, data.vocab_size, 1)
        restored = resilience.restore_latest(manager, target, path)
    finally:
        manager.close()
    _, state, _ = restored
    return nnx.merge(graphdef, state.params, state.batch_stats), data, config


def save_gpt2(workdir: str, directory: str, config_name: str | None = None, quick: bool = False,
              data_dir: str | None = None) -> str:
    """Writes the GPT of the run in ``workdir`` as a GPT-2 checkpoint; returns its weights file."""
    import json
    import os

    import revjax
    from revjax import pretrained
    from revjax.data import text

    model, data, config = load_run(workdir, config_name, quick, data_dir)
    if not isinstance(model, revjax.GPT):
        raise SystemExit(f"error: the run in {workdir} trained a {type(model).__name__}; only a "
                         "GPT exports to GPT-2's format.")
    pretrained.save_gpt2(model, directory)
    source = os.path.join(text.default_text_dir(config.data_dir), config.dataset, "vocab.json")
    with open(source, encoding="utf-8") as f, open(
            os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as out:
        json.dump(json.load(f), out, ensure_ascii=False, indent=1)
    return os.path.join(directory, "model.safetensors")


def sample(workdir: str, prompt: str = "\n", tokens: int = 500, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 0, config_name: str | None = None,
           quick: bool = False, data_dir: str | None = None) -> str:
    """The prompt and ``tokens`` characters (or bytes) sampled from the run in ``workdir``."""
    import jax

    import revjax

    model, data, _ = load_run(workdir, config_name, quick, data_dir)
    ids = data.encode(prompt)
    out = revjax.generate(model, ids, tokens, temperature=temperature, top_k=top_k,
                          rngs=jax.random.key(seed))
    return data.decode(out)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", default=None, help="where the text dataset was prepared")
    p.add_argument("--save-gpt2", default=None, metavar="DIR",
                   help="write the run's GPT as a Hugging Face GPT-2 checkpoint into DIR instead "
                   "of sampling")
    args = p.parse_args(argv)
    if args.save_gpt2:
        path = save_gpt2(args.workdir, args.save_gpt2, args.config, args.quick, args.data_dir)
        print(f"wrote {path}")
        return path
    out = sample(args.workdir, args.prompt, args.tokens, args.temperature, args.top_k or None,
                 args.seed, args.config, args.quick, args.data_dir)
    sys.stdout.write(out + "\n")
    return out


if __name__ == "__main__":
    main()
