"""Class labels of labelled samples (`task: classify`): read from each sample's json, checked, padded.

A sample's json holds its label under `data.labels.field`: one int (a class index) or a list of ints
(multi-label, as JFT's). `parse_labels` turns it into a fixed-width int64 row — the label indices, then
-1 padding up to `max_labels` — so rows of any label count batch together without a ragged column.
A sample whose labels cannot be used is a bad sample with a reason, dropped and counted like an
undecodable image (`data/skipped/<reason>`), never a crashed epoch:

    missing_label     no json, or no `field` in it
    bad_label         not an int / list of ints, an index outside [0, num_classes), an empty list
    too_many_labels   more than `max_labels` distinct labels

`label_names` reads a dataset's label space from its manifest; `resolve_num_classes` is what
`data.labels.num_classes: null` becomes (in the driver's preflight, before the config is sent anywhere).
Pure Python + numpy: the pipeline's decode tasks, preflight and the tests share it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scalelab.config import ConfigError, DataConfig

__all__ = ["BAD_LABEL", "LABEL_REASONS", "MISSING_LABEL", "TOO_MANY_LABELS", "label_names", "parse_labels",
           "resolve_num_classes"]

MISSING_LABEL = "missing_label"
BAD_LABEL = "bad_label"
TOO_MANY_LABELS = "too_many_labels"
LABEL_REASONS = (MISSING_LABEL, BAD_LABEL, TOO_MANY_LABELS)


def parse_labels(meta: Any, field: str, num_classes: int, max_labels: int) -> tuple[np.ndarray, str]:
    """(int64 [max_labels]: label indices then -1 padding, "" or the reason the sample is bad)."""
    row = np.full(max_labels, -1, dtype=np.int64)
    if not isinstance(meta, dict) or field not in meta:
        return row, MISSING_LABEL
    value = meta[field]
    values = value if isinstance(value, list) else [value]
    # bool is an int subclass: `true` in a json label is a mistake, not class 1.
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_classes
                         for v in values):
        return row, BAD_LABEL
    labels = sorted(set(values))
    if len(labels) > max_labels:
        return row, TOO_MANY_LABELS
    row[:len(labels)] = labels
    return row, ""


def label_names(extra: dict[str, Any], field: str) -> list[str] | None:
    """The names of the label space `field` indexes, from a manifest's `extra`: `label_names[field]`
    (the synthetic labelled set), else `classnames` for field 'label' (`scalelab data from-labels`)."""
    spaces = extra.get("label_names")
    if isinstance(spaces, dict) and isinstance(spaces.get(field), list):
        return [str(n) for n in spaces[field]]
    if field == "label" and isinstance(extra.get("classnames"), list):
        return [str(n) for n in extra["classnames"]]
    return None


def resolve_num_classes(cfg: DataConfig) -> DataConfig:
    """`cfg` with `labels.num_classes` filled in from the first source's manifest when it is None;
    ConfigError when the manifest does not name the label space either."""
    if cfg.labels is None or cfg.labels.num_classes is not None:
        return cfg
    from scalelab.data.manifest import Manifest

    source = cfg.sources[0].path
    try:
        names = label_names(Manifest.load(source).extra, cfg.labels.field)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.sources[0].path: {err}") from None
    if not names or len(names) < 2:
        raise ConfigError(
            f"data.labels.num_classes is not set and the manifest of {source} names no label space for "
            f"field {cfg.labels.field!r} (extra.label_names.{cfg.labels.field} or extra.classnames): "
            "set data.labels.num_classes"
        )
    labels = cfg.labels.model_copy(update={"num_classes": len(names)})
    return cfg.model_copy(update={"labels": labels})
