"""Metric sinks: TensorBoard event files (no TensorFlow needed) and metrics.jsonl, process 0 only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax


class MetricWriter:
    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._tb = EventFileWriter(str(Path(workdir) / "tensorboard"))
        self._jsonl = open(Path(workdir) / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, step: int, scalars: dict[str, float]):
        if not self.enabled:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def flush(self):
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self):
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def summarize(sums: dict, prefix: str, perplexity: bool, labels=None) -> dict[str, float]:
    """Summed loss/correct/count -> mean loss, accuracy and (for token losses) perplexity; with a
    confusion matrix (rows: true class, columns: predicted), precision, recall and F1 per class named
    by `labels`, and their macro average. A class never predicted (or never present) scores 0."""
    count = max(float(sums["count"]), 1.0)
    loss = float(sums["loss_sum"]) / count
    out = {f"{prefix}/loss": loss, f"{prefix}/accuracy": float(sums["correct"]) / count}
    if perplexity:
        out[f"{prefix}/perplexity"] = math.exp(min(loss, 50.0))
    if "confusion" in sums:
        confusion = [[float(v) for v in row] for row in sums["confusion"]]
        names = [str(n) for n in labels] if labels is not None else [str(i) for i in range(len(confusion))]
        f1s = []
        for i, name in enumerate(names):
            hit = confusion[i][i]
            predicted, actual = sum(row[i] for row in confusion), sum(confusion[i])
            precision = hit / predicted if predicted else 0.0
            recall = hit / actual if actual else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out.update({f"{prefix}/precision/{name}": precision, f"{prefix}/recall/{name}": recall,
                        f"{prefix}/f1/{name}": f1})
            f1s.append(f1)
        out[f"{prefix}/f1_macro"] = sum(f1s) / len(f1s)
    return out
