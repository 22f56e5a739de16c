"""Image preprocessing shared by the training pipeline and evaluation (no Ray, no torch).

CLIP's normalisation constants live here once: the pipeline (which imports Ray) and `scalelab.eval`
both import them, so evaluation images can never drift from the training distribution.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess_eval"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_eval(image: Image.Image, size: int) -> np.ndarray:
    """CLIP eval transform: RGB, shorter side to `size` + centre crop (bicubic), CLIP normalisation.

    Returns float32 [3, size, size]. Identical to the eval branch of the training pipeline's decoder.
    """
    img = image.convert("RGB")
    side = min(img.width, img.height)
    x0, y0 = (img.width - side) // 2, (img.height - side) // 2
    # One resize with a crop box: the same pixels as resize-then-crop, without an intermediate image.
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    return (arr - mean) / std
