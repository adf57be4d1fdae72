"""The qwen-zero-prior command as a user meets it: help, errors, interrupting, progress and logging."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qwen_zero_prior.cli import build_parser, main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _tiny_args(model_dir, dataset, output, *extra: str) -> list[str]:
    sets = {"model.base_model": str(model_dir), "model.dtype": "float32", "model.device": "cpu",
            "train.train_placeholder_token": "true", "train.rank": "2", "train.resolution": "32",
            "train.checkpoint_every": "0", "train.seed": "0"}
    args = ["train", "--dataset", str(dataset), "--output", str(output)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


# ---- help ----------------------------------------------------------------------------------------------


def test_help_describes_the_tool_and_every_option(capsys):
    parser = build_parser()
    top = parser.format_help()
    assert "placeholder token" in top and "Qwen-Image" in top and "{demo,train" not in top
    commands = parser._subparsers._group_actions[0].choices
    assert list(commands) == ["demo", "train", "predict", "convert"]
    for cmd in commands:
        assert re.search(rf"^    {cmd}\s+\S", top, re.M), cmd  # each command listed with what it does
    for name, p in commands.items():
        assert p.description, name
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._expand_help(action)
            assert text, (name, action.dest)
            if action.default is not None and action.default is not False and action.default != []:
                assert "(default" in text, (name, action.dest, text)
    assert "(default: weights.zip)" in commands["train"].format_help()
    assert "(default: 0)" in commands["predict"].format_help()  # a zero default is shown too

    assert main([]) == 2  # no command: the full help, listing the commands
    err = capsys.readouterr().err
    assert "commands:" in err and "convert" in err and "the following arguments are required" not in err


# ---- errors name the right thing, and leave nothing behind -------------------------------------------


def test_errors_name_the_right_thing_and_create_no_folder(tiny_model_dir, dataset_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    cfg = tmp_path / "config.yaml"
    cfg.write_text("train:\n  steps: 3\n")
    run = tmp_path / "run"

    assert main(["train", "--config", str(cfg), "--set", "train.step=5", "--dataset", str(dataset_dir),
                 "--output", str(run / "weights.zip")]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith("error: --set train.step=5: unknown key train.step") and str(cfg) not in line

    assert main(["train", "--config", str(cfg), "--dataset", str(cfg), "--output", str(run / "weights.zip")]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "not a weights archive" not in line and "--dataset" in line and "pass it with --config" in line

    assert main(["train", "--dataset", str(tmp_path / "photos"), "--output", str(run / "weights.zip")]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line == f"error: --dataset {tmp_path / 'photos'}: no such folder or file"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(_tiny_args("nobody/no-such-model", dataset_dir, run / "weights.zip")) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "'nobody/no-such-model' could not be reached on the Hugging Face Hub (HF_HUB_OFFLINE is set)" in line
    assert "stacktrace" not in line and "hf download nobody/no-such-model" in line
    assert not run.exists()  # no empty output folder from any of these


def test_unreachable_hub_is_one_clear_error(monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    from qwen_zero_prior.training.models import ModelLoadError, check_hub_model

    def no_network(repo, *a, **kw):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(ModelLoadError) as e:
        check_hub_model("nobody/no-such-model")
    msg = str(e.value)
    assert "could not be reached on the Hugging Face Hub (ConnectionError: [Errno -2] Name or service not known)" in msg
    assert "not in the local cache" in msg and "stacktrace" not in msg and "\n" not in msg


def test_cpu_bf16_warns_once(tiny_model_dir, caplog):
    from qwen_zero_prior.training import models
    from qwen_zero_prior.training.config import ModelConfig

    models._warn_slow_on_cpu.cache_clear()
    with caplog.at_level(logging.WARNING, logger="qwen_zero_prior.training.models"):
        models.load_pipeline(ModelConfig(base_model=str(tiny_model_dir), dtype="bfloat16", device="cpu"))
        models.warn_if_slow_on_cpu("bfloat16", models.resolve_device("cpu"))
        models.warn_if_slow_on_cpu("float32", models.resolve_device("cpu"))
    warned = [r.getMessage() for r in caplog.records if "much slower" in r.getMessage()]
    assert len(warned) == 1 and "bfloat16" in warned[0] and "float32" in warned[0]


# ---- progress, logging, checkpoints -------------------------------------------------------------------


def test_train_progress_logs_retention_and_resume_past_steps(tiny_model_dir, dataset_dir, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    args = _tiny_args(tiny_model_dir, dataset_dir, run / "weights.zip", "--set", "train.steps=3",
                      "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=2",
                      "--set", "sample.prompts=['a photo of <zwx>']", "--set", "sample.every=3",
                      "--set", "sample.steps=1", "--set", "sample.guidance=1")
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"caching latents: 100%\|.*\| 4/4", err), err[-2000:]
    assert any("1 sample image(s) written to" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]

    assert main(args[:-12] + ["--set", "train.steps=2", "--resume", str(run)]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "is at step 3, past train.steps=2" in line

    keep_all = tmp_path / "all"
    assert main(_tiny_args(tiny_model_dir, dataset_dir, keep_all / "weights.zip", "--set", "train.steps=3",
                           "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=0")) == 0
    assert len(list((keep_all / "checkpoints").iterdir())) == 3


def test_log_lines_do_not_break_an_open_progress_bar(capsys):
    from tqdm import tqdm

    from qwen_zero_prior.cli import _TqdmLogHandler

    handler = _TqdmLogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    record = logging.LogRecord("qwen_zero_prior.training.trainer", logging.INFO, __file__, 1,
                               "checkpoint saved: %s", ("run/checkpoints/step-000004",), None)
    with tqdm(total=10, desc="training", file=sys.stderr) as bar:
        bar.update(4)
        bar.set_postfix(loss="1.3606")
        handler.emit(record)
    segments = re.split(r"[\r\n]", capsys.readouterr().err)
    assert "INFO qwen_zero_prior.training.trainer: checkpoint saved: run/checkpoints/step-000004" in segments


def test_predict_shows_denoising_progress(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["predict", "--base-model", str(tiny_model_dir), "--prompt", "a red disc", "--steps", "2",
                 "--width", "32", "--height", "32", "--guidance", "1", "--dtype", "float32", "--device", "cpu",
                 "--output", str(out)]) == 0
    assert re.search(r"denoising: 100%\|.*\| 2/2", capsys.readouterr().err)


# ---- Ctrl-C / SIGTERM ----------------------------------------------------------------------------------


class _Train:
    """``python -m qwen_zero_prior.cli train ...`` in a subprocess, its stderr read as it comes."""

    def __init__(self, argv: list[str], cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen_zero_prior.cli", *argv], cwd=cwd, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.err += chunk

    def wait_for(self, pattern: bytes, timeout: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.err)
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"never saw {pattern!r}; stderr:\n{self.err.decode(errors='replace')[-3000:]}")

    def finish(self, timeout: float = 240) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)  # stdout stays small: the prints after training
        self._reader.join(timeout=10)
        return rc, self.proc.stdout.read().decode(), self.err.decode(errors="replace")


def test_sigint_checkpoints_and_prints_the_resume_command(tiny_model_dir, dataset_dir, tmp_path):
    from qwen_zero_prior.training.archive import load_archive
    from qwen_zero_prior.training.checkpoint import find_checkpoint, load_checkpoint

    argv = _tiny_args(tiny_model_dir, dataset_dir, "run/weights.zip", "--set", "train.steps=40")
    job = _Train(argv, tmp_path)
    job.wait_for(rb"training:.*\| *[2-9]/40 ")  # a couple of steps done
    job.proc.send_signal(signal.SIGINT)
    rc, out, err = job.finish()
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "SIGINT: stopping after this step" in err
    step = int(re.search(r"interrupted at step (\d+); checkpoint: (\S+)", out)[1])
    assert 2 <= step < 40
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt.name == f"step-{step:06d}" and load_checkpoint(ckpt)["step"] == step
    assert not (tmp_path / "run" / "weights.zip").exists()

    command = out.split("resume with:\n", 1)[1].strip()
    assert command.endswith(f"--resume run/checkpoints/step-{step:06d}")
    resumed = subprocess.run(shlex.split(command), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from run/checkpoints/step-{step:06d} at step {step}" in resumed.stderr
    assert load_archive(tmp_path / "run" / "weights.zip").meta.steps == 40


def test_second_signal_exits_at_once_and_before_training_nothing_is_left(tiny_model_dir, dataset_dir, tmp_path):
    job = _Train(_tiny_args(tiny_model_dir, dataset_dir, "run/weights.zip", "--set", "train.steps=100000"), tmp_path)
    job.wait_for(rb"training:.*\| *[1-9]\d*/100000 ")
    job.proc.send_signal(signal.SIGTERM)
    job.proc.send_signal(signal.SIGINT)
    rc, out, err = job.finish(timeout=120)
    assert rc in (128 + signal.SIGINT, 128 + signal.SIGTERM), err[-3000:]
    assert "exiting now" in err and "Traceback" not in err and "resume with" not in out

    early = _Train(_tiny_args(tiny_model_dir, dataset_dir, "early/weights.zip", "--set", "train.steps=100000"),
                   tmp_path)
    early.wait_for(rb"dataset: 4 images")  # loading the model: the loop has not started
    early.proc.send_signal(signal.SIGTERM)
    rc, out, err = early.finish(timeout=120)
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: exiting now (training had not started: nothing to save)" in err
    assert not (tmp_path / "early").exists()
