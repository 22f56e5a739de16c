"""Image transforms without Ray: the eval transform against a naive reference, the crop box's bounds, and
both transforms byte for byte as the training pipeline produced them before they moved here.

A training row's crop must not change between versions silently: a resumed run would decode other
crops than the run it continues, and the determinism tests of tests/train/test_launch.py rest on it.
"""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from scalelab.data.plan import RowAugment
from scalelab.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    preprocess_eval,
    preprocess_train,
    random_resized_box,
)

# sha256 of the stacked float32 outputs for `_cases()`, recorded with the decoder as it was before the
# transforms moved into transforms.py (commit b45ace0, Pillow 13.0.0, numpy 2.4.6).
RECORDED = {
    "eval": "cc82d0663713ff9322ef524af5a62319402469008f25c706b2da917284e5aa3e",
    "train_flip": "bc2b1405f3ddd1641f1c638511543adce1ff648496b633e03c9b70214b92de43",
    "train_noflip": "872cbca1ddc74ea81d655e7e7b48d2dc336142be984c180b32db3c1402bffb7c",
    "train_fallback": "c98b8b13e3b14a4f9242cab69cef497fa13a3f61d7e16e4d353a2b591be060c8",
}


def _encoded_images() -> list[bytes]:
    """PNGs: RGB, RGBA, greyscale, palette, wide, a 100x5 strip (crop fallback) and a 3x2 image."""
    rng = np.random.default_rng(0)
    out = []
    for (w, h), mode in (((21, 13), "RGB"), ((25, 40), "RGBA"), ((30, 30), "L"), ((50, 17), "P"),
                         ((64, 48), "RGB"), ((100, 5), "RGB"), ((3, 2), "RGB")):
        channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
        arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode="L" if mode == "P" else mode)
        if mode == "P":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _cases() -> dict[str, tuple[RowAugment | None, range]]:
    """Case -> (augmentation, row indices). The indices cover flipped and unflipped rows, and with
    scale (0.9, 1.0) the non-square images fall back to the centre square."""
    return {
        "eval": (None, range(1)),
        "train_flip": (RowAugment(7, 2, (0.3, 1.0), True), range(6)),
        "train_noflip": (RowAugment(7, 2, (0.3, 1.0), False), range(3)),
        "train_fallback": (RowAugment(7, 2, (0.9, 1.0), True), range(3)),
    }


def _decode(data: bytes, augment: RowAugment | None, index: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if augment is None:
        return preprocess_eval(img, 8)
    return preprocess_train(img, 8, augment.rng(index), crop_scale=augment.crop_scale, hflip=augment.hflip)


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_outputs_are_the_recorded_ones(case):
    augment, indices = _cases()[case]
    got = np.stack([_decode(data, augment, i) for data in _encoded_images() for i in indices])
    assert got.dtype == np.float32 and got.shape == (7 * len(indices), 3, 8, 8)
    assert hashlib.sha256(got.tobytes()).hexdigest() == RECORDED[case], (
        f"{case}: the transform's output changed; runs would decode other images than before")


def test_eval_transform_is_a_centre_crop_normalised_like_clip():
    rgb = np.random.default_rng(1).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)  # 12 wide, 8 high
    got = preprocess_eval(Image.fromarray(rgb), 8)  # same scale: bicubic weights are 1 at 0, 0 at ±1, ±2
    centre = rgb[:, 2:10].transpose(2, 0, 1).astype(np.float64) / 255
    want = (centre - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None]
    assert got.dtype == np.float32 and got.shape == (3, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_random_resized_box_keeps_torchvisions_bounds():
    for seed in range(200):
        x0, y0, x1, y1 = random_resized_box(400, 300, (0.3, 0.6), np.random.default_rng(seed))
        w, h = x1 - x0, y1 - y0
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
        assert 0.3 - 0.01 <= w * h / (400 * 300) <= 0.6 + 0.01  # w, h are rounded to whole pixels
        assert 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01
    # No box of 90% of a 100x5 strip has an aspect in [3/4, 4/3]: the centre square instead.
    assert random_resized_box(100, 5, (0.9, 1.0), np.random.default_rng(0)) == (47, 0, 52, 5)
