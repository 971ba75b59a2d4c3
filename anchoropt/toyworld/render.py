"""Rendering a concept into a small RGB image (numpy only), and the domains images can be drawn in.

An image shows ``count`` objects of the concept's shape, colour and pattern on a background (the
concept's habitat with probability :data:`HABITAT_PROB`, another one otherwise).  Within-class variation:
position, rotation, object size (around the concept's size), hue / brightness jitter, pattern phase and
angle, pixel noise.  Drawn at twice the output size and box-downsampled (anti-aliasing).

Domains (rendering styles).  The toy CLIP is pretrained on :data:`SEEN_DOMAINS`, each with captions that
name the style some of the time (``"a sketch of a vina."``, see :mod:`captions`); :data:`UNSEEN_DOMAINS`
never occur in pretraining (EuroSAT-like shifts):

* ``photo``     - as rendered;
* ``sketch``    - a line drawing on white paper, lines in the object's colours: fills and background are gone;
* ``blurry``    - a strong blur;
* ``dark``      - under-exposed: dim and low in contrast;
* ``painting``  - flat, posterised colours with soft edges;
* ``texture``   - a close-up: the concept's colour and pattern fill the frame (the pattern's gaps show the
  habitat), no outline, size or count;
* ``scene``     - a wide shot: small objects on the concept's habitat among two distractor objects;
* ``noisy``     - heavy pixel noise and a blur (unseen);
* ``shifted``   - every hue rotated by :data:`SHIFT_DEGREES` (red drifts to orange, blue to purple ...) (unseen);
* ``pixelated`` - 4 x 4 blocks (unseen).

Arrays are ``(H, W, 3)`` float32 in [0, 1] until :func:`to_uint8`.
"""

from __future__ import annotations

import numpy as np

from .concepts import BACKGROUNDS, COLOURS, Concept

__all__ = ["DOMAINS", "SEEN_DOMAINS", "UNSEEN_DOMAINS", "HABITAT_PROB", "IMAGE_SIZE", "render", "pick_background", "image_rng", "render_many",
           "apply_domain", "to_uint8", "scene_background"]

SEEN_DOMAINS = ("photo", "sketch", "blurry", "dark", "painting", "texture", "scene")
UNSEEN_DOMAINS = ("noisy", "shifted", "pixelated")
DOMAINS = SEEN_DOMAINS + UNSEEN_DOMAINS
HABITAT_PROB = 0.7
IMAGE_SIZE = 32
SHIFT_DEGREES = 20.0
_SCENE_SCALE = 0.55  # objects of a scene, relative to their usual size
_SCENE_DISTRACTORS = 2
_SIZE_RADIUS = {"small": 0.17, "large": 0.30}  # object radius as a fraction of the image side (one object)
_COUNT_SCALE = {"one": 1.0, "two": 0.72, "three": 0.6}


def pick_background(concept: Concept, rng: np.random.Generator) -> str:
    """The concept's habitat with probability :data:`HABITAT_PROB`, else a uniformly drawn background."""
    return concept.habitat if rng.random() < HABITAT_PROB else str(rng.choice(BACKGROUNDS))


