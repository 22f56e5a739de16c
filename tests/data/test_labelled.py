"""Labels from samples' json: parsed, padded, and bad ones turned into counted bad rows by the decoder."""

import io

import numpy as np
import pytest
from PIL import Image

from scalelab.config import ConfigError, DataConfig, DataSourceConfig, LabelsConfig
from scalelab.data.labelled import label_names, parse_labels, resolve_num_classes


@pytest.mark.parametrize(("meta", "row", "reason"), [
    ({"label": 3}, [3, -1], ""),
    ({"label": [4, 1, 4]}, [1, 4], ""),
    (None, [-1, -1], "missing_label"),
    ({"other": 1}, [-1, -1], "missing_label"),
    ({"label": 10}, [-1, -1], "bad_label"),
    ({"label": -1}, [-1, -1], "bad_label"),
    ({"label": "3"}, [-1, -1], "bad_label"),
    ({"label": True}, [-1, -1], "bad_label"),
    ({"label": []}, [-1, -1], "bad_label"),
    ({"label": [1, 2, 3]}, [-1, -1], "too_many_labels"),
])
def test_parse_labels(meta, row, reason):
    got, why = parse_labels(meta, "label", 10, 2)
    assert (got.tolist(), why) == (row, reason)


def test_decoder_drops_and_names_bad_labels_and_reads_no_tokenizer():
    from scalelab.data.pipeline import _Decode

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    decode = _Decode(None, 8, 32, train=False, augment=False, crop_scale=(1.0, 1.0), hflip=False, seed=0,
                     epoch=0, labels=("label", 5, 1))
    metas = [{"label": 2}, {"label": 9}, None, {"label": [1, 3]}]
    batch = {"image_bytes": np.array([png.getvalue()] * 4, dtype=object), "caption": np.array(["x"] * 4),
             "meta": np.array(metas, dtype=object), "valid": np.ones(4, bool), "reason": np.array([""] * 4),
             "key": np.array(list("abcd")), "source": np.zeros(4, np.int64), "index": np.arange(4)}
    out = decode(batch)
    assert out["valid"].tolist() == [True, False, False, False]
    assert out["reason"].tolist() == ["", "bad_label", "missing_label", "too_many_labels"]
    assert out["labels"][:, 0].tolist() == [2, -1, -1, -1] and out["tokens"].shape == (4, 0)


def test_num_classes_from_the_manifest(tmp_path):
    from scalelab.data.synth import generate_labelled

    generate_labelled(tmp_path / "l", n=4, samples_per_shard=4)
    src = [DataSourceConfig(path=str(tmp_path / "l"))]
    for field, n in (("label", 23), ("labels", 33)):
        cfg = resolve_num_classes(DataConfig(sources=src, labels=LabelsConfig(field=field)))
        assert cfg.labels.num_classes == n
    with pytest.raises(ConfigError, match="data.labels.num_classes"):
        resolve_num_classes(DataConfig(sources=src, labels=LabelsConfig(field="colour")))
    assert label_names({"classnames": ["a", "b"]}, "label") == ["a", "b"]
