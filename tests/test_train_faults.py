"""Fault injection for training: interrupts and signals at chosen points, a full disk, stale temporary
folders, fsync order, refused resumes and the CLI's messages around them.

Each interrupt test runs the same 6-step noisy-router run (the global RNG then matters for the
losses), stops it at one point inside a step, resumes it, and requires the final weights to be
bit-identical (``torch.equal``) to the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from moekit.data import TextDataModule
from moekit.models.objectives import CausalLMObjective
from moekit.train import checkpoint as ckpt
from moekit.train import load_checkpoint, train
from moekit.train import runlog as runlog_mod
from moekit.train.checkpoint import CheckpointWriteError
from tests.test_train import TINY_MODEL, _config, _interrupt_at, _write_corpus

NOISY = {**TINY_MODEL, "moe": {**TINY_MODEL["moe"], "noise": "jitter"}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its corpus, cache and final weights."""
    root = tmp_path_factory.mktemp("ref")
    corpus = _write_corpus(root / "corpus")
    res = train(_run_cfg(root, corpus, "full"), progress=False)
    return root, corpus, res, load_file(str(res.checkpoint_dir / "model.safetensors"))


def _run_cfg(root, corpus, name, **kw):
    base = dict(model_overrides=NOISY, save_interval=2, eval_interval=3, out_dir=str(root / name))
    base.update(kw)
    return _config(root, corpus, **base)


