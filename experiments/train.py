"""Thin entry point: parse flags, load a config, call `revjax.train.train_and_evaluate`.

    python -m experiments.train --config digits --workdir workdirs/digits
    python -m experiments.train --config cifar10_revnet38 --workdir w --set data_dir=~/tfds
    python -m experiments.train --config experiments/configs/digits.py --quick --workdir /tmp/w
    python ~/revjax/experiments/train.py --config digits --workdir w   # from any directory

``--config`` is a module name in ``experiments/configs``, a row of the paper's table
(`experiments.configs.paper`: ``cifar10_revnet38``...; ``--help`` lists them all, ``--describe
NAME`` prints one's target, expected time and commands) or a path to a Python file defining
``get_config(quick=False)``. ``--set key=value`` overrides any `TrainConfig`
field (``--list-keys`` lists them with their defaults; values are parsed as Python literals when
possible, e.g. ``--set num_steps=100 --set lr_boundaries=(50,)``).

Exit status: 0 done; 2 a bad command line or config (``error: <what and the fix>``, no
traceback; misspelt names get the closest known one) or a dataset that is not prepared; 143 /
130 stopped by SIGTERM / SIGINT (after saving a checkpoint it prints the step and the command
that resumes: the same command; before the first step it says that nothing was trained, or
that the checkpoint it would have resumed is untouched); 1 any other error inside training
(with its traceback). A second SIGTERM / SIGINT ends the process at once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import sys
import warnings
from pathlib import Path

if not __package__:  # run as a file from any directory: the checkout's root makes `experiments`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.configs import paper  # noqa: E402
from revjax.train import ConfigError  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Modules in CONFIG_DIR that are not configs themselves: the shared recipe and the paper's table.
NOT_CONFIGS = ("__init__", "common", "paper")


def known_configs() -> dict[str, str]:
    """Every config name and its one-line description: the config modules in
    ``experiments/configs`` (the first line of each docstring, read from the source: nothing is
    imported) and the rows of the paper's table (`experiments.configs.paper`)."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.stem in NOT_CONFIGS:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out[path.stem] = doc.strip().splitlines()[0].replace("``", "") if doc.strip() else ""
    out.update({row.name: row.summary for row in paper.ROWS})
    return dict(sorted(out.items()))


