"""Preflight of a `task: classify` run: labelled data and held-out splits checked before Ray starts.

A label problem in a few samples is a bad sample (skipped and counted during training,
`data/skipped/<reason>`); a systematic one — the json key absent from every sample, labels outside
the class range, multi-label rows under a single-label head — would skip most of the data, so it is
refused here: the first `LABEL_PROBE` samples of each source's first shard are read and at least half
of them must carry usable labels. Held-out splits must be ImageFolder trees whose class folders fit
the head (folder i in sorted order is label i). Imports no framework.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from scalelab.config import ConfigError, ExperimentConfig

__all__ = ["LABEL_PROBE", "check_classify", "probe_labels"]

LABEL_PROBE = 256  # samples read per source: enough to see a systematic problem, cheap on any shard


def check_classify(cfg: ExperimentConfig, spec: Any) -> None:
    """ConfigError naming the field when the labelled data or a held-out split cannot train / evaluate."""
    from scalelab.data.manifest import Manifest
    from scalelab.data.plan import select_subset

    labels = cfg.data.labels
    if labels is None or labels.num_classes is None:
        raise ConfigError("data.labels.num_classes: unresolved (set it, or name the label space in the "
                          "manifest's extra.label_names / extra.classnames)")
    if cfg.data.image_size != spec.image.image_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} but preset {cfg.model.preset!r} takes "
            f"{spec.image.image_size} px images; set one to the other (model.overrides.image.image_size)"
        )
    for i, source in enumerate(cfg.data.sources):
        try:
            manifest = Manifest.load(source.path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.sources[{i}].path: {err}") from None
        _refuse_bad_labels(f"data.sources[{i}]", probe_labels(manifest, source.path, cfg), cfg)
    rows = sum(s.take for s in select_subset(cfg.data))
    if rows < cfg.train.global_batch:
        raise ConfigError(f"the data holds {rows} samples, fewer than train.global_batch="
                          f"{cfg.train.global_batch}")
    for name, directory in cfg.classify.eval_sets.items():
        _check_split(f"classify.eval_sets.{name}", Path(directory), labels.num_classes)


def probe_labels(manifest: Any, root: str, cfg: ExperimentConfig) -> tuple[Counter[str], int, str]:
    """(reason counts, "" for usable, over the probed samples; most labels seen on one sample; shard)."""
    from scalelab.data.labelled import parse_labels
    from scalelab.data.shards import BadSample, ShardError, iter_shard

    labels = cfg.data.labels
    assert labels is not None and labels.num_classes is not None
    paths = manifest.shard_paths(root)
    if not paths:
        raise ConfigError(f"{root}: the manifest lists no shards")
    counts: Counter[str] = Counter()
    most = 0
    try:
        for k, sample in enumerate(iter_shard(paths[0], fmt=manifest.format, image_field=manifest.image_field,
                                              caption_field=manifest.caption_field)):
            if k >= LABEL_PROBE:
                break
            if isinstance(sample, BadSample):
                continue  # a structural problem, counted by training as such
            value = (sample.meta or {}).get(labels.field)
            most = max(most, len(value) if isinstance(value, list) else 1)
            counts[parse_labels(sample.meta, labels.field, labels.num_classes, labels.max_labels)[1]] += 1
    except ShardError as err:
        raise ConfigError(f"{root}: {err}") from None
    return counts, most, str(paths[0])


def _refuse_bad_labels(where: str, probe: tuple[Counter[str], int, str], cfg: ExperimentConfig) -> None:
    counts, most, shard = probe
    labels = cfg.data.labels
    assert labels is not None
    total, good = sum(counts.values()), counts.get("", 0)
    if total and good * 2 >= total:
        return
    bad = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common() if reason)
    hint = {
        "missing_label": f"the samples' json has no key {labels.field!r}: set data.labels.field to the key "
                         "that holds the class index",
        "bad_label": f"labels must be ints in [0, data.labels.num_classes={labels.num_classes}) or lists "
                     "of them: check data.labels.num_classes and data.labels.field",
        "too_many_labels": f"samples carry up to {most} labels but data.labels.max_labels="
                           f"{labels.max_labels}: raise it (multi-label data needs classify.head: sigmoid)",
    }
    first = next((reason for reason, _ in counts.most_common() if reason), "missing_label")
    raise ConfigError(f"{where}: only {good} of the first {total} samples of {shard} have usable labels "
                      f"({bad or 'no samples'}); {hint[first]}")


def _check_split(where: str, root: Path, num_classes: int) -> None:
    """A held-out split: an ImageFolder tree with at most num_classes class folders of readable images."""
    from PIL import Image, UnidentifiedImageError

    from scalelab.data.prompts import class_folders
    from scalelab.eval.datasets import IMAGE_SUFFIXES

    if not root.is_dir():
        raise ConfigError(f"{where}: held-out split directory not found: {root}")
    folders = class_folders(root)
    if not folders:
        raise ConfigError(f"{where}: {root} has no class sub-folders (a split is <dir>/<class>/<image>)")
    if len(folders) > num_classes:
        raise ConfigError(f"{where}: {root} has {len(folders)} class folders but the head has "
                          f"data.labels.num_classes={num_classes} classes (folder i is label i)")
    images = [p for f in folders for p in sorted(f.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ConfigError(f"{where}: {root} holds no images in its class folders")
    for path in images:  # headers only: cheap
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as err:
            raise ConfigError(f"{where}: {path} is not a readable image ({err})") from None