def render(
    concept: Concept, rng: np.random.Generator, size: int = IMAGE_SIZE, domain: str = "photo",
    background: str | None = None,
) -> np.ndarray:
    """One image ``(size, size, 3)`` float32 of ``concept`` in ``domain``, drawn with ``rng``.

    ``background``: force one (default: :func:`pick_background`).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
    big = 2 * size
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / big  # coordinates in [0, 1)
    image = _background(background or scene_background(concept, domain, rng), yy, xx, rng)
    colour = _jitter_colour(np.array(COLOURS[concept.colour], np.float32), rng)
    if domain == "texture":
        image = _texture(concept.pattern, yy, xx, colour, image, rng)
    else:
        scale = _SCENE_SCALE if domain == "scene" else 1.0
        n = {"one": 1, "two": 2, "three": 3}[concept.count]
        objects = [(concept.shape, concept.pattern, colour)] * n
        if domain == "scene":
            objects += [_distractor(rng) for _ in range(_SCENE_DISTRACTORS)]
        radius = scale * _SIZE_RADIUS[concept.size] * _COUNT_SCALE[concept.count] * float(rng.uniform(0.85, 1.15))
        for (shape, pattern, paint_colour), (cy, cx) in zip(objects, _centres(len(objects), radius, rng)):
            angle = float(rng.uniform(-0.5, 0.5)) if shape != "circle" else 0.0
            u, v = _local(yy, xx, cy, cx, angle, radius)
            mask = _shape_mask(shape, u, v)
            paint = _pattern(pattern, u, v, paint_colour, rng)
            image = np.where(mask[..., None], paint, image)
    image = image.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    image = image + rng.normal(0.0, 0.03, image.shape).astype(np.float32)
    return apply_domain(np.clip(image, 0.0, 1.0), domain, rng)


def apply_domain(image: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` ``(H, W, 3)`` seen in ``domain`` (see the module docstring)."""
    if domain == "photo":
        return image
    if domain == "sketch":
        grey = image.mean(axis=-1)
        gy, gx = np.gradient(grey)
        edges = np.clip(np.hypot(gx, gy) * 6.0, 0.0, 1.0)[..., None]
        paper = np.full_like(image, 0.95) + rng.normal(0.0, 0.02, image.shape)
        return np.clip(paper * (1 - edges) + 0.8 * image * edges, 0, 1).astype(np.float32)
    if domain == "noisy":
        blurred = (image + np.roll(image, 1, 0) + np.roll(image, 1, 1) + np.roll(image, (1, 1), (0, 1))) / 4
        return np.clip(blurred + rng.normal(0.0, 0.22, image.shape), 0, 1).astype(np.float32)
    if domain == "shifted":
        return _rotate_hue(image, SHIFT_DEGREES)
    if domain == "blurry":
        return _box_blur(image, 2)
    if domain == "dark":
        dim = 0.05 + 0.3 * image + rng.normal(0.0, 0.015, image.shape)
        return np.clip(dim, 0, 1).astype(np.float32)
    if domain == "painting":
        smooth = _box_blur(_box_blur(image, 1), 1)
        grey = smooth.mean(axis=-1, keepdims=True)
        vivid = np.clip(grey + 1.3 * (smooth - grey), 0, 1)
        return (np.round(vivid * 4) / 4).astype(np.float32)
    if domain == "pixelated":
        h, w = image.shape[:2]
        blocks = image.reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3))
        return blocks.repeat(4, axis=0).repeat(4, axis=1).astype(np.float32)
    if domain in ("texture", "scene"):  # composed in render(); nothing after
        return image
    raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float in [0, 1] -> uint8."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------- pieces