def _once_at(n: int, action):
    """A wrapper factory: the n-th call runs ``action()`` (once), every call then runs the original."""
    calls = {"n": 0}

    def wrap(real):
        def inner(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                action()
            return real(*args, **kwargs)

        return inner

    return wrap


def _raise():
    raise KeyboardInterrupt


def _signal(sig):
    return lambda: os.kill(os.getpid(), sig)


def _patch(monkeypatch, owner, name, wrapper):
    monkeypatch.setattr(owner, name, wrapper(getattr(owner, name)))


def _torn_log_write(monkeypatch, n):
    real = runlog_mod.RunLog.write
    calls = {"n": 0}

    def write(self, record):
        calls["n"] += 1
        if calls["n"] == n:
            with open(self.path, "a") as f:
                f.write(json.dumps(record)[:7])  # half a line, then the interrupt
            raise KeyboardInterrupt
        return real(self, record)

    monkeypatch.setattr(runlog_mod.RunLog, "write", write)


# Log writes: 1 start, then train records of steps 1, 2, 3, eval 3 (5th), train 4, ...
SCENARIOS = {
    "inside_log_write": lambda mp: _torn_log_write(mp, 5),
    "inside_evaluation": lambda mp: _patch(mp, CausalLMObjective, "evaluate", _once_at(1, _raise)),
    "inside_periodic_save": lambda mp: _patch(mp, ckpt, "_save_optimizer", _once_at(2, _raise)),
    "inside_data_draw": lambda mp: _patch(mp, TextDataModule, "next_train_batch", _once_at(4, _raise)),
    "inside_loss": lambda mp: _patch(mp, CausalLMObjective, "loss", _once_at(5, _raise)),
    "inside_update": lambda mp: _patch(mp, torch.optim.AdamW, "step", _once_at(3, _raise)),
    "sigint_in_log_write": lambda mp: _patch(
        mp, runlog_mod.RunLog, "write", _once_at(4, _signal(signal.SIGINT))
    ),
    "sigterm_in_evaluation": lambda mp: _patch(
        mp, CausalLMObjective, "evaluate", _once_at(1, _signal(signal.SIGTERM))
    ),
    "sigterm_in_save": lambda mp: _patch(mp, ckpt, "_save_model", _once_at(1, _signal(signal.SIGTERM))),
    # The first asks to stop after step 3; the second, inside its evaluation, stops at once.
    "two_sigints": lambda mp: (
        _patch(mp, CausalLMObjective, "loss", _once_at(3, _signal(signal.SIGINT))),
        _patch(mp, CausalLMObjective, "evaluate", _once_at(1, _signal(signal.SIGINT))),
    ),
}


@pytest.mark.parametrize("where", sorted(SCENARIOS))
def test_interrupt_anywhere_then_resume_is_bit_exact(reference, monkeypatch, where):
    root, corpus, full, full_weights = reference
    cfg = _run_cfg(root, corpus, f"run_{where}")
    SCENARIOS[where](monkeypatch)
    part = train(cfg, progress=False)
    monkeypatch.undo()
    assert part.stop_reason == "interrupted" and part.step < 6
    saved = load_checkpoint(root / f"run_{where}").state["step"]
    # The checkpoint holds a finished step whose losses match the uninterrupted run.
    assert 1 <= saved <= part.step and part.losses[:saved] == full.losses[:saved]
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.step == 6 and part.losses[:saved] + resumed.losses == full.losses
    weights = load_file(str(resumed.checkpoint_dir / "model.safetensors"))
    assert weights.keys() == full_weights.keys()
    for name, tensor in full_weights.items():
        assert torch.equal(weights[name], tensor), name
    assert resumed.val_loss == full.val_loss
    lines = (root / f"run_{where}" / "train_log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # strict JSON, no step logged twice


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    corpus = _write_corpus(tmp_path / "corpus")
    cfg = _config(tmp_path, corpus, max_steps=2, eval_interval=100)
    train(cfg, progress=False)
    root = tmp_path / "run" / "checkpoints"

    def full_disk(folder, tensors):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_optimizer", full_disk)
    with pytest.raises(CheckpointWriteError, match="no space left .* previous checkpoint .* is intact"):
        train(cfg.replace(max_steps=4, save_interval=1), resume=True, progress=False)
    assert load_checkpoint(root).state["step"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["last"]
    # The CLI says it in one line, without a traceback.
    from moekit.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "run"), "--resume", "--steps", "4", "--no-report"])
    capsys.readouterr()
    assert train_cli.run(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moekit train: error: no space left") and "Traceback" not in "\n".join(err)
    assert load_checkpoint(root).state["step"] == 2


def test_stale_tmp_folders_of_dead_processes_are_removed(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus")
    root = tmp_path / "run" / "checkpoints"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = root / f"last.tmp-{dead.pid}", root / f"last.tmp-{os.getppid()}"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    train(_config(tmp_path, corpus, max_steps=1, eval_interval=100), progress=False)
    assert not stale.exists() and live.exists()  # another live process may still be writing


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    corpus = _write_corpus(tmp_path / "corpus")
    synced: list[str] = []
    renames: list[tuple[str, set[str]]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        renames.append((str(src), set(synced)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train(_config(tmp_path, corpus, max_steps=1, eval_interval=100), progress=False)
    final = [(src, done) for src, done in renames if "last.tmp-" in src and src.endswith(str(os.getpid()))]
    assert final, renames
    src, done = final[-1]
    files = {str(p) for p in (tmp_path / "run" / "checkpoints" / "last").iterdir()}
    names = {os.path.basename(f) for f in files}
    assert names <= {os.path.basename(p) for p in done if p.startswith(src)}
    assert src in done  # the folder too
    assert str(tmp_path / "run" / "checkpoints") in synced  # and the rename, afterwards


def test_seq_len_above_the_model_positions_is_refused(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus")
    short = {**TINY_MODEL, "max_position_embeddings": 16}
    with pytest.raises(ValueError, match="seq_len=32 exceeds the model's max_position_embeddings=16"):
        train(_config(tmp_path, corpus, model_overrides=short), progress=False)


def test_resume_with_another_preset_is_refused(tmp_path):
    from moekit.cli import train as train_cli

    corpus = _write_corpus(tmp_path / "corpus")
    cfg = _config(tmp_path, corpus, max_steps=1, eval_interval=100)
    train(cfg, progress=False)
    with pytest.raises(ValueError, match="cannot resume: preset: 'moe-tiny' -> 'moe-small'"):
        train(cfg.replace(preset="moe-small", max_steps=2), resume=True, progress=False)
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "run"), "--resume", "--preset", "moe-small"])
    with pytest.raises(ValueError, match="cannot resume: --preset moe-small differs from the run's preset"):
        train_cli.build_config(args)
    same = parser.parse_args(["--out", str(tmp_path / "run"), "--resume", "--preset", "moe-tiny"])
    assert train_cli.build_config(same).preset == "moe-tiny"


def _cli(tmp_path, argv):
    from moekit.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return train_cli.run(parser.parse_args(argv))


def test_cli_messages_after_interrupt_and_for_a_finished_run(tmp_path, monkeypatch, capsys):
    corpus = _write_corpus(tmp_path / "corpus")
    cfg = _config(tmp_path, corpus, max_steps=3, eval_interval=100)
    cfg.to_json(tmp_path / "cfg.json")
    argv = ["--config", str(tmp_path / "cfg.json"), "--no-report"]
    _interrupt_at(monkeypatch, 2)
    assert _cli(tmp_path, argv) == 130
    monkeypatch.undo()
    cap = capsys.readouterr()
    assert "no time limit" in cap.err and "none s" not in cap.err
    assert "val loss:         not evaluated" in cap.out and "nan" not in cap.out
    assert "stopped:          interrupted at step 1" in cap.out
    assert _cli(tmp_path, [*argv, "--resume"]) == 0
    capsys.readouterr()
    log = tmp_path / "run" / "train_log.jsonl"
    ends = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "end"]
    assert _cli(tmp_path, [*argv, "--resume"]) == 0  # already finished: nothing runs
    out = capsys.readouterr().out
    assert "nothing to train: the run already finished at step 3" in out
    assert "tokens/s" not in out and "val loss:         " in out and "nan" not in out
    again = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "end"]
    assert again == ends  # no second `end` record


def test_baseline_phrase_reads_right_above_and_below():
    from moekit.cli.train import baseline_phrase

    assert baseline_phrase(4.0, 4.5) == "the model is 0.500 nats/token below it"
    above = baseline_phrase(5.042, 4.5)
    assert above.startswith("the model is 0.542 nats/token above it") and "-" not in above
    assert baseline_phrase(float("nan"), 4.5) == "the model was not evaluated"


def test_sigterm_to_a_cli_run_saves_the_step_it_finished(tmp_path):
    """A real `moekit train` process gets SIGTERM mid-run: it saves the step it was on (not an older
    periodic one), exits with 130, and the resumed run ends with the uninterrupted run's weights."""
    import sys
    import time
    from pathlib import Path

    corpus = _write_corpus(tmp_path / "corpus")
    cfg = _run_cfg(tmp_path, corpus, "cli", max_steps=24, save_interval=100, eval_interval=8)
    cfg.to_json(tmp_path / "cfg.json")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "moekit", "train", "--config", str(tmp_path / "cfg.json"), "--no-report"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "cli" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        lines = log.read_text().splitlines() if log.exists() else []
        if sum('"event": "train"' in line for line in lines) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    saved = load_checkpoint(tmp_path / "cli").state["step"]
    trains = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "train"]
    assert 3 <= saved < 24 and trains[-1] == saved  # the step it had finished, nothing lost
    assert "SIGTERM: saved" in err.decode() and f"interrupted at step {saved}" in out.decode()
    resumed = train(cfg, resume=True, progress=False)
    full = train(cfg.replace(out_dir=str(tmp_path / "full")), progress=False)
    assert resumed.losses == full.losses[saved:]
    a = load_file(str(resumed.checkpoint_dir / "model.safetensors"))
    b = load_file(str(full.checkpoint_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
