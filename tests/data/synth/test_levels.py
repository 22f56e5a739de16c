"""World levels: `easy` pins the families it names and makes captions terse, in training pairs and
eval sets alike; `standard` is unchanged; an unknown level is refused before anything is written."""

import json

import numpy as np
import pytest

from scalelab.data.synth import LEVELS, caption_for, generate_world, make_pair, sample_scene
from scalelab.data.synth.captions import class_synonyms
from scalelab.data.synth.cli import main as synth_main
from scalelab.data.synth.evalsets import render_eval_image
from scalelab.data.synth.world import COLOURS


def test_easy_scenes_pin_their_families_and_explicit_pins_win():
    rng = np.random.default_rng(0)
    fixed = dict(LEVELS["easy"].fixed)
    scenes = [sample_scene(rng, level="easy") for _ in range(300)]
    for family, value in fixed.items():
        assert {getattr(s, family) for s in scenes} == {value}, family
    assert len({s.cls for s in scenes}) == 23 and len({s.colour for s in scenes}) == len(COLOURS)
    assert sample_scene(rng, level="easy", style="outline").style == "outline"  # sketch set's pin
    with pytest.raises(ValueError, match="unknown world level 'hard'"):
        sample_scene(rng, level="hard")


def _colour_named(text: str) -> bool:
    return any(word in text.split() for _, words in COLOURS.values() for word in words)


def test_easy_captions_name_the_class_and_rarely_anything_else():
    rng = np.random.default_rng(1)
    counts = {}
    for level in ("standard", "easy"):
        texts = []
        for _ in range(600):
            attrs = sample_scene(rng, level=level)
            text = caption_for(attrs, rng, level=level).lower()
            assert any(s in text for s in class_synonyms(attrs.cls))
            texts.append(text)
        counts[level] = sum(map(_colour_named, texts)) / len(texts)
    # colour is kept with p=0.8 in the standard world, 0.1 in the easy one (a few synonyms collide
    # with distractor words, hence the margins)
    assert counts["standard"] > 0.6 and counts["easy"] < 0.2


def test_generate_world_records_the_level_and_eval_sets_follow_it(tmp_path):
    manifest = generate_world(tmp_path / "w", n_pairs=12, samples_per_shard=6, progress=False,
                              eval_per_class=1, retrieval_pairs=0, level="easy")
    assert manifest.extra["synth"]["level"] == "easy"
    saved = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert saved["extra"]["synth"]["level"] == "easy"
    # the same sample index differs between levels, and the easy eval image is the easy scene
    assert make_pair(0, 3, level="easy")[1] != make_pair(0, 3)[1]
    easy = np.asarray(render_eval_image("test", "star", 0, 0, 32, "easy"))
    standard = np.asarray(render_eval_image("test", "star", 0, 0, 32))
    assert not np.array_equal(easy, standard)


def test_cli_refuses_an_unknown_level(tmp_path, capsys):
    assert synth_main([str(tmp_path / "x"), "--n-pairs", "4", "--level", "impossible", "--no-progress"]) == 2
    assert "unknown world level 'impossible'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
