"""Same losses whatever the layout: 1 vs 8 devices (data, FSDP, tensor parallel), 1 vs 2 processes."""

import os
import socket
import subprocess

import numpy as np
import pytest

from test_train import ROOT, TINY, cli, losses

RUN = ("--config.method.name=full", "--config.train.steps=4", "--config.train.log_every_steps=1",
       "--config.train.batch_size=8")


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    wd = tmp_path_factory.mktemp("one")
    r = cli(wd, *RUN, "--config.mesh.data=1")
    assert r.returncode == 0, r.stderr
    return losses(wd)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 2, 4)])
def test_eight_devices_match_one(single_device, tmp_path, mesh):
    d, f, t = mesh
    r = cli(tmp_path, *RUN, f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}",
            devices=8)
    assert r.returncode == 0, r.stderr
    assert f"mesh {{'data': {d}, 'fsdp': {f}, 'tensor': {t}}} over 8 devices" in r.stdout
    got = losses(tmp_path)
    assert got.keys() == single_device.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([got[s] for s in got], [single_device[s] for s in single_device], rtol=2e-5)


def test_mean_pooling_classifier_eight_devices_match_one(tmp_path):
    """Deep prompts and a mean-pooling head: the pooled sum runs over a batch split across devices."""
    run = (*RUN[1:], "--config.method.name=ptuning_v2", "--config.data.synthetic_labels=2",
           "--config.model.pooling=mean")
    one, eight = tmp_path / "one", tmp_path / "eight"
    r = cli(one, *run, "--config.mesh.data=1")
    assert r.returncode == 0, r.stderr
    assert "head=classification (mean pooling) | method: ptuning_v2" in r.stdout
    r = cli(eight, *run, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", devices=8)
    assert r.returncode == 0, r.stderr
    ref, got = losses(one), losses(eight)
    assert got.keys() == ref.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in ref], rtol=2e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    ref = tmp_path / "one"
    r = cli(ref, *RUN, "--config.mesh.data=2", "--config.mesh.fsdp=2", devices=4)
    assert r.returncode == 0, r.stderr

    wd, port = tmp_path / "two", free_port()
    procs = [
        cli(wd, *RUN, "--config.mesh.data=2", "--config.mesh.fsdp=2", f"--coordinator_address=localhost:{port}",
            "--num_processes=2", f"--process_id={i}", devices=2, wait=False)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()[-3000:]
    assert "over 4 devices, 2 process(es)" in outs[0][0].decode()
    assert outs[1][0].decode().count("done:") == 0  # only process 0 reports
    one, two = losses(ref), losses(wd)
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([two[s] for s in two], [one[s] for s in one], rtol=2e-5)
    assert (wd / "checkpoints" / "4").is_dir()


def test_local_launcher_runs_two_processes(tmp_path):
    port = free_port()
    r = subprocess.run(["launch/local_multiprocess.sh", "2", "2", TINY, str(tmp_path), *RUN], cwd=ROOT,
                       env={**os.environ, "PORT": str(port)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "over 4 devices, 2 process(es)" in r.stdout
    assert (tmp_path / "logs" / "process_1.log").exists()
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
