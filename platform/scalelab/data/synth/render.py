"""Render a scene (SceneAttributes + a random generator for nuisances) to a PIL image.

Objects are drawn as anti-aliased masks (polygons at 4x supersampling, box-filtered down) and alpha
composited onto a procedural background, so a 7-pixel object at 32 px still has a legible silhouette.
Nuisances that no caption names (exact background tone, jitter of position/size/angle, colour shade)
come from `rng`; the same (attrs, rng state) gives the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import distance_transform_edt

from scalelab.data.synth.shapes import shape_parts
from scalelab.data.synth.world import CLASSES, COLOURS, POSITIONS, SIZES, SceneAttributes

__all__ = ["HardVariant", "make_background", "render_scene"]

SUPERSAMPLE = 4
COUNT_SHRINK = {1: 1.0, 2: 0.74, 3: 0.64}  # several objects share the space one object would take


@dataclass(frozen=True)
class HardVariant:
    """Shifts of the `hard` eval set: distractor objects, an occluding patch, an unusual object scale."""

    clutter: int = 0  # distractor objects of other classes drawn behind the main object
    occlude: float = 0.0  # fraction of the main object's box hidden by a background-coloured patch
    scale: float = 1.0  # multiplies the object box (0.5 = tiny, 1.6 = partly out of frame)


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _tones(rng: np.random.Generator, obj_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two desaturated background tones whose luminance stays away from the object's."""
    obj_l = _luminance(obj_rgb)
    # Draw a grey level outside obj_l +- 0.3 so the object keeps contrast against any background.
    lo, hi = max(0.15, obj_l - 0.3), min(0.92, obj_l + 0.3)
    choices = [(0.15, lo), (hi, 0.92)]
    widths = np.array([max(0.0, b - a) for a, b in choices])
    u = float(rng.random()) * widths.sum()
    level = choices[0][0] + u if u < widths[0] else choices[1][0] + (u - widths[0])
    tint = rng.normal(0.0, 0.05, 3)
    t1 = np.clip(level + tint, 0, 1)
    step = -0.16 if level < obj_l else 0.16  # the second tone moves away from the object, too
    t2 = np.clip(t1 + (step if 0.0 < level + step < 1.0 else -step), 0, 1)
    return t1, t2


