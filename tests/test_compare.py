"""`python -m jaxft.compare`: two tiny configs, two seeds each, through jaxft.train's command line."""

import json
import os
import subprocess
import sys

from test_train import PEAK, ROOT, xla_flags

TINY = (ROOT / "configs" / "tiny_test.py").read_text()


def tiny_config(path, method: str):
    path.write_text(TINY.replace('c.method.name = "lora"', f'c.method.name = "{method}"'))
    return path


def compare(configs, work, *extra, seeds=2):
    # Its training runs on one CPU device at a given CPU peak, as test_train.cli's: the test run's 8 fake devices
    # (conftest) made each a data-parallel run over 8, half as dear again to compile and run.
    return subprocess.run([sys.executable, "-m", "jaxft.compare", f"--configs={','.join(map(str, configs))}",
                           f"--seeds={seeds}", f"--workdir={work}", "--config.train.steps=4",
                           "--config.data.synthetic_labels=2", "--config.data.synthetic_examples=64", PEAK, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "XLA_FLAGS": xla_flags(1)})


def test_compare_two_configs(tmp_path):
    a, b = tiny_config(tmp_path / "tiny_lora.py", "lora"), tiny_config(tmp_path / "tiny_prompt.py", "prompt_tuning")
    work = tmp_path / "cmp"
    r = compare([a, b], work)
    assert r.returncode == 0, r.stderr[-3000:]
    # Runs go seed by seed (every config's first seed first); the table is config by config.
    started = [line.split(" -> ")[0] for line in r.stdout.splitlines() if " -> " in line]
    assert started == [f"compare: {a} seed 0", f"compare: {b} seed 0", f"compare: {a} seed 1", f"compare: {b} seed 1"]
    result = json.loads((work / "compare.json").read_text())
    assert [(x["config"], x["seed"]) for x in result["runs"]] == [("tiny_lora", 0), ("tiny_lora", 1),
                                                                   ("tiny_prompt", 0), ("tiny_prompt", 1)]
    assert all(x["returncode"] == 0 for x in result["runs"])
    for s in result["summary"]:
        runs = [x for x in result["runs"] if x["config"] == s["config"]]
        accs = [x["eval"]["eval/accuracy"] for x in runs]
        assert s["metric"] == "eval/accuracy" and s["ok"] == 2
        assert abs(s["mean"] - sum(accs) / 2) < 1e-9
        assert abs(s["std"] - abs(accs[0] - accs[1]) / 2 ** 0.5) < 1e-9  # sample std of two
        # The trainable count is the run's own log line; the export holds the adapter only.
        log = (work / f"{s['config']}-seed0" / "stdout.log").read_text()
        assert f"trainable {s['trainable']:,} /" in log
        assert 0 < s["export_bytes"] < 200_000 and s["tokens_per_second"] > 0 and s["peak_rss_mib"] > 50
    assert {s["method"] for s in result["summary"]} == {"lora", "prompt_tuning"}
    table = (work / "compare.md").read_text()
    assert "| tiny_lora | lora | eval/accuracy |" in table and "| tiny_prompt | prompt_tuning |" in table
    figure = work / "compare.png" if (work / "compare.png").exists() else work / "compare.svg"
    assert figure.exists() and figure.stat().st_size > 500

    # Run again: every finished run is reused, not trained again, and the table is the same.
    first = json.loads((work / "compare.json").read_text())
    r = compare([a, b], work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("finished before, reused") == 4 and " -> " not in r.stdout
    assert json.loads((work / "compare.json").read_text())["summary"] == first["summary"]
    # --collect trains nothing: a config never run and a seed never run are counted as not run.
    c = tiny_config(tmp_path / "tiny_ia3.py", "ia3")
    r = compare([a, c], work, "--collect", "--reference=majority class=0.5", seeds=3)
    lines = r.stderr.strip().splitlines()  # the table is written, but rows are missing: not exit 0
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0] == (f"error: 4 of 6 runs failed or did not finish (first: tiny_lora seed 2: not run); "
                        f"{work / 'compare.md'} holds the 2 that finished"), lines[0]
    assert " -> " not in r.stdout and not (work / "tiny_ia3-seed0").exists()
    table = (work / "compare.md").read_text()
    assert "| tiny_ia3 | | | not run | | | 0/3 |" in table and "| 2/3 |" in table and "majority class: 0.5000" in table
    # A config whose values change trains again (so do other overrides; a docstring edit does not);
    # the unchanged one is still reused (the first seed of each: one run trains, not two).
    b.write_text(b.read_text().replace("c.optimizer.learning_rate = 1e-2", "c.optimizer.learning_rate = 2e-2"))
    r = compare([a, b], work, seeds=1)
    assert r.returncode == 0, r.stderr[-3000:]
    started = [line.split(" -> ")[0] for line in r.stdout.splitlines() if " -> " in line]
    assert started == [f"compare: {b} seed 0"] and r.stdout.count("reused") == 1
    assert [s["ok"] for s in json.loads((work / "compare.json").read_text())["summary"]] == [1, 1]