def _background(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shape = yy.shape + (3,)
    if kind == "dark":
        base = np.full(shape, rng.uniform(0.05, 0.18), np.float32)
    elif kind == "light":
        base = np.full(shape, rng.uniform(0.78, 0.92), np.float32)
    elif kind == "speckled":
        base = rng.uniform(0.3, 0.7, yy.shape)[..., None].repeat(3, axis=-1).astype(np.float32)
    elif kind == "gradient":
        t = (yy if rng.random() < 0.5 else xx)[..., None]
        top, bottom = np.array([0.55, 0.6, 0.7], np.float32), np.array([0.2, 0.22, 0.3], np.float32)
        base = (top * (1 - t) + bottom * t).astype(np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return base


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a ``(2 radius + 1)``-pixel square (edges wrap) of ``(H, W, 3)``."""
    out = np.zeros_like(image)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out += np.roll(image, (dy, dx), (0, 1))
    return (out / (2 * radius + 1) ** 2).astype(np.float32)


def _texture(pattern: str, yy, xx, colour: np.ndarray, background: np.ndarray, rng: np.random.Generator):
    """The frame filled with ``pattern`` in ``colour``; the pattern's gaps (and a plain swatch's grain) show
    ``background``."""
    angle = float(rng.uniform(-0.5, 0.5))
    u, v = _local(yy, xx, float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)), angle, 0.3)
    if pattern == "plain":
        return (0.8 * colour + 0.2 * background).astype(np.float32)
    on = _pattern_mask(pattern, u, v, rng)
    return np.where(on[..., None], colour, background).astype(np.float32)


def _distractor(rng: np.random.Generator) -> tuple[str, str, np.ndarray]:
    """A random (shape, pattern, colour) object of a scene's clutter."""
    from .concepts import PATTERNS, SHAPES

    colour = np.array(COLOURS[str(rng.choice(list(COLOURS)))], np.float32)
    return str(rng.choice(SHAPES)), str(rng.choice(PATTERNS)), colour


def _jitter_colour(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rgb = _rotate_hue(rgb[None, None], float(rng.uniform(-12, 12)))[0, 0]
    return np.clip(rgb * rng.uniform(0.8, 1.1), 0, 1).astype(np.float32)


def _centres(n: int, radius: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """``n`` object centres inside the image, not overlapping (retries, then a fixed row)."""
    for _ in range(50):
        pts = [(float(rng.uniform(radius + 0.02, 0.98 - radius)), float(rng.uniform(radius + 0.02, 0.98 - radius)))
               for _ in range(n)]
        if all(np.hypot(a[0] - b[0], a[1] - b[1]) > 2.05 * radius for i, a in enumerate(pts) for b in pts[:i]):
            return pts
    return [(0.5, (i + 0.5) / n) for i in range(n)]


def _local(yy, xx, cy, cx, angle, radius):
    """Rotated coordinates around a centre, in units of ``radius``."""
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return rho < 1.0
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.82
    if shape == "diamond":
        return abs(u) + abs(v) < 1.05
    if shape == "triangle":
        return (v < 0.55) & (v > -1.0 + 1.732 * abs(u) * 0.95)
    if shape == "cross":
        return ((abs(u) < 0.33) & (abs(v) < 1.0)) | ((abs(v) < 0.33) & (abs(u) < 1.0))
    if shape == "ring":
        return (rho < 1.0) & (rho > 0.58)
    if shape == "star":
        return rho < 0.62 + 0.38 * np.cos(5 * phi - np.pi / 2)
    if shape == "hexagon":
        return np.maximum(abs(v), abs(u) * 0.866 + abs(v) * 0.5) < 0.88
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, u, v, rng: np.random.Generator) -> np.ndarray | None:
    """Where ``pattern`` shows its colour (``None``: plain, everywhere), in rotated coordinates ``u, v``."""
    if pattern == "plain":
        return None
    phase = float(rng.uniform(0, 1))
    if pattern == "striped":
        a = float(rng.uniform(-0.4, 0.4))
        return ((np.cos(a) * u + np.sin(a) * v) * 2.2 + phase) % 1.0 < 0.5
    if pattern == "dotted":
        gu, gv = (u * 1.6 + phase) % 1.0 - 0.5, (v * 1.6 + phase) % 1.0 - 0.5
        return np.hypot(gu, gv) > 0.28
    if pattern == "checkered":
        return (np.floor(u * 1.6 + phase) + np.floor(v * 1.6 + phase)) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}")


def _pattern(pattern: str, u, v, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An object's paint: ``colour`` where the pattern is on, a darker shade of it elsewhere."""
    on = _pattern_mask(pattern, u, v, rng)
    if on is None:
        return np.broadcast_to(colour, u.shape + (3,))
    return np.where(on[..., None], colour, colour * 0.3)


def _rotate_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate hues of ``(..., 3)`` RGB about the grey axis (a rotation in RGB space)."""
    t = np.deg2rad(degrees)
    c, s, k = np.cos(t), np.sin(t), 1.0 / 3.0
    sq = np.sqrt(k)
    m = np.array([
        [c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
        [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
        [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)],
    ], np.float32)
    return np.clip(image @ m.T, 0.0, 1.0).astype(np.float32)


def image_rng(seed: int, stream: int, concept: Concept, k: int) -> np.random.Generator:
    """The generator of image ``k`` of ``concept`` in ``stream`` (a split, the pretraining pool ...).

    One independent generator per image: an image does not depend on how many classes or images are
    drawn, and the domains of one (seed, stream) show the same scenes.
    """
    return np.random.default_rng([seed, stream, concept.index, k])


def scene_background(concept: Concept, domain: str, rng: np.random.Generator) -> str:
    """The background an image of ``concept`` in ``domain`` shows: the habitat in a close-up (``texture``) or a
    ``scene``, else :func:`pick_background`."""
    return concept.habitat if domain in ("texture", "scene") else pick_background(concept, rng)


def render_many(
    concepts, per_class: int, seed: int, stream: int, domain="photo", size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``per_class`` images of each concept: uint8 ``(C * per_class, size, size, 3)``, labels ``(C * per_class,)``
    (positions in ``concepts``) and the background of each image.

    ``domain``: one domain for every image, or ``domain(rng) -> str`` drawing each image's own (pretraining's
    mix of styles) with the image's generator.
    """
    images, labels, backgrounds = [], [], []
    for label, concept in enumerate(concepts):
        for k in range(per_class):
            rng = image_rng(seed, stream, concept, k)
            image_domain = domain if isinstance(domain, str) else domain(rng)
            background = scene_background(concept, image_domain, rng)
            images.append(to_uint8(render(concept, rng, size, image_domain, background)))
            labels.append(label)
            backgrounds.append(background)
    return np.stack(images), np.array(labels, dtype=np.int64), backgrounds
