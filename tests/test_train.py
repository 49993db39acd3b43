"""End to end through the CLI: resume after kill -9 and SIGTERM, bad input, TensorBoard, exports."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from forkserver import python_m

ROOT = Path(__file__).resolve().parent.parent
TINY = "configs/tiny_test.py"


def xla_flags(devices=1) -> str:
    """The test run's XLA flags (conftest's) for a subprocess on `devices` fake CPU devices."""
    return re.sub(r"--xla_force_host_platform_device_count=\d+", f"--xla_force_host_platform_device_count={devices}",
                  os.environ["XLA_FLAGS"])


# MFU against a given CPU peak: a run does not spend its first half second timing a matmul. The measured
# peak is tested where a run asks for it (--config.train.peak_flops=0, test_loop.py).
PEAK = "--config.train.peak_flops=1e11"


def cli(workdir, *overrides, config=TINY, devices=1, env=None, wait=True, **popen):
    """`python -m jaxft.train` on `devices` fake CPU devices, `env` added to the test run's environment."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **(env or {})}
    args = [f"--config={config}", f"--workdir={workdir}", PEAK, *overrides]
    if not wait:  # a process of its own, to signal or watch
        return subprocess.Popen([sys.executable, "-m", "jaxft.train", *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    return python_m("jaxft.train", *args, env=env)


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def assert_resumes_exactly(straight, split, args, resumed: int, last: int, **kw):
    """`straight`, a finished run of `args` whose last checkpoint is step `last`, killed after its checkpoint
    of step `resumed` (copied to `split` without the later one) and run again (`kw`: `cli`'s, e.g. devices):
    it resumes there and takes the same steps. -> the second run's process."""
    import shutil

    shutil.copytree(straight, split)
    shutil.rmtree(Path(split) / "checkpoints" / str(last))
    r = cli(split, *args, **kw)
    assert r.returncode == 0 and f"resuming from step {resumed}" in r.stdout, r.stderr[-3000:]
    steps = range(resumed + 1, last + 1)
    assert [losses(split)[s] for s in steps] == [losses(straight)[s] for s in steps]
    return r


def adapter(workdir):
    return load_file(str(Path(workdir) / "export" / "adapter_model.safetensors"))


def assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


LONG = ("--config.train.steps=60", "--config.checkpoint.every_steps=5", "--config.train.log_every_steps=1",
        "--config.method.dropout=0.1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    wd = tmp_path_factory.mktemp("straight")
    r = cli(wd, *LONG)
    assert r.returncode == 0, r.stderr
    assert "done: lora on synthetic, 60 steps" in r.stdout
    return wd


def kill_after_first_checkpoint(wd, sig):
    proc = cli(wd, *LONG, wait=False)
    ckpts = Path(wd) / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.decode(), err.decode()


# slow: resuming after kill -9 ends with the uninterrupted run's losses at every step in
# test_resume.py::test_kill_9_and_resume_log_each_step_once, and a resumed run's adapter equals the uninterrupted
# run's in test_sigterm_saves_and_exits_cleanly.
@pytest.mark.slow
def test_resume_after_kill_9_is_exact(uninterrupted, tmp_path):
    code, _, _ = kill_after_first_checkpoint(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) < 60  # really interrupted mid-run
    r = cli(tmp_path, *LONG)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {max(steps)}" in r.stdout
    assert_same_adapter(adapter(tmp_path), adapter(uninterrupted))
    assert losses(tmp_path)[60] == losses(uninterrupted)[60]


def test_sigterm_saves_and_exits_cleanly(uninterrupted, tmp_path):
    code, out, _ = kill_after_first_checkpoint(tmp_path, signal.SIGTERM)
    assert code == 0
    assert "preempted (SIGTERM): saved step" in out
    saved = int(out.split("saved step ")[1].split()[0])
    assert saved < 60 and (tmp_path / "checkpoints" / str(saved)).is_dir()
    r = cli(tmp_path, *LONG)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {saved}" in r.stdout
    assert_same_adapter(adapter(tmp_path), adapter(uninterrupted))


def test_rerun_of_finished_run_changes_nothing(uninterrupted, tmp_path):
    before = adapter(uninterrupted)
    r = cli(uninterrupted, *LONG)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 60" in r.stdout
    assert_same_adapter(adapter(uninterrupted), before)


def test_tensorboard_tags(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(uninterrupted / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "eval/loss",
                "eval/accuracy", "eval/perplexity"}
    assert expected <= tags
    assert [e.step for e in acc.Scalars("train/loss")][-1] == 60
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_second"))


# slow: grad_accum=4 gives the full batch's loss, gradient norm and parameters in
# test_sharding.py::test_grad_accumulation_same_loss_and_gradient (the train step the CLI builds), and a CLI run
# with train.grad_accum=2 logs one device's figures in test_cloze.py::test_rows_per_class_train_alike_on_eight_devices.
@pytest.mark.slow
def test_grad_accumulation_matches_full_batch(tmp_path):
    base = ("--config.train.steps=3", "--config.train.log_every_steps=1")
    a = cli(tmp_path / "a", *base)
    b = cli(tmp_path / "b", *base, "--config.train.grad_accum=4")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys() == {1, 2, 3}
    np.testing.assert_allclose([la[s] for s in la], [lb[s] for s in lb], rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["--config.method.name=dora"], "method.name='dora': unknown method"),
    (["--config.model.path=/nonexistent/model", "--config.data.name=synthetic"], "model.path '/nonexistent/model'"),
    (["--config.train.batch_size=0"], "train.batch_size=0: expected a positive integer"),
    (["--config.data.seq_len=0"], "data.seq_len=0: expected a positive integer"),
    (["--config.data.seq_len=1"], "data.seq_len=1: a causal LM needs at least 2 tokens per sequence"),
    (["--config.mesh.data=3"], "mesh {'data': 3, 'fsdp': 1, 'tensor': 1} has 3 devices but 2 are available"),
    (["--config.train.batch_size=6", "--config.mesh.data=4"], "mesh {'data': 4"),
    (["--config.model.dtype=float64"], "model.dtype='float64'"),
    (["--config.model.pooling=max"], "model.pooling='max': expected one of '', 'last', 'mean'"),
    (["--config.train.batch_size=3"], "divisible by the 2 data-parallel shards"),
    (["--config.method.name=ptuning_v2", "--config.method.init_from_tokens=True", "--config.method.projection=True"],
     "method.init_from_tokens=True needs method.projection=False"),
    (["--config.train.compilation_cache=README.md/xla"], "README.md is a file, expected a directory"),
])
def test_bad_config_is_one_line_error(tmp_path, overrides, message):
    wd = tmp_path / "run"
    r = cli(wd, *overrides, devices=2)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not wd.exists()  # nothing written half-way


def test_compilation_cache_serves_another_run(tmp_path):
    """A run leaves its compiled steps in <workdir>/xla_cache; a second run reading that cache loads them
    (JAX's own cache-hit event, in the compile line) and trains to the same losses. JAX caches only
    compiles of a second or more by default: every compile here. (Not the tests' own shared cache, which
    conftest gives JAX and a run then keeps.)"""
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_COMPILATION_CACHE_DIR": ""}
    steps = ("--config.train.steps=2", "--config.train.log_every_steps=1")
    a = cli(tmp_path / "a", *steps, env=env)
    assert a.returncode == 0, a.stderr[-3000:]
    assert "compiled the train step" in a.stdout and "(from the compilation cache)" not in a.stdout
    assert any(p.name.endswith("-cache") for p in (tmp_path / "a" / "xla_cache").iterdir())
    b = cli(tmp_path / "b", *steps, f"--config.train.compilation_cache={tmp_path / 'a' / 'xla_cache'}", env=env)
    assert b.returncode == 0, b.stderr[-3000:]
    assert "(from the compilation cache)" in b.stdout and not (tmp_path / "b" / "xla_cache").exists()
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    # A cache the user gave JAX (here conftest's) is kept, and "none" sets none.
    from jaxft.compilation_cache import cache_dir

    assert jax.config.jax_compilation_cache_dir
    assert cache_dir("", tmp_path / "c") is None and cache_dir("none", tmp_path / "c") is None


def test_malformed_data_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "good", "label": 1}\n{"text": "fine", "label": 0}\n{"text": "broken", \n')
    wd = tmp_path / "run"
    r = cli(wd, "--config.model.path=jaxft-tiny", f"--config.data.name={data}", "--config.method.name=head")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and f"{data}:3: invalid JSON" in r.stderr
    assert not wd.exists()


def test_missing_field_names_file_and_line(tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("text,label\nnice,1\n")
    r = cli(tmp_path / "run", "--config.model.path=jaxft-tiny", f"--config.data.name={data}",
            "--config.data.text_field=sentence")
    assert r.returncode == 2 and f"{data}:2: missing field 'sentence'" in r.stderr


@pytest.mark.parametrize("overrides", [
    # Each option of the slow cases below in one default case: full fine-tuning of layer 1 only, unscanned, in
    # bfloat16; a composition with deep prompts through a projection with dropout, unscanned, rematerialized.
    ["--config.method.name=full", "--config.model.dtype=bfloat16", "--config.method.layers=1",
     "--config.model.scan_layers=False"],
    ["--config.method.name=lora+ptuning_v2", "--config.method.projection=True", "--config.method.prompt_dropout=0.1",
     "--config.model.scan_layers=False", "--config.model.remat=True"],
    ["--config.method.name=head", "--config.data.synthetic_labels=3"],
    # slow: the four cases below (full in bfloat16, ptuning_v2 with a projection and dropout, lora+ptuning_v2
    # unscanned with remat, full of layer 1 unscanned) train with each of their options in the first two cases.
    pytest.param(["--config.method.name=full", "--config.model.dtype=bfloat16"], marks=pytest.mark.slow),
    pytest.param(["--config.method.name=ptuning_v2", "--config.method.projection=True",
                  "--config.method.prompt_dropout=0.1"], marks=pytest.mark.slow),
    pytest.param(["--config.method.name=lora+ptuning_v2", "--config.model.scan_layers=False",
                  "--config.model.remat=True"], marks=pytest.mark.slow),
    pytest.param(["--config.method.name=full", "--config.method.layers=1", "--config.model.scan_layers=False"],
                 marks=pytest.mark.slow),
    # slow: lora+prompt_tuning; a composed method trains through the CLI in the lora+ptuning_v2 case above,
    # lora+prompt_tuning runs through the CLI in test_an_export_replaces_an_earlier_runs_export_in_the_same_dir,
    # and synthetic labels train a classifier in the head case.
    pytest.param(["--config.method.name=lora+prompt_tuning", "--config.data.synthetic_labels=2"],
                 marks=pytest.mark.slow),
])
def test_methods_and_model_options_train(tmp_path, overrides):
    # 8 examples = one batch seen every step, so any method can fit it a little.
    r = cli(tmp_path, "--config.train.steps=6", "--config.train.log_every_steps=1", "--config.data.synthetic_examples=8",
            "--config.optimizer.learning_rate=1e-2", *overrides)
    assert r.returncode == 0, r.stderr
    got = losses(tmp_path)
    assert all(np.isfinite(v) for v in got.values())
    assert got[6] < got[1]  # it learns something
    assert (tmp_path / "export").is_dir()


@pytest.mark.parametrize("args,message", [
    (["--config=configs/nope.py"], "--config=configs/nope.py: no such config file"),
    ([f"--config={TINY}", "--config.train.stepz=3"],
     'error: --config.train.stepz: no such config key. Did you mean "steps" instead of "stepz"?\n'),
    ([f"--config={TINY}", "--config.train.steps=abc"], "--config.train.steps=abc"),
    ([], "--config=configs/NAME.py is required"),
    ([f"--config={TINY}", "--num_processes=2"], "--coordinator_address, --num_processes and --process_id go together"),
    ([f"--config={TINY}", "stray"], "unexpected arguments: stray"),
])
def test_bad_command_line_is_one_line_error(tmp_path, args, message):
    wd = tmp_path / "run"
    r = python_m("jaxft.train", f"--workdir={wd}", *args, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "\\'" not in r.stderr
    assert not wd.exists()


@pytest.mark.parametrize("overrides,key", [
    (("--config.model.dtype=float16",), "train/loss_scale"),  # fp16's dynamic loss scale
    (("--config.method.name=adalora", "--config.method.init_r=4", "--config.method.target_r=2"), "train/aux_loss"),
])
def test_optional_step_metrics_are_logged(tmp_path, overrides, key):
    """Was: computed by the step, never written to metrics.jsonl or TensorBoard."""
    r = cli(tmp_path, *overrides, "--config.export.enabled=False")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [row[key] for row in rows if "train/loss" in row]
    assert len(logged) == 4 and all(np.isfinite(logged)) and logged[0] > 0
    if key == "train/loss_scale":
        assert all(v <= 2.0**15 and np.log2(v) == int(np.log2(v)) for v in logged)  # halved on overflow


def test_an_export_replaces_an_earlier_runs_export_in_the_same_dir(tmp_path):
    """Was: the earlier run's files stayed beside the new ones, and the loaders could pick them (an old
    adapter_config.json over a new full model, an old single adapter over a composed method's)."""
    from jaxft.peft.hf_peft import adapter_dirs

    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    names = lambda: sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())  # noqa: E731
    for i, (method, expect) in enumerate([
        ("lora", ["adapter_config.json", "adapter_model.safetensors"]),
        ("full", ["config.json", "model.safetensors"]),
        ("lora+prompt_tuning", ["lora/adapter_config.json", "lora/adapter_model.safetensors",
                                "prompt_tuning/adapter_config.json", "prompt_tuning/adapter_model.safetensors"]),
        ("lora", ["adapter_config.json", "adapter_model.safetensors"]),
    ]):
        r = cli(tmp_path / f"run{i}", f"--config.method.name={method}", f"--config.export.dir={out}",
                "--config.train.steps=2")
        assert r.returncode == 0, r.stderr[-3000:]
        assert names() == sorted(expect + ["notes.txt"]), method  # only this run's export, and the user's file
    assert adapter_dirs(out) == [out]
