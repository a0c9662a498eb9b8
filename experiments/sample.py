"""Print text sampled from a language model a training run saved.

    python -m experiments.sample --workdir workdirs/sc_revgpt
    python -m experiments.sample --workdir w --prompt "ROMEO:" --tokens 300 --temperature 0.8

The run's config is read from its latest checkpoint (the name it was trained with; ``--config``
names it when the checkpoint does not, ``--quick`` for a quick run), the parameters restored
into the model, and `revjax.generate` continues the prompt with the key-value cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def sample(workdir: str, prompt: str = "\n", tokens: int = 500, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 0, config_name: str | None = None,
           quick: bool = False, data_dir: str | None = None) -> str:
    """The prompt and ``tokens`` characters (or bytes) sampled from the run in ``workdir``."""
    import jax
    from flax import nnx

    import revjax
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
    model = nnx.merge(graphdef, state.params, state.batch_stats)
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
    args = p.parse_args(argv)
    out = sample(args.workdir, args.prompt, args.tokens, args.temperature, args.top_k or None,
                 args.seed, args.config, args.quick, args.data_dir)
    sys.stdout.write(out + "\n")
    return out


if __name__ == "__main__":
    main()
