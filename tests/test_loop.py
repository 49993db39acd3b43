"""The host loop: no device reads but at log steps (one step late), MFU in the log, profiler traces,
and a `gs://` workdir through the same code path as a local one (tests/fake_gcs.py)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import ROOT, TINY, adapter, assert_same_adapter, cli, xla_flags


def tiny_config(**train):
    spec = importlib.util.spec_from_file_location("tiny_test", ROOT / TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for k, v in train.items():
        config.train[k] = v
    return config


def rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_device_reads_only_at_log_steps_one_step_late(tmp_path, monkeypatch):
    """Count train steps dispatched when each device_get happens: step s's metrics are read once step
    s + 1 is queued, and no other step reads anything until the run ends."""
    from jaxft import train

    dispatched, reads = [0], []
    real_jit, real_get = jax.jit, jax.device_get

    def jit(fun, *args, **kwargs):
        compiled = real_jit(fun, *args, **kwargs)
        if getattr(fun, "__name__", "") != "train_step":
            return compiled

        def counted(*a, **k):
            dispatched[0] += 1
            return compiled(*a, **k)

        return counted

    def device_get(tree):
        reads.append(dispatched[0])
        return real_get(tree)

    monkeypatch.setattr(jax, "jit", jit)
    monkeypatch.setattr(jax, "device_get", device_get)
    config = tiny_config(steps=12, log_every_steps=4)
    config.checkpoint.every_steps = 0  # the final one only
    config.export.enabled = False
    train.train_and_evaluate(config, str(tmp_path))
    assert dispatched[0] == 12
    during = [n for n in reads if n < 12]
    assert sorted(set(during)) == [5, 9]  # log steps 4 and 8, read after steps 5 and 9 were dispatched
    assert len(during) == 2


def test_mfu_and_tokens_per_device_follow_jaxft_flops(tmp_path):
    from jaxft import flops, hf

    r = cli(tmp_path, "--config.train.steps=6", "--config.train.log_every_steps=2", "--config.train.peak_flops=1e9",
            devices=2)
    assert r.returncode == 0, r.stderr
    assert "MFU against 1.0 GFLOP/s per device (train.peak_flops)" in r.stdout
    config = tiny_config()
    cfg = hf.config_from_dict(config.model.init.to_dict(), "model.init")
    # LoRA rank 4 on q (32 -> 32) and v (32 -> 16) in 2 layers; the base is frozen; full width 16 every batch.
    adapter_weights = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    per_token = flops.train_flops_per_token(cfg, 16, trains_base=False, adapter_weights=adapter_weights)
    logged = [row for row in rows(tmp_path) if "train/mfu" in row]
    assert [row["step"] for row in logged] == [2, 4, 6]
    for row in logged:
        assert row["train/tokens_per_second_per_device"] == pytest.approx(row["train/tokens_per_second"] / 2)
        # mfu = flops/s / (peak x devices), tokens/s counts the same (unpadded) tokens
        assert row["train/mfu"] == pytest.approx(per_token * row["train/tokens_per_second"] / (1e9 * 2), rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/mfu")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("train/tokens_per_second_per_device")] == [2, 4, 6]


def test_rates_leave_out_the_step_that_compiled(tmp_path, monkeypatch):
    """A step that compiles is timed out of tokens/s and MFU, so its tokens and FLOPs are left out too:
    the first interval counts only the steps after it (counting them made MFU exceed 1 on short runs)."""
    from jaxft import flops, train

    counted, real_report = [], flops.Throughput.report

    def report(self, tokens, flops_total):
        counted.append(tokens - self._mark[1])
        return real_report(self, tokens, flops_total)

    monkeypatch.setattr(flops.Throughput, "report", report)
    config = tiny_config(steps=6, log_every_steps=3)
    config.export.enabled = False
    train.train_and_evaluate(config, str(tmp_path))
    per_step = config.train.batch_size * config.data.seq_len  # synthetic rows: every token is real
    assert counted == [2 * per_step, 3 * per_step]  # steps 2-3 (step 1 compiled), then steps 4-6


def test_a_peak_measured_on_a_busier_machine_is_raised_to_what_the_steps_ran(tmp_path, monkeypatch, capsys):
    """A CPU peak timed while other work shared the cores (8.8 GFLOP/s where the steps later ran 59: MFU
    1.68 in a log): the first faster interval becomes the peak, said once; MFU never exceeds 1.
    The same run, logging every step, checks that a log step of only the compiling step has no rates:
    nothing left to rate there (its time is compile time): no 0 tokens/s in the log; the next log step
    rates the steps after it."""
    from jaxft import flops, train

    monkeypatch.setattr(flops, "measured_peak_flops", lambda dtype: 1.0)  # 1 FLOP/s: every interval is faster
    config = tiny_config(steps=6, log_every_steps=1)
    config.export.enabled = False
    train.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "MFU against 0.0 GFLOP/s per device (measured float32 matmul" in out
    assert out.count("above the matmul peak measured at start-up") == 1
    mfu = [row["train/mfu"] for row in rows(tmp_path) if "train/mfu" in row]
    assert len(mfu) == 5 and mfu[0] == pytest.approx(1.0) and all(0 < x <= 1 + 1e-9 for x in mfu)
    rates = {r["step"]: r.get("train/tokens_per_second") for r in rows(tmp_path) if "train/loss" in r}
    assert rates[1] is None and rates[2] > 0 and rates[3] > 0, rates


def test_profile_steps_write_a_trace_and_the_cpu_peak_is_measured_and_said(tmp_path):
    """One CLI run checks both: --profile_steps writes a trace, and the CPU's matmul peak is measured at
    start-up, said, and keeps MFU below 1."""
    r = cli(tmp_path, "--config.train.steps=4", "--profile_steps=2:3", "--config.export.enabled=False",
            "--config.train.peak_flops=0")
    assert r.returncode == 0, r.stderr
    assert "GFLOP/s per device (measured float32 matmul on cpu" in r.stdout
    assert all(0 < row["train/mfu"] < 1 for row in rows(tmp_path) if "train/mfu" in row)
    traces = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


@pytest.mark.parametrize("value", ["3", "3:2", "a:b", "0:2"])
def test_bad_profile_steps_is_one_line_error(tmp_path, value):
    r = cli(tmp_path / "run", f"--profile_steps={value}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: --profile_steps={value}: expected START:END")
    assert not (tmp_path / "run").exists()


def fake_gcs_cli(root, workdir, *overrides):
    cmd = [sys.executable, "tests/fake_gcs.py", str(root), f"--config={TINY}", f"--workdir={workdir}", *overrides]
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    import os

    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_gs_workdir_goes_through_epath(tmp_path):
    """Checkpoints, TensorBoard, metrics and the export land in the (fake) bucket, nothing in a local
    `gs:` directory, the run resumes from the bucket and exports what a local run exports."""
    bucket = tmp_path / "gcs"
    bucket.mkdir()
    steps = ("--config.train.steps=8", "--config.checkpoint.every_steps=4")
    first = fake_gcs_cli(bucket, "gs://b/run", *steps)
    assert first.returncode == 0, first.stderr
    again = fake_gcs_cli(bucket, "gs://b/run", *steps)  # restores from the bucket, exports again
    assert again.returncode == 0, again.stderr
    assert "resuming from step 8 in gs://b/run/checkpoints" in again.stdout
    assert "exported to gs://b/run/export" in again.stdout
    run = bucket / "b" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [r["step"] for r in rows(run) if "train/loss" in r] == [2, 4, 6, 8]
    assert not (ROOT / "gs:").exists() and not (ROOT / "gs:").is_symlink()
    local = cli(tmp_path / "local", *steps)
    assert local.returncode == 0, local.stderr
    assert_same_adapter(adapter(run), adapter(tmp_path / "local"))


def test_gs_workdir_without_backend_is_one_line_error(tmp_path):
    if importlib.util.find_spec("gcsfs") or importlib.util.find_spec("tensorflow"):
        pytest.skip("a gs:// backend is installed here")
    r = cli("gs://no-such-bucket/run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "workdir=gs://no-such-bucket/run: no filesystem for gs:// paths is installed (pip install gcsfs)" in r.stderr
    assert not (ROOT / "gs:").exists()


def test_prefetch_keeps_order_and_raises_in_the_consumer():
    from jaxft.data.iterator import Prefetch

    def make(i):
        if i == 7:
            raise ValueError("bad batch 7")
        return np.full(3, i)

    p = Prefetch(make, 2, 10, depth=2)
    assert [int(p.get(i)[0]) for i in range(2, 7)] == [2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="bad batch 7"):
        p.get(7)
    p.close()
