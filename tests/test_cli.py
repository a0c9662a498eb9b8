"""The command line (experiments/train.py) as a newcomer meets it: --help, --list-keys, close
names for misspellings, one-line config errors, signals during start-up, the resume line."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments.train import known_configs, main
from revjax.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _run_main(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_help_lists_every_config_and_points_to_list_keys(capsys):
    code, out, _ = _run_main(["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: python -m experiments.train ")
    configs = known_configs()
    assert {"digits", "digits_revvit", "cifar10_revnet38", "imagenet_revnet104"} <= set(configs)
    for name, doc in configs.items():
        assert doc, f"config {name} has no one-line description"
        assert f"  {name}  " in out and doc[:40] in out, name
    assert "--list-keys" in out and "--describe NAME" in out
    # Every row of the paper's table is listed by name, with its one line.
    assert re.search(r"\n  cifar100_resnet164 +resnet164 on cifar100, the paper's recipe\.\n", out)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10_revnet38", "Target (the RevNet authors' code): 93.1 % test accuracy."),
        ("digits", "The default, offline job: RevNet-38"),
    ],
)
def test_describe_prints_the_full_description(name, expected, capsys):
    assert main(["--describe", name]) == {}
    out = capsys.readouterr().out
    assert expected in out and f"--config {name}" in out


def test_describe_an_unknown_config_suggests_the_closest(capsys):
    code, _, err = _run_main(["--describe", "cifar10_revnet37"], capsys)
    assert code == 2 and err.startswith("error: Unknown config 'cifar10_revnet37' (did you mean "
                                        "'cifar10_revnet38'?)"), err


def test_list_keys_gives_every_field_its_default_and_meaning(capsys):
    assert main(["--list-keys"]) == {}
    out = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert f"\n  {field.name}={getattr(TrainConfig(), field.name)!r}\n" in out, field.name
    assert "(not documented)" not in out, "a TrainConfig field lacks a line in its docstring"
    assert "learning rate" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "digit_revvit"], "error: Unknown config 'digit_revvit' (did you mean "
                                       "'digits_revvit'?). Known configs: "),
        (["--set", "learning_rat=0.1"], "error: Bad --set 'learning_rat=0.1': unknown key "
                                        "'learning_rat' (did you mean 'learning_rate'?)"),
        (["--set", "model=revnet39"], "error: model='revnet39' is invalid: expected a known "
                                      "model preset (did you mean 'revnet38'?)"),
        (["--set", "optimizer=adamm"], "error: optimizer='adamm' is invalid: expected a known "
                                       "optimizer (did you mean 'adamw'?)"),
    ],
)
def test_misspelt_names_get_the_closest_known_one(argv, message, tmp_path, capsys):
    code, _, err = _run_main(["--workdir", str(tmp_path / "w"), *argv], capsys)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_missing_fine_tuning_checkpoint_is_a_one_line_error_naming_how_to_make_it(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the config's relative init_from is not there
    code, _, err = _run_main(["--config", "digits_revvit_finetune", "--quick", "--workdir", "w"],
                             capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: init_from='workdirs/digits04_vit.safetensors' is not a file ")
    assert "--set init_from=PATH" in err
    assert "python -m experiments.train --describe digits_revvit_finetune" in err
    assert "--save-source" in _describe("digits_revvit_finetune", capsys)
    assert not (tmp_path / "w").exists()


def test_fine_tuning_checkpoint_that_does_not_fit_is_an_error_listing_the_differences(
    tmp_path, capsys, monkeypatch
):
    from safetensors.numpy import save_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "workdirs").mkdir()
    save_file({"not_a_vit_weight": np.zeros(3, np.float32)},
              str(tmp_path / "workdirs" / "digits04_vit.safetensors"))
    code, _, err = _run_main(["--config", "digits_revvit_finetune", "--quick", "--workdir", "w"],
                             capsys)
    assert code == 2 and err.startswith("error: "), err
    assert "difference(s), nothing was loaded" in err and "missing key 'pos_embed'" in err, err
    assert "Traceback" not in err


def _describe(name: str, capsys) -> str:
    main(["--describe", name])
    return capsys.readouterr().out


def test_the_entry_point_runs_from_any_directory(tmp_path):
    env = _env()
    env["PYTHONPATH"] = ""  # nothing but the file's own location finds `experiments`
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"),
                             "--describe", "digits"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "The default, offline job" in result.stdout


def test_batch_the_devices_cannot_split_is_a_one_line_config_error(tmp_path, capsys):
    # conftest gives 8 CPU devices; 12 does not split over 8.
    code, _, err = _run_main(["--config", "digits", "--quick", "--workdir", str(tmp_path / "w"),
                              "--set", "batch_size=12"], capsys)
    assert code == 2, err
    assert err == (
        "error: batch_size=12 is not divisible by the 8 devices of the data-parallel mesh; use "
        "--set batch_size=8 or --set batch_size=16 or --set num_devices=6.\n"
    )
    assert not (tmp_path / "w").exists()  # nothing ran


# ------------------------------------------------------------------------------------------
# Signals during start-up, resume line, changed-config warning (the CLI in a subprocess)
# ------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One CPU device (the configs' batch sizes), fast compiles as in conftest.
    env["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", *args]


def _signal_while_compiling(cmd, signum: int, cwd: Path, times: int = 1):
    """Starts ``cmd``, sends ``signum`` when it prints that it compiles the train step (before
    step 1); returns ``(returncode, output)``."""
    lines = []
    with subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("Compiling the train step"):
                    for _ in range(times):
                        proc.send_signal(signum)
                        time.sleep(0.3)
                    break
            lines += proc.stdout.read().splitlines(keepends=True)
            proc.wait(timeout=300)
        except BaseException:
            proc.kill()
            raise
    return proc.returncode, "".join(lines)


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def _assert_clean(out: str) -> None:
    assert "Traceback" not in out and "Segmentation fault" not in out, out
    assert "core dumped" not in out, out


@pytest.mark.slow
def test_sigint_while_compiling_stops_cleanly_with_nothing_trained(tmp_path):
    workdir = tmp_path / "w"
    code, out = _signal_while_compiling(
        _cli("--config", "digits", "--quick", "--workdir", str(workdir)), signal.SIGINT, tmp_path)
    assert code == 130, out
    _assert_clean(out)
    assert out.splitlines()[-1] == ("SIGINT before the first step: nothing was trained and no "
                                    "checkpoint was written."), out
    assert not (workdir / "checkpoints").exists()  # no empty folder left behind


@pytest.mark.slow
def test_second_sigterm_while_compiling_ends_the_process_at_once(tmp_path):
    code, out = _signal_while_compiling(
        _cli("--config", "digits", "--quick", "--workdir", str(tmp_path / "w")), signal.SIGTERM,
        tmp_path, times=2)
    assert code == -signal.SIGTERM, out  # the default action, not the clean stop's exit 143
    assert "before the first step" not in out


@pytest.mark.slow
def test_quick_then_full_config_sigterm_while_compiling_then_resume(tmp_path):
    """digits_revvit --quick (2 steps, checkpoints 1 and 2), then the full config (shortened)
    in the same workdir: the resume line names the quick config and one warning lists the
    changed fields; SIGTERM while it compiles leaves the checkpoint untouched; the next run
    resumes from it."""
    workdir = tmp_path / "w"
    quick = subprocess.run(
        _cli("--config", "digits_revvit", "--quick", "--workdir", str(workdir)), cwd=tmp_path,
        env=_env(), capture_output=True, text=True, timeout=600)
    assert quick.returncode == 0, quick.stdout + quick.stderr
    assert "Resuming" not in quick.stdout
    before = _tree_digest(workdir / "checkpoints")

    full = _cli("--config", "digits_revvit", "--workdir", str(workdir), "--set", "num_steps=4",
                "--set", "warmup_steps=1", "--set", "memory_report=False")
    code, out = _signal_while_compiling(full, signal.SIGTERM, tmp_path)
    assert code == 143, out
    _assert_clean(out)
    resume_line = next(x for x in out.splitlines() if x.startswith("Resuming from step 2 of "))
    assert resume_line.startswith(f"Resuming from step 2 of {workdir.resolve()} (checkpoint "
                                  "written 20")
    assert resume_line.endswith(" UTC by config digits_revvit --quick)")
    warning = [x for x in out.splitlines() if x.startswith("warning: ")]
    assert len(warning) == 1, out
    assert warning[0].startswith("warning: The checkpoint was written by config digits_revvit "
                                 "--quick; this run (config digits_revvit) changes "), warning
    for change in ("batch_size 8 -> 100", "num_steps 2 -> 4", "eval_every 0 -> 150"):
        assert change in warning[0], warning
    assert "warmup_steps" not in warning[0] and "memory_report" not in warning[0]  # unchanged
    checkpoint = workdir.resolve() / "checkpoints" / "2"
    assert out.splitlines()[-1].startswith(
        f"SIGTERM before the first step: the checkpoint at step 2 ({checkpoint}) is untouched; "
        "resume with: cd "), out
    assert _tree_digest(workdir / "checkpoints") == before

    done = subprocess.run(full, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Resuming from step 2 of " in done.stdout
    assert '"step": 4' in done.stdout
