"""tools/probe.py: linear probes on a frozen model's features."""

import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import probe  # noqa: E402


def write_task(path, n, seed):
    """Label 1 iff the sentence contains 'good': a bag of words separates it exactly."""
    rng = random.Random(seed)
    words = "the movie film story actor was is very quite and of it".split()
    with open(path, "w") as f:
        for i in range(n):
            label = i % 2
            text = [rng.choice(words) for _ in range(rng.randint(3, 8))]
            text.insert(rng.randrange(len(text) + 1), "good" if label else "bad")
            f.write(json.dumps({"text": " ".join(text), "label": label}) + "\n")


def test_probe_pools_the_state_the_head_reads_and_separates_a_lexical_task(tmp_path, capsys):
    write_task(tmp_path / "train.jsonl", 96, 0)
    write_task(tmp_path / "dev.jsonl", 32, 1)
    argv = [f"--data={tmp_path / 'train.jsonl'}", f"--eval_data={tmp_path / 'dev.jsonl'}", "--seq_len=16",
            "--batch=32", "--steps=200"]
    args = probe.parse_args(argv)
    model, params, train, ev = probe.load(args)
    feats = probe.features(model, params, ev, batch=32)
    # Cross-check: with tied embeddings, the final-norm last-token state times the embedding matrix
    # is the causal LM's logits at the last real token.
    logits = np.asarray(model.apply({"params": params}, ev["input_ids"], ev["attention_mask"]))
    last = ev["attention_mask"].sum(1) - 1
    expected = logits[np.arange(len(last)), last]
    got = feats["final norm, last token"] @ np.asarray(params["embed_tokens"]).T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(feats["final norm, mean"], feats["final norm, last token"])

    results = probe.main(argv)
    assert results["bag of words (token counts)"][1] == 1.0
    assert len(results) == 2 + 2 * (model.cfg.num_layers + 1)
    assert all(0.0 <= acc <= 1.0 for pair in results.values() for acc in pair)
    assert "bag of words (token counts)" in capsys.readouterr().out


def test_probe_without_eval_split_is_one_line(tmp_path, capsys):
    write_task(tmp_path / "train.jsonl", 8, 0)
    assert probe.main([f"--data={tmp_path / 'train.jsonl'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no eval split" in err
