"""Thin entry point: parse flags, load a config, call `revjax.train.train_and_evaluate`.

    python -m experiments.train --config digits --workdir workdirs/digits
    python -m experiments.train --config cifar10_revnet38 --workdir w --set data_dir=~/tfds
    python -m experiments.train --config experiments/configs/digits.py --quick --workdir /tmp/w

``--config`` is a module name in ``experiments/configs`` or a path to a Python file defining
``get_config(quick=False)``. ``--set key=value`` overrides any `TrainConfig` field (values are
parsed as Python literals when possible, e.g. ``--set num_steps=100 --set lr_boundaries=(50,)``).

Exit status: 0 done; 2 a bad command line or config (``error: <what and the fix>``, no
traceback) or a dataset that is not prepared; 143 / 130 stopped by SIGTERM / SIGINT after saving
a checkpoint (it prints the step and the command that resumes: the same command); 1 any other
error inside training (with its traceback).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

from revjax.train import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_config(name: str, quick: bool = False):
    """Returns ``get_config(quick)`` of a config module name or a path to a config file."""
    path = Path(name)
    if path.suffix == ".py" and path.exists():
        spec = importlib.util.spec_from_file_location(f"revjax_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"experiments.configs.{name}")
        except ModuleNotFoundError:
            known = sorted(
                p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common")
            )
            raise ConfigError(
                f"Unknown config {name!r}. Known configs: {', '.join(known)} (or a path to a "
                ".py file with get_config)."
            ) from None
    return module.get_config(quick)


def apply_overrides(config, assignments):
    """Applies ``key=value`` strings to a frozen dataclass config."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(
                f"Bad --set {item!r}: expected KEY=VALUE, KEY one of {', '.join(sorted(fields))}."
            )
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if key == "data_dir" and isinstance(value, str):
            value = os.path.expanduser(value)
        changes[key] = value
    return dataclasses.replace(config, **changes)


def resume_command(args: argparse.Namespace) -> str:
    """The command that resumes this run: the same flags, the workdir made absolute."""
    config = args.config
    if Path(config).suffix == ".py":
        config = str(Path(config).resolve())
    words = [sys.executable, "-m", "experiments.train", "--config", config,
             "--workdir", str(Path(args.workdir).expanduser().absolute())]
    words += ["--quick"] if args.quick else []
    for item in args.set:
        words += ["--set", item]
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(words)}"


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Train a revjax config.")
    parser.add_argument("--config", default="digits", help="config module or .py path")
    parser.add_argument("--workdir", required=True, help="checkpoints and metrics go here")
    parser.add_argument("--quick", action="store_true", help="the config's tiny smoke variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from revjax.data import DatasetNotPreparedError
    from revjax.train import Preempted, train_and_evaluate

    try:  # bad names and values stop here, before anything runs
        config = apply_overrides(load_config(args.config, args.quick), args.set)
    except ConfigError as err:
        _fail(str(err))
    try:
        result = train_and_evaluate(config, args.workdir)
    except DatasetNotPreparedError as err:
        _fail(str(err))
    except Preempted as stop:
        import jax

        if jax.process_index() == 0:
            print(f"{stop.signal_name} at step {stop.step}: checkpoint saved in "
                  f"{stop.checkpoint}; resume with: {resume_command(args)}",
                  file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None
    summary = {
        "config": args.config,
        "model": config.model,
        "dataset": config.dataset,
        "step": result["step"],
        "eval_accuracy": round(result["eval_accuracy"], 4),
        "images_per_second": round(result.get("images_per_second", float("nan")), 1),
    }
    mem = result.get("memory")
    if mem and "model_plain" in mem:
        summary["activation_memory_saved_vs_plain"] = f"{mem['model_plain'] / mem['model']:.2f}x"
    if mem and "twin" in mem:
        summary[f"memory_vs_{config.twin_model}"] = f"{mem['model'] / mem['twin']:.2f}x"
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":  # the guard Grain's worker processes need
    main()
