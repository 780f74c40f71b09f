"""Draw a :class:`eval.shapes.world.Scene` exactly: numpy only, anti-aliased by 4x supersampling, deterministic.

Geometry (centres, sizes, jitter) is relative to the image side, so a scene renders at any resolution; textures are
in pixels of a 32-px image scaled with the side (stripes 2 px wide, checks 3 px, dots 2 px apart 4 px), in
phase with the object's centre. The second tone of every pattern is the background, so an object's only colour is
its own. Each layout has fixed slot windows (:func:`slot_boxes`): an object never leaves its window, which is
where the judges look for it.
"""

from __future__ import annotations

import numpy as np

from eval.shapes.world import LAYOUTS, SLOTS, Scene

RENDER_VERSION = 1  # bump when a scene is drawn differently (part of every model and judge fingerprint)
SUPERSAMPLE = 4
COLOUR_RGB = {
    "red": (220, 30, 35), "orange": (245, 135, 20), "yellow": (245, 220, 40), "pink": (250, 135, 200),
    "purple": (130, 50, 180), "blue": (35, 75, 225), "teal": (20, 160, 160), "green": (45, 170, 55),
    "brown": (125, 75, 35), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
# Slot centres (x, y as fractions of the side), object radius range and centre jitter (fractions), per layout.
SLOT_CENTRES = {"one": ((0.5, 0.5),), "h2": ((0.25, 0.5), (0.75, 0.5)), "v2": ((0.5, 0.25), (0.5, 0.75)),
                "three": ((0.25, 0.27), (0.75, 0.27), (0.5, 0.73))}
RADIUS = {"one": (0.28, 0.34), "h2": (0.19, 0.21), "v2": (0.19, 0.21), "three": (0.17, 0.185)}
JITTER = {"one": 0.05, "h2": 0.025, "v2": 0.025, "three": 0.015}
REFERENCE_SIDE = 32  # texture sizes are in pixels of a 32-px image


def _polygon(u, v, pts) -> np.ndarray:
    """Inside test of a simple polygon (crossing number), vectorised over the points ``(u, v)``."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        (x1, y1), (x2, y2) = pts[i], pts[(i + 1) % n]
        cond = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= cond & (u < xc)
    return inside


def _regular(n: int, radius: float = 1.0, inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (or star with ``inner`` radius) with a vertex pointing up."""
    k = 2 * n if inner else n
    pts = []
    for i in range(k):
        a = -np.pi / 2 + 2 * np.pi * i / k
        r = inner if inner and i % 2 else radius
        pts.append((r * np.cos(a), r * np.sin(a)))
    return pts


def _heart(u, v, flip: bool = False) -> np.ndarray:
    x, y = u * 1.15, (v if flip else -v) * 1.15 + 0.2
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


SHAPE_MASKS = {  # unit coordinates: u right, v down, the object fills about [-1, 1]^2
    "circle": lambda u, v: u * u + v * v <= 0.9 ** 2,
    "oval": lambda u, v: u * u + (v / 0.55) ** 2 <= 1.0,
    "square": lambda u, v: (np.abs(u) <= 0.78) & (np.abs(v) <= 0.78),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "triangle": lambda u, v: _polygon(u, v, [(0, -0.95), (0.95, 0.72), (-0.95, 0.72)]),
    "arrow": lambda u, v: _polygon(u, v, [(0, -1), (0.9, 0.0), (-0.9, 0.0)]) | (
        (np.abs(u) <= 0.32) & (v >= -0.05) & (v <= 1.0)),
    "star": lambda u, v: _polygon(u, v, _regular(5, 1.0, 0.42)),
    "flower": lambda u, v: (u * u + v * v <= 0.42 ** 2) | np.any(
        [(u - 0.58 * np.cos(a)) ** 2 + (v - 0.58 * np.sin(a)) ** 2 <= 0.38 ** 2
         for a in (-np.pi / 2 + 2 * np.pi * i / 5 for i in range(5))], axis=0),
    "heart": lambda u, v: _heart(u, v),
    "spade": lambda u, v: _heart(u * 1.05, v * 1.05 + 0.12, flip=True) | _polygon(u, v, [(0, 0.35), (0.32, 1.0), (-0.32, 1.0)]),
    "pentagon": lambda u, v: _polygon(u, v, _regular(5, 1.0)),
    "house": lambda u, v: _polygon(u, v, [(0, -0.95), (0.85, -0.12), (0.85, 0.85), (-0.85, 0.85), (-0.85, -0.12)]),
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.92)),
    "moon": lambda u, v: (u * u + v * v <= 0.9 ** 2) & ((u - 0.42) ** 2 + (v + 0.12) ** 2 > 0.72 ** 2),
}


