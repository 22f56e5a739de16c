"""The results table of a sweep: one `TrialResult` per trial, a CSV round trip, and metric → error.

A sweep's scaling analysis starts from this flat table (one row per trial, the three axes as columns),
so it can be rebuilt offline from `results.csv` without Ray or MLflow.

CSV layout (`write_csv` / `read_csv`):
- scalar fields are plain columns: trial_id, data, model, batch, params, macs_per_sample, samples_seen,
  compute, wall_s, state;
- each final metric is a column `metric:<name>` (e.g. `metric:eval/zeroshot/test/top1`); an empty cell
  means the trial did not report that metric;
- each extra grid key is a column `extra:<key>` holding the JSON encoding of its value (so `lr` stays a
  float and a string stays a string); an empty cell means the trial has no such key;
- the loss curve is one JSON-encoded column `curve`: `[[samples_seen, loss], ...]`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["COMPUTE_AXIS_LABEL", "COMPUTE_CONVENTION", "FINISHED", "TrialResult", "error_of",
           "is_accuracy_metric", "read_csv", "write_csv"]

FINISHED = "TERMINATED"
# What `TrialResult.compute` counts. Every scalelab step is a gradient-cache step, which encodes each
# sample twice (phase 1 without autograd, phase 3 again with autograd + backward), so the work executed
# is 4 forwards per sample, not the 3 (forward + backward) that papers' "model compute" counts.
# Same wording as `scalelab.train.compute.COMPUTE_CONVENTION` (scaling may not import train).
COMPUTE_CONVENTION = ("MACs executed in training: 4 x forward MACs per sample (the gradient cache's "
                      "no-grad forward + re-forward + backward, 4/3 of a plain step); evaluation excluded")
COMPUTE_AXIS_LABEL = "training compute C, MACs executed (4× forward MACs per sample)"
_SCALARS = ("trial_id", "data", "model", "batch", "params", "macs_per_sample", "samples_seen", "compute",
            "wall_s", "state")
_INTS = ("data", "batch", "params", "macs_per_sample", "samples_seen")
_FLOATS = ("compute", "wall_s")
_METRIC = "metric:"
_EXTRA = "extra:"
# Accuracy-like metrics (fraction correct, higher is better) are turned into an error by 1 - value.
# Matched on the last path segment of the metric key: top1, top5, recall@k / r1 / r5 / r10, acc*.
_ACCURACY = re.compile(r"^(top\d+|recall.*|r@?\d+|acc.*|.*_r@?\d+|.*_top\d+|.*_recall.*)$", re.IGNORECASE)


@dataclass
class TrialResult:
    """One finished (or failed / pending) trial of a sweep, as the scaling analysis sees it."""

    trial_id: str
    data: int  # number of distinct training pairs (the data axis)
    model: str  # model preset name (the model axis)
    batch: int  # global contrastive batch (the batch axis)
    params: int  # trainable parameters of the preset
    macs_per_sample: int  # forward MACs per image-text pair
    samples_seen: int  # pairs processed by training
    compute: float  # MACs executed in training = 4 * macs_per_sample * samples_seen (COMPUTE_CONVENTION)
    wall_s: float  # wall-clock seconds of the trial
    metrics: dict[str, float] = field(default_factory=dict)  # final metrics by stable key
    state: str = FINISHED  # Ray Tune trial state: TERMINATED / ERROR / RUNNING / PENDING
    extra: dict[str, Any] = field(default_factory=dict)  # other grid keys (lr, seed, ...)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (samples_seen, train loss)

    @property
    def finished(self) -> bool:
        return self.state == FINISHED


def is_accuracy_metric(metric: str) -> bool:
    """True for accuracy-like keys (top1, top5, recall, r1/r5/r10, acc): their error is 1 - value."""
    return bool(_ACCURACY.match(metric.rsplit("/", 1)[-1]))


def error_of(result: TrialResult, metric: str) -> float:
    """The error the scaling laws fit: 1 - value for accuracy-like metrics, the value itself otherwise
    (losses are already "lower is better")."""
    if metric not in result.metrics:
        available = ", ".join(sorted(result.metrics)) or "none"
        raise KeyError(f"trial {result.trial_id!r} has no metric {metric!r}; available: {available}")
    value = float(result.metrics[metric])
    return 1.0 - value if is_accuracy_metric(metric) else value


def write_csv(results: Iterable[TrialResult], path: str | Path) -> Path:
    """Write the table (layout in the module docstring); returns the path."""
    results = list(results)
    metric_keys = sorted({k for r in results for k in r.metrics})
    extra_keys = sorted({k for r in results for k in r.extra})
    header = [*_SCALARS, *(_METRIC + k for k in metric_keys), *(_EXTRA + k for k in extra_keys), "curve"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in results:
            row: list[Any] = [getattr(r, name) for name in _SCALARS]
            # repr keeps every float bit so the round trip is exact.
            row += [repr(float(r.metrics[k])) if k in r.metrics else "" for k in metric_keys]
            row += [json.dumps(r.extra[k]) if k in r.extra else "" for k in extra_keys]
            row.append(json.dumps([[int(s), float(v)] for s, v in r.curve]))
            writer.writerow(row)
    return path


def _parse_row(row: dict[str, str]) -> TrialResult:
    kwargs: dict[str, Any] = {name: row[name] for name in _SCALARS}
    for name in _INTS:
        kwargs[name] = int(float(kwargs[name]))  # tolerate "1e6"-style cells written by hand
    for name in _FLOATS:
        kwargs[name] = float(kwargs[name])
    metrics = {k[len(_METRIC):]: float(v) for k, v in row.items() if k.startswith(_METRIC) and v != ""}
    extra = {k[len(_EXTRA):]: json.loads(v) for k, v in row.items() if k.startswith(_EXTRA) and v != ""}
    curve = [(int(s), float(v)) for s, v in json.loads(row.get("curve") or "[]")]
    return TrialResult(**kwargs, metrics=metrics, extra=extra, curve=curve)


def read_csv(path: str | Path) -> list[TrialResult]:
    """Read a table written by `write_csv`."""
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [name for name in _SCALARS if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a results table, missing columns {missing}")
        return [_parse_row(row) for row in reader]


def finite_errors(results: Iterable[TrialResult], metric: str) -> list[tuple[TrialResult, float]]:
    """Finished trials that report `metric`, with their error (positive and finite only: a log fit
    cannot use a zero or negative error)."""
    out = []
    for r in results:
        if r.finished and metric in r.metrics:
            err = error_of(r, metric)
            if math.isfinite(err) and err > 0:
                out.append((r, err))
    return out
