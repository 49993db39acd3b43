"""Entity precision, recall and F1 of tagged words (`jaxft.entities`) against seqeval, their oracle."""

import numpy as np
import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from jaxft.entities import entity_sums, scheme, scores

IOB2 = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
IOBES = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-ORG", "I-ORG", "E-ORG", "S-ORG"]
BMES = ["O", "B-NAME", "M-NAME", "E-NAME", "S-NAME", "B-ORG", "M-ORG", "E-ORG", "S-ORG"]  # Chinese NER sets' scheme


def random_batch(rng, labels, rows=24, length=20, sparse=0.3):
    """Tags drawn at random (every malformed sequence seqeval must read too: I- after O, types that change),
    -100 at random positions (a word's later sub-words), and a padding row of weight 0."""
    gold = rng.integers(0, len(labels), (rows, length))
    pred = np.where(rng.random((rows, length)) < 0.6, gold, rng.integers(0, len(labels), (rows, length)))
    gold = np.where(rng.random((rows, length)) < sparse, -100, gold)
    weight = np.ones(rows, np.float32)
    weight[-1] = 0.0
    logits = np.eye(len(labels), dtype=np.float32)[pred] + rng.normal(0, 0.01, (rows, length, len(labels)))
    return logits.astype(np.float32), {"labels": gold.astype(np.int32), "weight": weight}


def as_seqeval(logits, batch, labels):
    """The labelled positions of each real row as tag strings: seqeval's input (BMES's M- read as IOBES's I-,
    which seqeval knows)."""
    gold, pred = [], []
    names = [n.replace("M-", "I-") for n in labels]
    for row in range(len(batch["weight"]) - 1):
        keep = batch["labels"][row] >= 0
        gold.append([names[i] for i in batch["labels"][row][keep]])
        pred.append([names[i] for i in np.argmax(logits[row], -1)[keep]])
    return gold, pred


@pytest.mark.parametrize("labels", [IOB2, IOBES, BMES], ids=["iob2", "iobes", "bmes"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entity_scores_equal_seqeval(labels, seed):
    logits, batch = random_batch(np.random.default_rng(seed), labels)
    sums = {k: np.asarray(v) for k, v in entity_sums(logits, batch, labels).items()}
    got = scores(sums, labels)
    gold, pred = as_seqeval(logits, batch, labels)
    assert got["entity_precision"] == pytest.approx(precision_score(gold, pred), abs=1e-6)
    assert got["entity_recall"] == pytest.approx(recall_score(gold, pred), abs=1e-6)
    assert got["entity_f1"] == pytest.approx(f1_score(gold, pred), abs=1e-6)
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    for name in scheme(labels)[2]:
        assert got[f"entity_f1/{name}"] == pytest.approx(report[name]["f1-score"], abs=1e-6), name
        assert sums["entities/true"][scheme(labels)[2].index(name)] == report[name]["support"]


def test_labels_that_are_not_tags_count_no_entities():
    logits, batch = random_batch(np.random.default_rng(0), ["neg", "pos"])
    assert entity_sums(logits, batch, ["neg", "pos"]) == {}
    assert scheme(["O", "PER"]) is None and scheme(None) is None and scheme(["O"]) is None
