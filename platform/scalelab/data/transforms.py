"""Image preprocessing, defined once for training and evaluation (no Ray, no torch).

CLIP's normalisation constants and both transforms live here: the Ray Data decoder
(`scalelab.data.pipeline`) and `scalelab.eval` call the same functions, so evaluation images can never
drift from the training distribution. A train crop is a function of the image and the random stream
it is handed; which stream a row gets (seeded by (seed, epoch, index)) is the plan's
(`scalelab.data.plan.RowAugment`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess_eval", "preprocess_train", "random_resized_box"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Box = tuple[int, int, int, int]


def preprocess_eval(image: Image.Image, size: int) -> np.ndarray:
    """CLIP eval transform: RGB, shorter side to `size` + centre crop (bicubic), CLIP normalisation.

    Returns float32 [3, size, size]. The pipeline's decoder uses it for eval rows and for training
    rows when `data.augment` is off.
    """
    img = image.convert("RGB")
    return _resize_normalise(img, size, _centre_square(img.width, img.height))


def preprocess_train(image: Image.Image, size: int, rng: np.random.Generator, *,
                     crop_scale: tuple[float, float], hflip: bool) -> np.ndarray:
    """Train transform: RGB, a random-resized crop to `size` (bicubic), a horizontal flip with
    probability 1/2 when `hflip`, CLIP normalisation. Returns float32 [3, size, size].

    The draws from `rng` come in a fixed order (crop box, then the flip), so the same stream gives
    the same crop: a resumed epoch decodes identical images.
    """
    img = image.convert("RGB")
    box = random_resized_box(img.width, img.height, crop_scale, rng)
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # Mirror the box rather than flip the crop: one resize, the same pixels.
        box = (img.width - box[2], box[1], img.width - box[0], box[3])
    return _resize_normalise(img, size, box)


def random_resized_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator) -> Box:
    """torchvision's RandomResizedCrop box (area fraction in `scale`, aspect in [3/4, 4/3])."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    return _centre_square(width, height)  # torchvision falls back to a centre crop too


def _centre_square(width: int, height: int) -> Box:
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def _resize_normalise(img: Image.Image, size: int, box: Box) -> np.ndarray:
    # One resize with a crop box: Pillow samples the box straight from the full image, so no
    # intermediate crop is made and the filter sees real pixels just outside the box edges.
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    return (arr - mean) / std