def describe(name: str) -> str:
    """The full description of a config name or file: a paper row's target, GPU time and
    commands, or a config module's docstring."""
    if name in paper.BY_NAME:
        return paper.describe(name)
    path = Path(name)
    if path.suffix != ".py":
        path = CONFIG_DIR / f"{name}.py" if name in known_configs() else Path("")
    if not path.is_file():
        known = known_configs()
        raise ConfigError(f"Unknown config {name!r}{_did_you_mean(name, known)}. Known configs: "
                          f"{', '.join(known)}.")
    return (ast.get_docstring(ast.parse(path.read_text())) or "(no docstring)") + "\n"


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(name: str, quick: bool = False):
    """Returns the config called ``name`` (a row of the paper's table or a config module in
    ``experiments/configs``) or defined by the file ``name`` (its ``get_config(quick)``)."""
    path = Path(name)
    if path.suffix == ".py" and path.exists():
        spec = importlib.util.spec_from_file_location(f"revjax_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        known = known_configs()
        if name not in known:
            raise ConfigError(
                f"Unknown config {name!r}{_did_you_mean(name, known)}. Known configs: "
                f"{', '.join(known)} (or a path to a .py file with get_config); --help "
                "describes them."
            )
        if name in paper.BY_NAME:
            return paper.get_config(name, quick)
        module = importlib.import_module(f"experiments.configs.{name}")
    return module.get_config(quick)


def field_docs() -> dict[str, str]:
    """Each `TrainConfig` field's meaning, from the class docstring (one line per field)."""
    from revjax.train import TrainConfig

    docs: dict[str, str] = {}
    current = None
    for line in inspect.cleandoc(TrainConfig.__doc__ or "").splitlines():
        entry = re.match(r"^  (\w+): (.*)$", line)
        if entry:
            current = entry.group(1)
            docs[current] = entry.group(2).strip()
        elif current and line.startswith("    ") and line.strip():
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def list_keys() -> str:
    """The ``--set`` keys: each `TrainConfig` field with its default and meaning."""
    from revjax.train import TrainConfig

    docs = field_docs()
    default = TrainConfig()
    lines = ["--set KEY=VALUE keys (TrainConfig fields; default, then meaning):"]
    for f in dataclasses.fields(TrainConfig):
        meaning = docs.get(f.name, "(not documented)").replace("``", "").replace("`", "")
        lines.append(f"  {f.name}={getattr(default, f.name)!r}\n      {meaning}")
    return "\n".join(lines)


def apply_overrides(config, assignments):
    """Applies ``key=value`` strings to a frozen dataclass config."""
    fields = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"Bad --set {item!r}: expected KEY=VALUE (--list-keys lists the "
                              "keys).")
        if key not in fields:
            raise ConfigError(f"Bad --set {item!r}: unknown key {key!r}"
                              f"{_did_you_mean(key, fields)}; --list-keys lists the keys.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if key == "data_dir" and isinstance(value, str):
            value = os.path.expanduser(value)
        changes[key] = value
    return dataclasses.replace(config, **changes)


def _stopped_line(stop, args: argparse.Namespace) -> str:
    """One line: where the signal stopped the run and how to resume."""
    resume = f"; resume with: {resume_command(args)}" if stop.checkpoint else ""
    if stop.started:
        return f"{stop.signal_name} at step {stop.step}: checkpoint saved in {stop.checkpoint}" \
            + resume
    if stop.checkpoint is None:
        return f"{stop.signal_name} before the first step: nothing was trained and no " \
            "checkpoint was written."
    return (f"{stop.signal_name} before the first step: the checkpoint at step {stop.step} "
            f"({stop.checkpoint}) is untouched{resume}")


def config_name(args: argparse.Namespace) -> str:
    """The name a checkpoint records for this run's config: ``--config`` and ``--quick``."""
    return f"{args.config} --quick" if args.quick else args.config


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


def _command_line_fix(err: ConfigError) -> str:
    """A `ConfigError` raised once training started, its fixes as ``--set`` flags."""
    if not err.fixes:
        return str(err)
    return f"{err.problem}; use {' or '.join(f'--set {fix}' for fix in err.fixes)}."


def _format_warning(message, category, filename, lineno, line=None):
    """revjax's warnings as one ``warning:`` line; others as Python formats them."""
    if category.__module__.startswith("revjax"):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def _parser() -> argparse.ArgumentParser:
    configs = known_configs()
    width = max(map(len, configs), default=0)
    listed = "\n".join(f"  {name:<{width}}  {doc}" for name, doc in configs.items())
    parser = argparse.ArgumentParser(
        prog="python -m experiments.train",
        description="Train a revjax config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"configs (--config NAME):\n{listed}\n\n--describe NAME prints a config's "
               "target, expected time and commands; --list-keys prints every --set key with its "
               "default and meaning.",
    )
    parser.add_argument("--config", default="digits", help="config name (below) or .py path")
    parser.add_argument("--workdir", help="checkpoints and metrics go here (required to train)")
    parser.add_argument("--quick", action="store_true", help="the config's tiny smoke variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (--list-keys lists them)")
    parser.add_argument("--list-keys", action="store_true",
                        help="print the --set keys with defaults and meaning, then exit")
    parser.add_argument("--describe", metavar="NAME",
                        help="print a config's full description (target accuracy, expected "
                             "time, the commands that prepare its data and train it), then exit")
    return parser


def main(argv=None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_keys:
        print(list_keys())
        return {}
    if args.describe:
        try:
            print(describe(args.describe), end="")
        except ConfigError as err:
            _fail(str(err))
        return {}
    if not args.workdir:
        parser.error("--workdir is required to train")

    from revjax.data import DatasetNotPreparedError
    from revjax.pretrained.checkpoint_files import CheckpointMismatch
    from revjax.train import Preempted, train_and_evaluate

    try:  # bad names and values stop here, before anything runs
        config = apply_overrides(load_config(args.config, args.quick), args.set)
    except ConfigError as err:
        _fail(str(err))
    warnings.formatwarning = _format_warning
    try:
        _, result = train_and_evaluate(config, args.workdir, config_name=config_name(args))
    except (DatasetNotPreparedError, CheckpointMismatch, ConfigError) as err:
        if not isinstance(err, ConfigError):  # their messages name every problem and the fix
            _fail(str(err))
        how = ""
        if config.init_from is not None and "init_from=" in err.problem:
            how = (f" `python -m experiments.train --describe {args.config}` shows how this "
                   "config's checkpoint is made.")
        _fail(_command_line_fix(err) + how)
    except Preempted as stop:
        import jax

        if jax.process_index() == 0:
            print(_stopped_line(stop, args), file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None
    finally:
        warnings.formatwarning = _python_format_warning
    summary = {
        "config": args.config,
        "model": config.model,
        "dataset": config.dataset,
        "step": result["step"],
        "eval_accuracy": round(result["eval_accuracy"], 4),
        "images_per_second": round(result.get("images_per_second", float("nan")), 1),
    }
    if "eval_perplexity" in result:  # a language model: its loss and perplexity say more
        summary["eval_loss"] = round(result["eval_loss"], 4)
        summary["eval_perplexity"] = round(result["eval_perplexity"], 2)
        # the trainer's rate counts examples, here sequences of the config's context
        summary["sequences_per_second"] = summary.pop("images_per_second")
    mem = result.get("memory")
    if mem and "model_plain" in mem:
        summary["activation_memory_saved_vs_plain"] = f"{mem['model_plain'] / mem['model']:.2f}x"
    if mem and "twin" in mem:
        summary[f"memory_vs_{config.twin_model}"] = f"{mem['model'] / mem['twin']:.2f}x"
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":  # the guard Grain's worker processes need
    # The trainer catches the first SIGINT; a second one (and one outside training) ends the
    # process at once, as SIGTERM does, instead of raising KeyboardInterrupt wherever Python
    # happens to be (inside an XLA compile that ends in a crash).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    main()
