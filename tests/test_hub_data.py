"""Hub datasets through `datasets.load_dataset` (`data.name="hub:..."`, `data.hub_config`, `data.train_split`,
`data.eval_split`), without the network: a dataset repository on disk with two configs and named splits
(its README's `configs:` section, as hub datasets declare them), and an uncached hub name offline."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from jaxft.data import sources
from jaxft.errors import JaxftError
from test_train import ROOT, xla_flags

SPLITS = {"en": ("train", "dev"), "fr": ("train", "test")}
README = """---
configs:
""" + "".join(
    f"- config_name: {c}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {c}/{s}.jsonl\n" for s in splits)
    for c, splits in SPLITS.items()
) + "---\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A dataset repository: config `en` (train, dev) and `fr` (train, test), 4 rows per split."""
    root = tmp_path_factory.mktemp("hub") / "two_configs"
    for c, splits in SPLITS.items():
        (root / c).mkdir(parents=True)
        for s in splits:
            rows = [{"text": f"{c} {s} {i}", "label": i % 2} for i in range(4)]
            (root / c / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "README.md").write_text(README)
    return root


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))


def data_cfg(name, **kw):
    return ml_collections.ConfigDict({"name": name, "eval_name": "", "text_field": "", "label_field": "",
                                      "hub_config": "", "train_split": "train", "eval_split": "", **kw})


def texts(records):
    return [r["text"] for r in records.rows]


def test_config_and_named_splits(repo):
    train, ev, text_field, label_field = sources.resolve(data_cfg(f"hub:{repo}", hub_config="en", eval_split="dev"))
    assert texts(train) == [f"en train {i}" for i in range(4)] and texts(ev) == [f"en dev {i}" for i in range(4)]
    assert (text_field, label_field) == ("text", "label")
    assert train.where[1] == f"{repo}/en[train] row 1"  # the data cache's key tells configs apart
    train, ev, *_ = sources.resolve(data_cfg(f"hub:{repo}", hub_config="fr", train_split="test", eval_split="none"))
    assert texts(train) == [f"fr test {i}" for i in range(4)] and ev is None
    # No eval split named: "validation" where the dataset has one, else none (data.eval_holdout may apply).
    _, ev, *_ = sources.resolve(data_cfg(f"hub:{repo}", hub_config="fr"))
    assert ev is None
    _, ev, *_ = sources.resolve(data_cfg(f"hub:{repo}", hub_config="fr", eval_name="test"))  # the older key
    assert texts(ev) == [f"fr test {i}" for i in range(4)]


@pytest.mark.parametrize("kw,fragments", [
    (dict(hub_config="de"), ["data.hub_config='de'", "no such config", "'en', 'fr'"]),
    (dict(hub_config="fr", eval_split="dev"), ["data.eval_split='dev'", "no such split", "train, test"]),
    (dict(hub_config="en", train_split="training"), ["data.train_split='training'", "no such split", "train, dev"]),
])
def test_missing_config_or_split_is_one_line(repo, kw, fragments):
    with pytest.raises(JaxftError) as e:
        sources.resolve(data_cfg(f"hub:{repo}", **kw))
    assert "\n" not in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def run_train(tmp_path, *overrides, **env):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(), "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), **env}
    cmd = [sys.executable, "-m", "jaxft.train", "--config=configs/lora.py", f"--workdir={tmp_path / 'run'}",
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_offline_and_not_cached_is_one_line_exit_2(tmp_path):
    r = run_train(tmp_path, "--config.data.name=hub:nobody/no-such-dataset", "--config.data.hub_config=x",
                  HF_DATASETS_OFFLINE="1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: data.name 'nobody/no-such-dataset'"), r.stderr[-3000:]
    assert "not in the Hugging Face cache" in lines[0] and "HF_DATASETS_OFFLINE=1" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

