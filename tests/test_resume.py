"""Exit 0 means the result is right, through the real CLI: non-finite training stops (or skips),
resuming checks the run's settings, metrics keep each step once after kill -9, a corrupted newest
checkpoint falls back to an intact one, and usage errors are one line with status 2."""

import hashlib
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from test_train import adapter, assert_same_adapter, cli, losses


def checksums(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def logged_steps(workdir):
    """Steps with a train/loss row; a row cut by kill -9 mid-write is skipped."""
    out = []
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in row:
            out.append(row["step"])
    return out


def steps_saved(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def one_line_error(r, message):
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# Non-finite training. A learning rate of 1e38 takes step 1 to parameters near float32's largest
# value, and step 2 past it.

BLOWUP = ("--config.optimizer.learning_rate=1e38", "--config.optimizer.schedule=constant",
          "--config.train.steps=6", "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=1",
          "--config.checkpoint.keep=0")


def test_nonfinite_step_stops_the_run_and_saves_nothing_after_it(tmp_path):
    r = cli(tmp_path, *BLOWUP)
    one_line_error(r, "error: step 2: the loss, gradient or new parameters are not finite")
    assert steps_saved(tmp_path) == [1]  # step 1 is finite; nothing from step 2 on
    assert not (tmp_path / "export").exists()
    assert all(np.isfinite(v) for v in losses(tmp_path).values())


def test_skip_nonfinite_leaves_the_update_out(tmp_path):
    r = cli(tmp_path / "skip", *BLOWUP, "--config.train.skip_nonfinite=True")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/skipped_steps"] for row in rows if "train/loss" in row] == [0, 1, 2, 3, 4, 5]
    # Every step after the first was skipped: params and optimizer state are those after step 1.
    one = cli(tmp_path / "one", *BLOWUP, "--config.train.steps=1")
    assert one.returncode == 0, one.stderr
    skipped = adapter(tmp_path / "skip")
    assert all(np.isfinite(v).all() for v in skipped.values())
    assert_same_adapter(skipped, adapter(tmp_path / "one"))


# ---------------------------------------------------------------------------------------------
# Resuming with other settings.

SHORT = ("--config.train.steps=4", "--config.checkpoint.every_steps=2", "--config.train.log_every_steps=1")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    wd = tmp_path_factory.mktemp("finished")
    r = cli(wd, *SHORT)
    assert r.returncode == 0, r.stderr
    return wd


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("override,message", [
    ("--config.train.seed=1", "train.seed=1: the checkpoint in"),
    ("--config.train.batch_size=16", "train.batch_size=16: the checkpoint in"),
    ("--config.method.rank=8", "method.rank=8: the checkpoint in"),
    ("--config.data.seq_len=32", "data.seq_len=32: the checkpoint in"),
    ("--config.optimizer.learning_rate=0.5", "optimizer.learning_rate=0.5: the checkpoint in"),
    ("--config.train.grad_accum=2", "train.grad_accum=2: the checkpoint in"),
])
def test_resume_with_other_settings_is_an_error(finished, tmp_path, override, message):
    run = copy_of(finished, tmp_path)
    before = checksums(run)
    r = cli(run, *SHORT, override)
    one_line_error(r, message)
    old = {"train.seed": "0", "train.batch_size": "8", "method.rank": "4", "data.seq_len": "16",
           "optimizer.learning_rate": "0.01", "train.grad_accum": "1"}[override[9:].split("=")[0]]
    assert f"was made with {override[9:].split('=')[0]}={old}" in r.stderr
    assert checksums(run) == before  # nothing written


def test_resume_anyway_is_recorded_and_more_steps_train_on(finished, tmp_path):
    """One resumed run checks both: other settings accepted with resume_anyway are recorded, and more
    steps than the checkpoint's train on from it and say so."""
    run = copy_of(finished, tmp_path)
    r = cli(run, "--config.train.steps=6", "--config.checkpoint.every_steps=2", "--config.train.log_every_steps=1",
            "--config.train.seed=1", "--config.train.resume_anyway=True")
    assert r.returncode == 0, r.stderr
    assert "resuming with other settings (train.seed: 0 -> 1)" in r.stdout
    assert "train.steps raised from 4 to 6: training on from step 4" in r.stdout
    assert steps_saved(run)[-1] == 6 and sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    notes = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "resumed_anyway" in line]
    assert notes == [{"step": 4, "resumed_anyway": ["train.seed: 0 -> 1"]}]
    meta = json.loads((run / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["resumed_anyway"] == ["train.seed: 0 -> 1"] and meta["settings"]["train.seed"] == 1


def test_fewer_steps_than_trained_is_an_error(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = checksums(run)
    r = cli(run, "--config.train.steps=2", "--config.checkpoint.every_steps=2")
    one_line_error(r, "train.steps=2: the checkpoint in")
    assert "has already trained 4 steps" in r.stderr
    assert checksums(run) == before  # the 4-step export is not replaced


# ---------------------------------------------------------------------------------------------
# Each step logged once after kill -9.

LONG = ("--config.train.steps=30", "--config.checkpoint.every_steps=5", "--config.train.log_every_steps=1")


def scalars(workdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(workdir) / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_kill_9_and_resume_log_each_step_once(tmp_path):
    straight = cli(tmp_path / "straight", *LONG)
    assert straight.returncode == 0, straight.stderr
    wd = tmp_path / "killed"
    proc = cli(wd, *LONG, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once steps after a checkpoint are logged
        saved = steps_saved(wd) if (wd / "checkpoints").exists() else []
        if saved and (wd / "metrics.jsonl").exists() and max(logged_steps(wd), default=0) >= saved[-1] + 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = max(logged_steps(wd))
    assert killed_at > steps_saved(wd)[-1] and killed_at < 30  # orphaned rows exist
    r = cli(wd, *LONG)
    assert r.returncode == 0, r.stderr
    assert logged_steps(wd) == list(range(1, 31))
    assert losses(wd) == losses(tmp_path / "straight")
    assert scalars(wd, "train/loss") == scalars(tmp_path / "straight", "train/loss")


# ---------------------------------------------------------------------------------------------
# A corrupted newest checkpoint.


def test_corrupted_newest_checkpoint_falls_back(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    assert steps_saved(run) == [2, 4]
    intact = checksums(run / "checkpoints" / "2")
    for f in (run / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage" * 3)
    r = cli(run, *SHORT)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stdout.splitlines() if "cannot restore" in line]
    assert len(warnings) == 1 and "set aside as 4.unreadable, resuming from step 2" in warnings[0]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert checksums(run / "checkpoints" / "2") == intact
    assert (run / "checkpoints" / "4.unreadable").is_dir()
    assert steps_saved(run) == [2, 4]
    assert_same_adapter(adapter(run), adapter(finished))  # resuming from 2 ends where the run did


# ---------------------------------------------------------------------------------------------
# A checkpoint of an older parameter layout.

GPT2 = ("--config.model.init.model_type=gpt2", "--config.train.steps=2", "--config.checkpoint.every_steps=2")


def test_checkpoint_of_an_older_layout_is_an_error(tmp_path):
    """GPT-2's c_attn now stores its outputs per head (`checkpoint.LAYOUT` 2). A LoRA checkpoint on c_attn
    written before (no layout in its meta: HF's order) would resume or evaluate silently mis-ordered: both are
    one-line errors that write nothing."""
    from test_evaluate import cli as evaluate

    from jaxft.checkpoint import LAYOUT

    r = cli(tmp_path, *GPT2)
    assert r.returncode == 0, r.stderr
    file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(file.read_text())
    assert meta["layout"] == LAYOUT and "layers/attn/c_attn/lora_b" in meta["trainable"]
    file.write_text(json.dumps({k: v for k, v in meta.items() if k != "layout"}))
    before = checksums(tmp_path)
    message = "written by an older jaxft that kept transformer.h.0.attn.c_attn's outputs in HF's order (layout 1)"
    one_line_error(cli(tmp_path, *GPT2, "--config.train.steps=4"), message)
    r = evaluate("--config=configs/tiny_test.py", *GPT2, f"--checkpoint={tmp_path}", f"--out={tmp_path / 'eval'}")
    assert r.returncode != 0 and message in r.stderr and "--checkpoint=" in r.stderr, r.stderr
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("trainable, stored_otherwise", [
    (["layers/mlp/gate_up_proj/lora_b", "layers/self_attn/q_proj/lora_b"], "model.layers.0.mlp.gate_up_proj"),
    (["layers/self_attn/q_proj/lora_b", "layers/mlp/down_proj/kernel", "score/kernel"], None),
])
def test_older_layout_matters_only_for_modules_stored_otherwise(trainable, stored_otherwise):
    """GLM-4's fused gate_up_proj is stored in blocks since layout 2; its other projections, and Llama's
    unfused ones, never moved: their older checkpoints resume."""
    from jaxft.checkpoint import LAYOUT, check_layout
    from jaxft.errors import JaxftError
    from jaxft.models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=2, fused_gate_up=True, model_type="glm4")
    check_layout(cfg, {"trainable": trainable, "layout": LAYOUT}, "ckpt")
    if stored_otherwise is None:
        check_layout(cfg, {"trainable": trainable}, "ckpt")
    else:
        with pytest.raises(JaxftError, match=f"ckpt: written by an older jaxft that kept {stored_otherwise}'s"):
            check_layout(cfg, {"trainable": trainable}, "ckpt")
