"""Metric sinks: TensorBoard event files (no TensorFlow needed) and metrics.jsonl, process 0 only;
and the scores (accuracy, precision/recall/F1, exact match, perplexity, ROUGE, BLEU) from
`jaxft.scores`, so `jaxft.metrics.rouge(predictions, references)` is the public name.

Both are written through `epath`, so a `gs://` workdir works like a local one. A resumed run keeps
each step once: metrics.jsonl rows past the restored step (written by a run killed after its last
checkpoint) are dropped, and a new event file starts with a SessionLog START at the first step the
resumed run writes, which makes TensorBoard purge the orphaned later events of the killed run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time

import jax

from jaxft.scores import (accuracy, bleu, confusion_matrix, exact_match, from_confusion,  # noqa: F401
                          perplexity, precision_recall_f1, rouge, tool_call_accuracy)


class MetricWriter:
    def __init__(self, workdir, resume_step: int = 0):
        """`workdir`: an epath.Path. Rows and events after `resume_step` from earlier runs are dropped."""
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter

        jsonl = workdir / "metrics.jsonl"
        kept = []
        if jsonl.exists() and resume_step:  # a run that made no checkpoint starts over
            kept = [line for line in jsonl.read_text().splitlines() if _step(line) <= resume_step]
        self._jsonl = jsonl.open("w")
        self._jsonl.write("".join(line + "\n" for line in kept))
        self._jsonl.flush()

        tb = workdir / "tensorboard"
        tb.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads event files in name order: this run's must sort after every earlier one.
        stamps = [p.name.split(".")[3] for p in tb.glob("events.out.tfevents.*")]
        stamp = max([int(time.time())] + [int(t) + 1 for t in stamps if t.isdigit()])
        name = f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}.jaxft"
        self._tb = RecordWriter((tb / name).open("wb"))
        self._event(Event(wall_time=time.time(), file_version="brain.Event:2"))
        # TensorBoard drops the earlier runs' events from this step on
        start = resume_step + 1 if resume_step else 0
        self._event(Event(wall_time=time.time(), step=start, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _event(self, event):
        self._tb.write(event.SerializeToString())

    def write(self, step: int, scalars: dict[str, float]):
        if not self.enabled:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self._event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def note(self, step: int, facts: dict):
        """A metrics.jsonl row of non-numeric facts about the run (e.g. settings accepted on resume)."""
        if self.enabled:
            self._jsonl.write(json.dumps({"step": int(step), **facts}) + "\n")

    def flush(self):
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self):
        if self.enabled and not self._jsonl.closed:
            self._tb.close()
            self._jsonl.close()


def write_scalars(directory, step: int, scalars: dict[str, float]):
    """One new TensorBoard event file in `directory` (an epath.Path) holding `scalars` at `step`: next to
    a run's own files it adds points without the SessionLog START a resuming MetricWriter writes (which
    would hide the run's later steps)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    directory.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.jaxft-eval"
    with (directory / name).open("wb") as f:
        writer = RecordWriter(f)
        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        for event in (Event(wall_time=time.time(), file_version="brain.Event:2"),
                      Event(wall_time=time.time(), step=int(step), summary=Summary(value=values))):
            writer.write(event.SerializeToString())
        writer.flush()


def _step(line: str) -> float:
    """A metrics.jsonl row's step; a row cut short by kill -9 counts as past any step (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def summarize(sums: dict, prefix: str, perplexity: bool, labels=None) -> dict[str, float]:
    """Summed loss/correct/count -> mean loss, accuracy and (for token losses) perplexity; with a
    confusion matrix (rows: true class, columns: predicted), precision, recall and F1 per class named
    by `labels`, and their macro averages (`jaxft.scores.from_confusion`; the micro ones equal the
    accuracy and are left out). A class never predicted (or never present) scores 0. A sum named
    `mean/NAME` is reported as its mean over the count, `{prefix}/NAME` (DPO's rewards)."""
    count = max(float(sums["count"]), 1.0)
    loss = float(sums["loss_sum"]) / count
    out = {f"{prefix}/loss": loss, f"{prefix}/accuracy": float(sums["correct"]) / count}
    if perplexity:
        out[f"{prefix}/perplexity"] = math.exp(min(loss, 50.0))
    out.update({f"{prefix}/{k[len('mean/'):]}": float(v) / count for k, v in sums.items() if k.startswith("mean/")})
    if "confusion" in sums:
        confusion = sums["confusion"]
        names = [str(n) for n in labels] if labels is not None else [str(i) for i in range(len(confusion))]
        scores = from_confusion(confusion, names)
        out.update({f"{prefix}/{k}": v for k, v in scores.items() if not k.endswith("_micro")})
    if "entities/true" in sums:  # tagged words (NER): whole entities, as seqeval scores them
        from jaxft.entities import scores as entity_scores

        out.update({f"{prefix}/{k}": v for k, v in entity_scores(sums, labels).items()})
    return out