def make_background(kind: str, size: int, rng: np.random.Generator, t1: np.ndarray,
                    t2: np.ndarray) -> np.ndarray:
    """size x size x 3 float image of background `kind` blending tones t1/t2 (pattern scale ∝ size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size  # coordinates as image fractions
    angle = np.deg2rad(rng.choice([0.0, 45.0, 90.0, 135.0]))
    proj = xx * np.cos(angle) + yy * np.sin(angle)
    period = rng.uniform(4, 8) / 32
    phase = rng.uniform(0, 1)
    if kind == "plain":
        w = np.zeros((size, size))
    elif kind == "stripes":
        w = (((proj / period) + phase) % 1.0 < 0.5).astype(float)
    elif kind == "checker":
        w = ((np.floor(xx / period + phase) + np.floor(yy / period + phase)) % 2).astype(float)
    elif kind == "dots":
        fx, fy = (xx / period + phase) % 1.0 - 0.5, (yy / period + phase) % 1.0 - 0.5
        w = (fx**2 + fy**2 < 0.3**2).astype(float)
    elif kind == "gradient":
        w = (proj - proj.min()) / max(np.ptp(proj), 1e-9)
        t2 = np.clip(t1 + 2.0 * (t2 - t1), 0, 1)  # gradients span a wider tone range than patterns
    elif kind == "noise":
        w = np.clip(rng.normal(0.5, 0.35, (size, size)), 0, 1)
    elif kind == "waves":
        w = 0.5 + 0.5 * np.sin(2 * np.pi * (proj / period + 0.4 * np.sin(2 * np.pi * (yy - xx) * 2)))
    elif kind == "rings":
        cx, cy = rng.uniform(0, 1, 2)
        w = 0.5 + 0.5 * np.sin(2 * np.pi * np.hypot(xx - cx, yy - cy) / period)
    elif kind == "grid":
        line = 1.5 / 32
        w = (((xx + phase) % period < line) | ((yy + phase) % period < line)).astype(float)
    elif kind == "blotches":
        coarse = Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8))
        w = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255
    else:
        raise ValueError(f"unknown background {kind!r}")
    return (1 - w)[..., None] * t1 + w[..., None] * t2


def _object_alpha(cls: str, outline: bool, cx: float, cy: float, half: float,
                  angle: float) -> tuple[np.ndarray, int, int]:
    """Anti-aliased alpha (float 0..1) of one object, with the image-pixel offset of its crop."""
    ss = SUPERSAMPLE
    x0, y0 = int(np.floor(cx - half - 2)), int(np.floor(cy - half - 2))
    side = int(np.ceil(2 * half + 4))
    canvas = Image.new("L", (side * ss, side * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, adds in shape_parts(cls, angle):
        px = (np.array([cx - x0, cy - y0]) + pts * half) * ss
        draw.polygon([tuple(p) for p in px.tolist()], fill=255 if adds else 0)
    if outline:
        # Outline = the silhouette's inner band of a fixed width: works for holes and crescents alike.
        mask = np.asarray(canvas) > 127
        width = max(1.1, 0.1 * 2 * half) * ss
        canvas = Image.fromarray((mask & (distance_transform_edt(mask) <= width)).astype(np.uint8) * 255)
    small = canvas.reduce(ss)
    return np.asarray(small, dtype=np.float64) / 255.0, x0, y0


def _paste(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, rgb: np.ndarray) -> None:
    size = img.shape[0]
    ya, xa = max(0, -y0), max(0, -x0)
    yb, xb = min(alpha.shape[0], size - y0), min(alpha.shape[1], size - x0)
    if ya >= yb or xa >= xb:
        return
    a = alpha[ya:yb, xa:xb, None]
    region = img[y0 + ya:y0 + yb, x0 + xa:x0 + xb]
    region[...] = region * (1 - a) + rgb * a


def _placements(attrs: SceneAttributes, rng: np.random.Generator,
                scale: float) -> list[tuple[float, float, float, float]]:
    """(cx, cy, box, angle) per object, as image fractions; a cluster of `count` around the anchor."""
    box = SIZES[attrs.size][0] * COUNT_SHRINK[attrs.count] * scale
    ax, ay = np.array(POSITIONS[attrs.position][0]) + rng.uniform(-0.04, 0.04, 2)
    d = box * 0.56
    vertical = attrs.position in ("left", "right")
    offsets = {1: [(0.0, 0.0)],
               2: [(0.0, -d), (0.0, d)] if vertical else [(-d, 0.0), (d, 0.0)],
               3: [(0.0, -0.95 * d), (-d, 0.75 * d), (d, 0.75 * d)]}[attrs.count]
    out = []
    for ox, oy in offsets:
        b = box * rng.uniform(0.9, 1.1)
        cx, cy = ax + ox + rng.uniform(-0.02, 0.02), ay + oy + rng.uniform(-0.02, 0.02)
        if scale <= 1.0:  # keep ordinary objects inside the frame
            cx, cy = np.clip([cx, cy], b / 2, 1 - b / 2)
        out.append((float(cx), float(cy), float(b), float(rng.uniform(-15, 15))))
    return out


def _object_rgb(colour: str, rng: np.random.Generator) -> np.ndarray:
    base = np.array(COLOURS[colour][0], dtype=np.float64) / 255
    return np.clip(base + rng.uniform(-0.06, 0.06, 3), 0, 1)


def _draw_clutter(img: np.ndarray, attrs: SceneAttributes, n: int, rng: np.random.Generator) -> None:
    size = img.shape[0]
    others = [c for c in sorted(CLASSES) if c != attrs.cls]
    colours = [c for c in sorted(COLOURS) if c != attrs.colour]
    for _ in range(n):
        cls, colour = others[rng.integers(len(others))], colours[rng.integers(len(colours))]
        b = rng.uniform(0.18, 0.26) * size
        cx, cy = rng.uniform(b / 2, size - b / 2, 2)
        alpha, x0, y0 = _object_alpha(cls, bool(rng.random() < 0.5), cx, cy, b / 2, rng.uniform(-30, 30))
        _paste(img, alpha, x0, y0, _object_rgb(colour, rng))


def render_scene(attrs: SceneAttributes, image_size: int = 32, rng: np.random.Generator | None = None,
                 *, background: str | None = None, hard: HardVariant | None = None) -> Image.Image:
    """Draw `attrs` at `image_size` px. `background` overrides attrs.background (eval-only textures);
    `hard` applies the hard-set shifts. Without `rng` a fixed seed is used (canonical rendering)."""
    if attrs.cls not in CLASSES or attrs.colour not in COLOURS:
        raise ValueError(f"unknown class or colour in {attrs}")
    rng = np.random.default_rng(0) if rng is None else rng
    hard = hard or HardVariant()
    obj_rgb = _object_rgb(attrs.colour, rng)
    t1, t2 = _tones(rng, obj_rgb)
    img = make_background(background or attrs.background, image_size, rng, t1, t2)
    if hard.clutter:
        _draw_clutter(img, attrs, hard.clutter, rng)
    boxes = _placements(attrs, rng, hard.scale)
    for cx, cy, box, angle in boxes:
        half = box * image_size / 2
        alpha, x0, y0 = _object_alpha(attrs.cls, attrs.style == "outline", cx * image_size,
                                      cy * image_size, half, angle)
        _paste(img, alpha, x0, y0, obj_rgb)
    if hard.occlude > 0:
        cx, cy, box, _ = boxes[int(rng.integers(len(boxes)))]
        side = np.sqrt(hard.occlude) * box * image_size
        px, py = (np.array([cx, cy]) * image_size + rng.uniform(-0.35, 0.35, 2) * box * image_size - side / 2)
        patch = np.ones((round(side), round(side)))
        _paste(img, patch, round(px), round(py), t2)
    return Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")
