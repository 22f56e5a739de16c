"""Captions name the class when matched; the mismatch fraction follows its setting."""

import numpy as np
import pytest

from scalelab.data.synth import caption_for, caption_pair, class_synonyms, sample_scene
from scalelab.data.synth.world import CLASSES


def test_matched_captions_name_the_class_and_vary():
    rng = np.random.default_rng(0)
    captions = []
    for _ in range(500):
        attrs = sample_scene(rng)
        text = caption_for(attrs, rng)
        assert text and text == text.strip() and "  " not in text
        assert any(s in text.lower() for s in class_synonyms(attrs.cls)), (attrs.cls, text)
        captions.append(text)
    assert len(set(captions)) > 450  # templates, synonyms and drops make nearly every caption unique
    lowered = " ".join(captions).lower()
    for distractor in ("hd", "free download", "photo"):
        assert distractor in lowered


@pytest.mark.parametrize("mismatch", [0.1, 0.3])
def test_mismatch_fraction_is_near_its_setting(mismatch):
    n = 2000
    flags = []
    for i in range(n):
        rng = np.random.default_rng([11, i])
        attrs = sample_scene(rng)
        text, meta = caption_pair(attrs, rng, mismatch)
        flags.append(not meta["matched"])
        if meta["matched"]:
            assert any(s in text.lower() for s in class_synonyms(attrs.cls))
        else:
            assert meta["caption_attrs"]["cls"] != attrs.cls
            other = meta["caption_attrs"]["cls"]
            assert any(s in text.lower() for s in class_synonyms(other))
    sigma = np.sqrt(mismatch * (1 - mismatch) / n)
    assert abs(np.mean(flags) - mismatch) < 4 * sigma


def test_no_mismatch_when_zero():
    rng = np.random.default_rng(2)
    assert all(caption_pair(sample_scene(rng), rng, 0.0)[1]["matched"] for _ in range(300))


def test_every_class_has_synonyms():
    for cls in CLASSES:
        assert len(class_synonyms(cls)) >= 2
