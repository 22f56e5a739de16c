"""`task: classify` configs refused before Ray starts, in one line naming what is wrong."""

from __future__ import annotations

import pytest

from scalelab.config import ConfigError, ExperimentConfig, validate
from scalelab.train.launch import preflight


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from scalelab.data.synth import generate_eval_sets, generate_labelled

    root = tmp_path_factory.mktemp("cls")
    generate_labelled(root / "train", n=128, samples_per_shard=64)
    generate_eval_sets(root / "eval", sets=["test", "test_colour"], per_class=1)
    return root


def _cfg(world, tmp_path, **sections):
    data = {"sources": [{"path": str(world / "train")}], "labels": {"field": "label"}}
    base = {"task": "classify", "model": {"preset": "micro"}, "data": data,
            "train": {"global_batch": 32, "micro_batch_size": 16, "steps": 5, "num_workers": 1},
            "classify": {"eval_sets": {"test": str(world / "eval" / "test")}},
            "run": {"storage": str(tmp_path)}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return validate(ExperimentConfig, base)


def test_a_good_config_resolves_num_classes_from_the_manifest(world, tmp_path):
    assert preflight(_cfg(world, tmp_path), "remote").data.labels.num_classes == 23


@pytest.mark.parametrize(("labels", "classify", "match"), [
    ({"field": "tag", "num_classes": 23}, {}, r"only 0 of the first 64 .*missing_label: 64.*.tag."),
    ({"field": "label", "num_classes": 5}, {}, "bad_label.*num_classes=5"),
    ({"field": "labels", "max_labels": 1}, {"head": "sigmoid"}, "too_many_labels.*up to 2 labels"),
    ({"field": "colour"}, {}, "data.labels.num_classes is not set"),
    ({"field": "labels", "max_labels": 2}, {"head": "sigmoid", "eval_sets": {"c": "/nonexistent"}},
     "classify.eval_sets.c: held-out split directory not found"),
])
def test_systematic_label_problems_are_refused(world, tmp_path, labels, classify, match):
    with pytest.raises(ConfigError, match=match):
        preflight(_cfg(world, tmp_path, data={"labels": labels}, classify=classify), "remote")


def test_a_split_with_more_classes_than_the_head_is_refused(world, tmp_path):
    import shutil

    split = tmp_path / "split"
    shutil.copytree(world / "eval" / "test", split)
    shutil.copytree(split / "arrow", split / "zeppelin")  # a 24th class
    cfg = _cfg(world, tmp_path, classify={"eval_sets": {"more": str(split)}})
    with pytest.raises(ConfigError, match="24 class folders but the head has data.labels.num_classes=23"):
        preflight(cfg, "remote")


@pytest.mark.parametrize(("data", "match"), [
    ({"task": "classify"}, "task: classify needs data.labels"),
    ({"task": "classify", "data": {"labels": {"max_labels": 3}}}, "softmax takes one label per image"),
    ({"data": {"labels": {}}}, "data.labels and classify.eval_sets belong to task: classify"),
    ({"task": "classify", "data": {"labels": {}}, "eval": {"retrieval": "x"}}, "zero-shot evaluations"),
])
def test_config_sections_must_fit_the_task(data, match):
    with pytest.raises(ConfigError, match=match):
        validate(ExperimentConfig, data)
