"""Geometry of the world's object classes: each class is a list of polygons in unit coordinates.

Coordinates span [-1, 1] (x right, y down). A part either adds to the object's mask or cuts a hole in
it (a ring's hole, a house's door), so holes show the background through them. Curves are sampled into
polygons so that every part can be rotated the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["SHAPES", "Part", "shape_parts"]

Part = tuple[np.ndarray, bool]  # (k x 2 points, adds: True fills, False cuts)


def _ellipse(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 360.0,
             n: int = 28) -> np.ndarray:
    t = np.deg2rad(np.linspace(a0, a1, n, endpoint=(a1 - a0) < 360))
    pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
    if (a1 - a0) < 360:  # a pie slice closes through the centre
        pts = np.vstack([pts, [[cx, cy]]])
    return pts


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _poly(*pts: tuple[float, float]) -> np.ndarray:
    return np.array(pts, dtype=float)


def _regular(n: int, r: float, phase_deg: float) -> np.ndarray:
    t = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _star() -> list[Part]:
    outer, inner = _regular(5, 1.0, -90), _regular(5, 0.42, -54)
    pts = np.empty((10, 2))
    pts[0::2], pts[1::2] = outer, inner
    return [(pts + np.array([0.0, 0.08]), True)]


def _heart() -> list[Part]:
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [(np.stack([x, y + 2.5], axis=1) / 16.5, True)]


def _cross() -> list[Part]:
    w = 0.33
    return [(_poly((-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                   (-1, w), (-1, -w), (-w, -w)), True)]


def _house() -> list[Part]:
    return [(_poly((-1, 0.0), (0, -1), (1, 0.0)), True), (_rect(-0.75, -0.02, 0.75, 1), True),
            (_rect(-0.18, 0.4, 0.18, 1.01), False)]


def _tree() -> list[Part]:
    return [(_poly((0, -1), (0.6, -0.25), (-0.6, -0.25)), True),
            (_poly((0, -0.55), (0.85, 0.45), (-0.85, 0.45)), True), (_rect(-0.15, 0.4, 0.15, 1), True)]


def _car() -> list[Part]:
    return [(_rect(-1, -0.05, 1, 0.5), True), (_poly((-0.55, -0.55), (0.3, -0.55), (0.6, -0.04),
                                                      (-0.8, -0.04)), True),
            (_rect(-0.35, -0.42, -0.12, -0.12), False), (_rect(0.0, -0.42, 0.3, -0.12), False),
            (_ellipse(-0.55, 0.55, 0.27, 0.27), True), (_ellipse(0.55, 0.55, 0.27, 0.27), True)]


def _fish() -> list[Part]:
    return [(_ellipse(-0.2, 0, 0.72, 0.45), True), (_poly((0.35, 0), (1, -0.55), (1, 0.55)), True),
            (_ellipse(-0.58, -0.1, 0.1, 0.1, n=12), False)]


def _flower() -> list[Part]:
    parts: list[Part] = []
    for k in range(5):
        a = np.deg2rad(-90 + 72 * k)
        parts.append((_ellipse(0.58 * np.cos(a), 0.58 * np.sin(a), 0.4, 0.4, n=20), True))
    return [*parts, (_ellipse(0, 0, 0.2, 0.2, n=14), False)]


def _umbrella() -> list[Part]:
    return [(_ellipse(-0.22, 0.78, 0.24, 0.22, n=16), True), (_ellipse(-0.22, 0.78, 0.1, 0.08, n=12), False),
            (_rect(-0.5, 0.5, 0.0, 0.78), False), (_ellipse(0, 0.05, 1, 0.95, 180, 360), True),
            (_rect(-0.07, 0.0, 0.07, 0.8), True)]


def _key() -> list[Part]:
    return [(_ellipse(-0.6, 0, 0.4, 0.4), True), (_ellipse(-0.6, 0, 0.17, 0.17, n=14), False),
            (_rect(-0.25, -0.11, 1, 0.11), True), (_rect(0.55, 0.1, 0.7, 0.42), True),
            (_rect(0.82, 0.1, 0.97, 0.36), True)]


def _cup() -> list[Part]:
    return [(_ellipse(0.5, 0.0, 0.42, 0.38), True), (_ellipse(0.5, 0.0, 0.22, 0.18, n=16), False),
            (_poly((-0.8, -0.7), (0.55, -0.7), (0.4, 0.75), (-0.65, 0.75)), True),
            (_rect(-0.95, 0.78, 0.75, 0.95), True)]


def _bell() -> list[Part]:
    body = _poly((-0.22, -0.82), (0.22, -0.82), (0.5, -0.55), (0.6, 0.0), (0.7, 0.45), (1, 0.7),
                 (-1, 0.7), (-0.7, 0.45), (-0.6, 0.0), (-0.5, -0.55))
    knob, clapper = _ellipse(0, -0.88, 0.14, 0.12, n=12), _ellipse(0, 0.82, 0.2, 0.17, n=14)
    return [(body, True), (knob, True), (clapper, True)]


def _boat() -> list[Part]:
    return [(_poly((-1, 0.35), (1, 0.35), (0.7, 0.8), (-0.7, 0.8)), True),
            (_rect(-0.05, -1, 0.05, 0.36), True),
            (_poly((0.12, -0.95), (0.12, 0.25), (0.8, 0.25)), True),
            (_poly((-0.12, -0.6), (-0.12, 0.25), (-0.6, 0.25)), True)]


def _bolt() -> list[Part]:
    return [(_poly((0.25, -1), (-0.6, 0.12), (-0.05, 0.12), (-0.3, 1), (0.62, -0.18), (0.08, -0.18),
                   (0.45, -1)), True)]


def _mushroom() -> list[Part]:
    return [(_ellipse(0, 0.1, 1, 0.95, 180, 360), True), (_rect(-0.28, 0.05, 0.28, 0.95), True),
            (_ellipse(-0.45, -0.3, 0.14, 0.14, n=12), False), (_ellipse(0.3, -0.55, 0.12, 0.12, n=12), False)]


SHAPES: dict[str, Callable[[], list[Part]]] = {
    "arrow": lambda: [(_poly((-1, -0.17), (0.15, -0.17), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.17),
                             (-1, 0.17)), True)],
    "bell": _bell,
    "boat": _boat,
    "bolt": _bolt,
    "car": _car,
    "circle": lambda: [(_ellipse(0, 0, 1, 1, n=36), True)],
    "cross": _cross,
    "cup": _cup,
    "diamond": lambda: [(_poly((0, -1), (0.68, 0), (0, 1), (-0.68, 0)), True)],
    "fish": _fish,
    "flower": _flower,
    "heart": _heart,
    "hexagon": lambda: [(_regular(6, 1.0, 0), True)],
    "house": _house,
    "key": _key,
    "moon": lambda: [(_ellipse(0, 0, 1, 1, n=36), True), (_ellipse(0.5, -0.25, 0.85, 0.85, n=36), False)],
    "mushroom": _mushroom,
    "ring": lambda: [(_ellipse(0, 0, 1, 1, n=36), True), (_ellipse(0, 0, 0.55, 0.55, n=28), False)],
    "square": lambda: [(_rect(-0.85, -0.85, 0.85, 0.85), True)],
    "star": _star,
    "tree": _tree,
    "triangle": lambda: [(_poly((0, -1), (1, 0.8), (-1, 0.8)), True)],
    "umbrella": _umbrella,
}


@functools.cache
def _base_parts(cls: str) -> tuple[Part, ...]:
    # Cached: the geometry is constant; callers only read the arrays (rotation makes new ones).
    return tuple((pts.copy(), adds) for pts, adds in SHAPES[cls]())


def shape_parts(cls: str, angle_deg: float = 0.0) -> list[Part]:
    """The class's parts, rotated by `angle_deg` about the origin."""
    if cls not in SHAPES:
        raise ValueError(f"unknown class {cls!r}; known: {sorted(SHAPES)}")
    parts = _base_parts(cls)
    if not angle_deg:
        return [(pts.copy(), adds) for pts, adds in parts]
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    return [(pts @ rot, adds) for pts, adds in parts]