def geometry(scene: Scene, side: int) -> list[tuple[float, float, float]]:
    """(centre x, centre y, radius) in pixels of each object, in slot order; drawn from ``scene.seed``."""
    rng = np.random.default_rng([scene.seed, 7])
    lo, hi = RADIUS[scene.layout]
    out = []
    for cx, cy in SLOT_CENTRES[scene.layout]:
        j = JITTER[scene.layout]
        dx, dy = rng.uniform(-j, j, 2)
        out.append(((cx + dx) * side, (cy + dy) * side, rng.uniform(lo, hi) * side))
    return out


def _pattern(texture: str, px, py, inside_depth, scale: float) -> np.ndarray:
    """Where an object of ``texture`` shows its colour (inside its mask); ``px, py`` are pixels from its centre,
    ``inside_depth`` the distance to the mask's edge in pixels."""
    if texture == "solid":
        return np.ones(px.shape, dtype=bool)
    edge = inside_depth <= 1.0 * scale
    if texture == "outlined":
        return inside_depth <= 1.6 * scale
    if texture == "striped":
        return edge | (np.floor(py / (2 * scale)) % 2 == 0)
    if texture == "checkered":
        c = 3 * scale
        return edge | ((np.floor(px / c + 0.5) + np.floor(py / c + 0.5)) % 2 == 0)
    if texture == "dotted":
        p = 4 * scale
        dx, dy = (px / p - np.round(px / p)) * p, (py / p - np.round(py / p)) * p
        return edge | (dx * dx + dy * dy > (1.0 * scale) ** 2)
    raise ValueError(f"unknown texture {texture!r}")


def render(scene: Scene, side: int = 32) -> np.ndarray:
    """The scene as ``(side, side, 3)`` uint8 RGB."""
    from scipy.ndimage import distance_transform_edt

    if scene.layout not in LAYOUTS or len(scene.objects) != len(SLOTS[scene.layout]):
        raise ValueError(f"scene layout {scene.layout!r} holds {len(SLOTS.get(scene.layout, ()))} objects, got {len(scene.objects)}")
    ss = SUPERSAMPLE
    n = side * ss
    bg = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float32) / 255
    img = np.broadcast_to(bg, (n, n, 3)).copy()
    scale = side / REFERENCE_SIDE
    for obj, (cx, cy, r) in zip(scene.objects, geometry(scene, side)):
        # only the object's bounding square (every shape lies in [-1, 1]^2 of its unit coordinates), one pixel margin
        i0, j0 = (max(0, int(np.floor((c - r) * ss)) - ss) for c in (cx, cy))
        i1, j1 = (min(n, int(np.ceil((c + r) * ss)) + ss) for c in (cx, cy))
        X, Y = np.meshgrid((np.arange(i0, i1) + 0.5) / ss, (np.arange(j0, j1) + 0.5) / ss)
        mask = SHAPE_MASKS[obj.shape]((X - cx) / r, (Y - cy) / r)
        depth = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] / ss if obj.texture != "solid" else None
        show = mask & _pattern(obj.texture, X - cx, Y - cy, depth, scale)
        img[j0:j1, i0:i1][show] = np.asarray(COLOUR_RGB[obj.colour], dtype=np.float32) / 255
    img = img.reshape(side, ss, side, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def render_many(scenes, side: int = 32) -> np.ndarray:
    """``(N, side, side, 3)`` uint8."""
    return np.stack([render(s, side) for s in scenes]) if scenes else np.zeros((0, side, side, 3), np.uint8)


def cached_renders(path, count: int, make) -> np.ndarray:
    """``np.load(path)`` if it holds ``count`` images, else ``make()`` saved there first (written to a temporary name
    and renamed, so a reader never sees half a file)."""
    import os
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        images = np.load(path)
        if len(images) == count:
            return images
    images = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, images)
    os.replace(tmp, path)
    return images


def slot_boxes(layout: str, side: int) -> list[tuple[int, int, int, int]]:
    """The window (x0, y0, x1, y1) of each slot of ``layout``: the whole image for one object, else a square of half
    the side around the slot's centre (clamped to the image). An object of the layout stays inside its window."""
    if layout == "one":
        return [(0, 0, side, side)]
    half = side // 2
    boxes = []
    for cx, cy in SLOT_CENTRES[layout]:
        x0 = int(np.clip(round(cx * side - half / 2), 0, side - half))
        y0 = int(np.clip(round(cy * side - half / 2), 0, side - half))
        boxes.append((x0, y0, x0 + half, y0 + half))
    return boxes
