"""Class names and prompt templates: both placeholder conventions, one set of rules (from-labels, eval)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scalelab.data.labels import from_labels
from scalelab.data.prompts import (
    fill_template,
    normalise_template,
    read_templates,
    resolve_classnames,
    templates_file,
)
from scalelab.data.shards import iter_shard
from scalelab.eval.datasets import load_image_folder


@pytest.mark.parametrize(("given", "expected"), [
    ("a photo of a {}.", "a photo of a golden retriever."),        # OpenAI CLIP notebooks
    ("a photo of a {c}.", "a photo of a golden retriever."),       # CLIP_benchmark
    ("{0}, a type of dog.", "golden retriever, a type of dog."),
    ("a {{braced}} {}.", "a {braced} golden retriever."),           # literal braces survive normalising
    ("itap of a {!s}.", "itap of a golden retriever."),
])
def test_both_conventions_fill_the_class_name(given, expected):
    assert fill_template(normalise_template(given), "golden retriever") == expected


@pytest.mark.parametrize(("bad", "says"), [
    ("a photo of a dog.", "no placeholder"),
    ("a {} next to a {}.", "2 placeholders"),
    ("a {c} and a {}.", "2 placeholders"),
    ("a {label}.", "the field {label}"),
    ("a {1}.", "the field {1}"),
    ("a photo of a {.", "malformed"),
])
def test_bad_templates_are_refused_with_the_reason(bad, says):
    with pytest.raises(ValueError, match="template") as err:
        normalise_template(bad, "t.txt")
    assert says in str(err.value) and "t.txt" in str(err.value)
    assert "{}" in str(err.value) or "brace" in str(err.value)


def test_templates_file_skips_comments_and_names_the_file_on_error(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("# OpenAI style\na photo of a {}.\n\na sketch of a {c}.\n")
    assert read_templates(path) == ["a photo of a {c}.", "a sketch of a {c}."]
    path.write_text("a photo of a {}.\na photo.\n")
    with pytest.raises(ValueError, match=str(path)):
        read_templates(path)
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no prompt templates"):
        read_templates(path)


def test_class_names_from_file_or_folders(tmp_path):
    folders = [tmp_path / "golden_retriever", tmp_path / "tabby_cat"]
    for f in folders:
        f.mkdir()
    assert resolve_classnames(tmp_path, folders) == ["golden retriever", "tabby cat"]
    (tmp_path / "classnames.txt").write_text("dog\ncat\n")
    assert resolve_classnames(tmp_path, folders) == ["dog", "cat"]
    (tmp_path / "classnames.txt").write_text("dog\ncat\nbird\n")
    with pytest.raises(ValueError, match="3 class names for 2 class folders"):
        resolve_classnames(tmp_path, folders)


def _folder(root: Path, classes: list[str], per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_eval_set_with_openai_templates_and_folder_names(tmp_path):
    root = _folder(tmp_path / "set", ["golden_retriever", "tabby_cat"])
    (root / "templates.txt").write_text("a photo of a {}.\na blurry photo of the {}.\n")
    data = load_image_folder(root, 8)
    assert data.classnames == ["golden retriever", "tabby cat"]
    assert data.templates == ["a photo of a {c}.", "a blurry photo of the {c}."]
    assert data.labels.tolist() == [0, 0, 1, 1] and tuple(data.images.shape) == (4, 3, 8, 8)


def test_eval_set_uses_a_shared_templates_file_only_without_its_own(tmp_path):
    root = _folder(tmp_path / "set", ["a", "b"], per_class=1)
    shared = tmp_path / "shared.txt"
    shared.write_text("a drawing of a {}.\n")
    with pytest.raises(FileNotFoundError, match="templates.txt not found"):
        load_image_folder(root, 8)
    assert load_image_folder(root, 8, shared).templates == ["a drawing of a {c}."]
    (root / "templates.txt").write_text("own {c}.\n")
    assert templates_file(root, shared) == root / "templates.txt"
    assert load_image_folder(root, 8, shared).templates == ["own {c}."]


def test_from_labels_and_eval_follow_the_same_rules(tmp_path):
    root = _folder(tmp_path / "labelled", ["golden_retriever", "tabby_cat"], per_class=3)
    (root / "templates.txt").write_text("a photo of a {}.\n")
    manifest = from_labels(root, tmp_path / "pairs", templates=root / "templates.txt", samples_per_shard=10)
    captions = sorted({s.caption for p in sorted((tmp_path / "pairs").glob("*.tar")) for s in iter_shard(p)})
    assert captions == ["a photo of a golden retriever.", "a photo of a tabby cat."]
    assert manifest.extra["classnames"] == load_image_folder(root, 8).classnames
    (root / "templates.txt").write_text("a photo of a dog.\n")
    for load in (lambda: from_labels(root, tmp_path / "other", templates=root / "templates.txt"),
                 lambda: load_image_folder(root, 8)):
        with pytest.raises(ValueError, match="no placeholder"):
            load()