def test_compare_reports_a_failed_run_and_goes_on(tmp_path):
    bad = tiny_config(tmp_path / "tiny_bitfit.py", "bitfit")  # a bias-free Llama: bitfit stops with one line
    work = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "jaxft.compare", f"--configs={bad}", f"--workdir={work}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Was: exit 0 with every run failed. The table is still written; the exit status says it is incomplete.
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: 1 of 1 runs failed or did not finish (first: tiny_bitfit seed 0: "
                               "method.name='bitfit': this llama model has no bias parameters"), lines[0]
    assert lines[0].endswith(f"{work / 'compare.md'} holds the 0 that finished"), lines[0]
    assert "failed: error: method.name='bitfit': this llama model has no bias parameters" in (work / "compare.md").read_text()


def test_table_and_plot_from_rows(tmp_path):
    """The summary, table and SVG plot from finished rows, with a reference line (no training)."""
    from jaxft import compare as cmp

    def row(config, seed, acc, trainable):
        return {"config": config, "seed": seed, "returncode": 0, "method": config, "trainable": trainable,
                "total": 10_000, "eval": {"eval/accuracy": acc}, "tokens_per_second": 100.0 + seed,
                "export_bytes": 2 ** 20, "peak_rss_mib": 500.0 + seed}

    rows = [row("a", 0, 0.70, 100), row("a", 1, 0.80, 100), row("a", 2, 0.90, 100), row("b", 0, 0.60, 5000),
            {"config": "c", "seed": 0, "returncode": 2, "peak_rss_mib": 1.0, "error": "error: no biases"}]
    summary = cmp.summarize(rows, "")
    a, b, c = summary
    assert abs(a["mean"] - 0.8) < 1e-12 and abs(a["std"] - 0.1) < 1e-12 and a["ok"] == 3  # sample std
    assert b["std"] == 0.0 and c["ok"] == 0 and c["error"] == "error: no biases"
    assert a["tokens_per_second"] == 101.0 and a["peak_rss_mib"] == 502.0
    text = cmp.table(summary, ("majority class", 0.509))
    assert "| a | a | eval/accuracy | 0.8000 | 0.1000 | 0.700 0.800 0.900 | 3/3 | 100 | 1.00 MiB | 101 | 502 MiB |" in text
    assert "| c | | | failed: error: no biases |" in text and "majority class: 0.5090" in text
    svg = cmp.svg_plot([s for s in summary if s["ok"]], "eval/accuracy", tmp_path / "p.svg", ("majority class", 0.509))
    body = svg.read_text()
    assert body.count("<circle") == 2 and "stroke-dasharray" in body and "majority class 0.509" in body


def test_unfinished_runs_are_named():
    """The runs that make the comparison exit non-zero: failed, not run, or finished without the dev metric."""
    from jaxft import compare as cmp

    ok = {"config": "a", "seed": 0, "returncode": 0, "eval": {"eval/accuracy": 0.7}, "peak_rss_mib": 1.0}
    rows = [ok, {**ok, "seed": 1, "eval": {"eval/loss": 0.5}},
            {"config": "b", "seed": 0, "returncode": 2, "peak_rss_mib": 1.0, "error": "error: no biases"},
            {"config": "b", "seed": 1, "returncode": None, "peak_rss_mib": None, "error": "not run"}]
    assert cmp.unfinished_runs(rows, cmp.summarize(rows, "")) == [
        {"config": "a", "seed": 1, "why": "finished without eval/accuracy"},
        {"config": "b", "seed": 0, "why": "no biases"}, {"config": "b", "seed": 1, "why": "not run"}]
    assert cmp.unfinished_runs([ok], cmp.summarize([ok], "")) == []


