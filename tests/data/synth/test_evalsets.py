"""Eval sets are ImageFolder trees with class names and templates; shifted sets really shift."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scalelab.data.synth import EVAL_SETS, generate_eval_sets
from scalelab.data.synth.world import CLASSES, COLOURS

PER_CLASS = 3


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    generate_eval_sets(root, seed=0, image_size=32, per_class=PER_CLASS)
    return root


@pytest.mark.parametrize("name", list(EVAL_SETS))
def test_imagefolder_structure(eval_root, name):
    folders = sorted(p.name for p in (eval_root / name).iterdir() if p.is_dir())
    assert folders == sorted(COLOURS if name == "test_colour" else CLASSES)
    classnames = (eval_root / name / "classnames.txt").read_text().splitlines()
    assert len(classnames) == len(folders) and all(classnames)
    templates = (eval_root / name / "templates.txt").read_text().splitlines()
    assert len(templates) >= 10 and all("{c}" in t for t in templates)
    for folder in folders:
        files = sorted((eval_root / name / folder).glob("*.png"))
        assert len(files) == PER_CLASS
        with Image.open(files[0]) as img:
            assert img.size == (32, 32) and img.mode == "RGB"


def _stats(root: Path, name: str) -> tuple[float, float]:
    """(fraction of pixels equal to the corner colour, mean horizontal gradient) over a set."""
    flat, grad = [], []
    for path in sorted((root / name).glob("*/*.png")):
        a = np.asarray(Image.open(path), dtype=np.float64) / 255
        flat.append((np.abs(a - a[0, 0]).sum(-1) < 0.02).mean())
        grad.append(np.abs(np.diff(a, axis=1)).mean())
    return float(np.mean(flat)), float(np.mean(grad))


def test_shifted_sets_differ_from_test_as_intended(eval_root):
    test_flat, test_grad = _stats(eval_root, "test")
    v2_flat, _ = _stats(eval_root, "v2")
    sketch_flat, sketch_grad = _stats(eval_root, "sketch")
    texture_flat, _ = _stats(eval_root, "texture")
    assert abs(v2_flat - test_flat) < 0.1  # same distribution
    assert sketch_flat > test_flat + 0.25 and sketch_grad < test_grad  # plain backgrounds, thin outlines
    assert texture_flat < test_flat - 0.1  # every background is a (new) texture


def test_eval_sets_are_deterministic_and_seeded(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 1), (b, 1), (c, 2)):
        generate_eval_sets(root, seed=seed, image_size=32, per_class=1, sets=["hard"])
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    with pytest.raises(ValueError):
        generate_eval_sets(tmp_path / "d", per_class=1, sets=["imagenet"])