def test_unfinished_runs_are_not_reused(tmp_path, monkeypatch):
    from jaxft import compare as cmp

    config = tiny_config(tmp_path / "tiny.py", "lora")
    row = {"returncode": 0, "overrides": [], "config_sha256": cmp.config_digest(str(config)), "eval": {"eval/accuracy": 0.6}}
    (tmp_path / "result.json").write_text(json.dumps(row))
    assert cmp.finished(str(config), tmp_path, []) == row
    assert cmp.finished(str(config), tmp_path, ["--config.train.steps=9"]) is None  # other overrides
    config.write_text('"""Another docstring."""\n' + config.read_text())
    assert cmp.finished(str(config), tmp_path, []) == row  # the same values
    config.write_text(config.read_text().replace("c.train.steps = ", "c.train.steps = 1 + "))
    assert cmp.finished(str(config), tmp_path, []) is None  # other values
    config.write_text(config.read_text().replace("c.train.steps = 1 + ", "c.train.steps = "))
    assert cmp.finished(str(config), tmp_path, []) == row
    # A new config key (at its default) keeps the run reusable; the config setting it away from the default does not.
    import jaxft.config

    base = jaxft.config.base_config
    monkeypatch.setattr(jaxft.config, "base_config", lambda: (c := base(), c.train.update(new_key=3))[0])
    config.write_text(config.read_text().replace("    return c", "    c.train.new_key = 3\n    return c"))
    assert cmp.finished(str(config), tmp_path, []) == row
    config.write_text(config.read_text().replace("c.train.new_key = 3", "c.train.new_key = 4"))
    assert cmp.finished(str(config), tmp_path, []) is None
    legacy = {**row, "config_sha256": cmp.config_digest(str(config), everything=True)}  # earlier versions' digest
    (tmp_path / "result.json").write_text(json.dumps(legacy))
    assert cmp.finished(str(config), tmp_path, []) == legacy
    (tmp_path / "result.json").write_text(json.dumps({**row, "eval": {}}))  # stopped before its evaluation
    assert cmp.finished(str(config), tmp_path, []) is None


def test_usage_errors_are_one_line(tmp_path):
    """Found by the input audit. Was: argparse's usage page (5 lines) for a bad or missing flag, and a
    FileExistsError traceback for a --workdir that is a file."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    tiny = str(ROOT / "configs" / "tiny_test.py")
    for args, fragment in ((["--seeds=abc"], "argument --seeds: invalid int value: 'abc'"),
                           ([], "the following arguments are required: --configs"),
                           ([f"--configs={tiny}", f"--workdir={afile}", "--collect"], f"{afile} is a file")):
        r = subprocess.run([sys.executable, "-m", "jaxft.compare", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert fragment in lines[0], lines[0]
    assert afile.read_text() == "x"


def test_a_metric_no_run_reports_is_an_error(tmp_path):
    """Found by the second input audit. Was: exit 0 and a table whose metric columns were empty
    (--metric=eval/acuracy, say)."""
    a = tiny_config(tmp_path / "tiny_lora.py", "lora")
    work = tmp_path / "cmp"
    r = compare([a], work, "--metric=eval/acuracy", seeds=1)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: --metric=eval/acuracy: the run {work / 'tiny_lora-seed0'} reports no such "
                               "metric (it reports eval/accuracy, "), lines[0]
    assert "eval/loss" in lines[0]
    assert not (work / "compare.md").exists() and (work / "tiny_lora-seed0" / "result.json").exists()  # the run kept
    r = compare([a], work, "--metric=eval/accuracy", seeds=1)  # reused: the table
    assert r.returncode == 0 and "reused" in r.stdout and "| eval/accuracy |" in (work / "compare.md").read_text()
