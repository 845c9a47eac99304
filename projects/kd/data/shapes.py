"""The kd_shapes images (:mod:`kd.data.synthetic`): the seven shape classes, their colours and
textures, clutter and backgrounds, and the rendering of one image with its annotations."""

import colorsys
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["CLASSES", "DEFAULT_IMAGE_SIZE", "MIN_VISIBLE_FRACTION", "ShapeClass", "render_image"]

DEFAULT_IMAGE_SIZE = 128
MIN_VISIBLE_FRACTION = 0.3
MIN_OBJECT_DIAMETER = 6.0
MAX_OBJECT_FRACTION = 0.6
SIZE_SKEW = 0.6
MAX_OBJECTS = 8
MAX_CLUTTER = 6
TYPICAL_TEXTURE_PROB = 0.7
RANDOM_HUE_PROB = 0.1
# Sub-samples per pixel side for anti-aliased coverage; 4 keeps 6 px objects recognisable.
_SUPERSAMPLE = 4
_TEXTURES = ("solid", "stripes", "checker", "dots", "shaded")


@dataclass(frozen=True)
class ShapeClass:
    """One object class.

    Args:
        name: category name, also the shape drawn.
        hue: range of hues in degrees (may start below 0 to wrap around red).
        texture: the texture most objects of the class carry (one of ``_TEXTURES``).
    """

    name: str
    hue: Tuple[float, float]
    texture: str


# Every hue range overlaps a neighbour's (disc/ring, ring/star, star/triangle, square/cross,
# ellipse/disc), so colour narrows the class down but does not decide it.
CLASSES: Tuple[ShapeClass, ...] = (
    ShapeClass("disc", (-15.0, 35.0), "solid"),
    ShapeClass("ring", (15.0, 60.0), "solid"),
    ShapeClass("square", (195.0, 250.0), "checker"),
    ShapeClass("triangle", (85.0, 150.0), "stripes"),
    ShapeClass("star", (45.0, 100.0), "dots"),
    ShapeClass("cross", (165.0, 215.0), "stripes"),
    ShapeClass("ellipse", (280.0, 350.0), "shaded"),
)


@dataclass
class _Raster:
    """An item's anti-aliased coverage inside its window ``[y0:y1, x0:x1]`` of the image."""

    x0: int
    y0: int
    x1: int
    y1: int
    alpha: np.ndarray
    box: Tuple[float, float, float, float]  # x_min, y_min, x_max, y_max of the covered area


def _hsv(hue: float, sat: float, val: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue % 360.0) / 360.0, sat, val), np.float32) * 255.0


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.6), rng.uniform(0.25, 0.95))


def _any_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0, 360), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))


def _class_colour(rng: np.random.Generator, cls: ShapeClass) -> np.ndarray:
    if rng.random() < RANDOM_HUE_PROB:
        hue = rng.uniform(0, 360)
    else:
        hue = rng.uniform(*cls.hue)
    return _hsv(hue, rng.uniform(0.45, 1.0), rng.uniform(0.5, 1.0))


def _class_texture(rng: np.random.Generator, cls: ShapeClass) -> str:
    if rng.random() < TYPICAL_TEXTURE_PROB:
        return cls.texture
    return str(rng.choice(_TEXTURES))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 (size, size, 3) background: gradient, colour field, stripes or patchwork."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    xx, yy = coords[None, :], coords[:, None]
    kind = int(rng.integers(4))
    if kind == 0:
        c0, c1 = _muted_colour(rng), _muted_colour(rng)
        phi = rng.uniform(0, 2 * math.pi)
        proj = xx * math.cos(phi) + yy * math.sin(phi)
        t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
        field = c0 * (1 - t) + c1 * t
    elif kind == 1:
        # Bilinear upsampling of a coarse random grid: smooth blotches of unrelated colours.
        grid = int(rng.integers(2, 7))
        coarse = rng.uniform(0, 255, (grid, grid, 3)).astype(np.float32)
        pos = coords / size * (grid - 1)
        i0 = np.minimum(pos.astype(np.int64), grid - 2)
        f = (pos - i0).astype(np.float32)
        rows = coarse[i0] * (1 - f)[:, None, None] + coarse[i0 + 1] * f[:, None, None]
        field = rows[:, i0] * (1 - f)[None, :, None] + rows[:, i0 + 1] * f[None, :, None]
    elif kind == 2:
        c0, c1 = _muted_colour(rng), _muted_colour(rng)
        phi = rng.uniform(0, math.pi)
        period = rng.uniform(5, 24)
        proj = xx * math.cos(phi) + yy * math.sin(phi)
        t = (0.5 + 0.5 * np.sin(2 * math.pi * proj / period + rng.uniform(0, 2 * math.pi)))[
            ..., None
        ]
        field = c0 * (1 - t) + c1 * t
    else:
        num = int(rng.integers(3, 9))
        centres = rng.uniform(0, size, (num, 2)).astype(np.float32)
        colours = np.stack([_muted_colour(rng) for _ in range(num)])
        dist = (xx[..., None] - centres[:, 0]) ** 2 + (yy[..., None] - centres[:, 1]) ** 2
        field = colours[np.argmin(dist, axis=-1)]
    field = np.broadcast_to(field, (size, size, 3)).astype(np.float32)
    return field + rng.normal(0, rng.uniform(2, 12), (size, size, 3)).astype(np.float32)


def _star_inside(u: np.ndarray, v: np.ndarray, points: int, inner: float) -> np.ndarray:
    """Inside test for a star (or, with ``inner = cos(pi/points)``, a regular polygon).

    The angle is folded into the half-sector between a tip at (1, 0) and the inner vertex; a point
    is inside when it lies on the centre's side of the edge joining the two.
    """
    sector = 2 * math.pi / points
    a = np.mod(np.arctan2(v, u), sector)
    a = np.minimum(a, sector - a)
    rho = np.hypot(u, v)
    qx, qy = rho * np.cos(a), rho * np.sin(a)
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    return (bx - 1.0) * qy - by * (qx - 1.0) >= 0


def _inside(shape: Dict[str, Any], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in the unit-radius shape, in the shape's own (rotated, stretched) frame."""
    kind = shape["kind"]
    if kind == "disc":
        mask = u * u + v * v <= 1.0
    elif kind == "ring":
        r2 = u * u + v * v
        mask = (r2 <= 1.0) & (r2 >= shape["inner"] ** 2)
    elif kind == "square":
        mask = _star_inside(u, v, 4, math.cos(math.pi / 4))
    elif kind == "triangle":
        mask = _star_inside(u, v, 3, math.cos(math.pi / 3))
    elif kind == "star":
        mask = _star_inside(u, v, 5, shape["inner"])
    elif kind == "cross":
        w, arm = shape["width"], math.sqrt(1.0 - shape["width"] ** 2)
        au, av = np.abs(u), np.abs(v)
        mask = ((au <= w) & (av <= arm)) | ((av <= w) & (au <= arm))
    elif kind == "ellipse":
        mask = u * u + (v / shape["minor"]) ** 2 <= 1.0
    elif kind == "blob":
        theta = np.arctan2(v, u)
        radius = np.full_like(u, shape["base"])
        for k, (amp, phase) in enumerate(shape["harmonics"], start=2):
            radius += shape["base"] * amp * np.cos(k * theta + phase)
        mask = np.hypot(u, v) <= radius
    elif kind == "bar":
        mask = (np.abs(u) <= 1.0) & (np.abs(v) <= shape["half_width"])
    else:
        raise ValueError(f"Unknown shape kind {kind!r}")
    if "cut" in shape:
        phi, offset = shape["cut"]
        mask &= u * math.cos(phi) + v * math.sin(phi) <= offset
    return mask


def _rasterize(shape: Dict[str, Any], size: int) -> Optional[_Raster]:
    cx, cy, r, stretch = shape["cx"], shape["cy"], shape["r"], shape["stretch"]
    reach = r * max(stretch, 1.0 / stretch)
    x0, x1 = max(int(math.floor(cx - reach)), 0), min(int(math.ceil(cx + reach)), size)
    y0, y1 = max(int(math.floor(cy - reach)), 0), min(int(math.ceil(cy + reach)), size)
    if x1 <= x0 or y1 <= y0:
        return None
    n = _SUPERSAMPLE
    dx = (x0 + (np.arange((x1 - x0) * n, dtype=np.float32) + 0.5) / n - cx)[None, :]
    dy = (y0 + (np.arange((y1 - y0) * n, dtype=np.float32) + 0.5) / n - cy)[:, None]
    c, s = math.cos(shape["angle"]), math.sin(shape["angle"])
    u = (dx * c + dy * s) / (r * stretch)
    v = (dy * c - dx * s) * (stretch / r)
    inside = _inside(shape, u, v)
    if not inside.any():
        return None
    h, w = y1 - y0, x1 - x0
    alpha = inside.reshape(h, n, w, n).mean(axis=(1, 3), dtype=np.float32)
    cols = np.flatnonzero(inside.any(axis=0))
    rows = np.flatnonzero(inside.any(axis=1))
    box = (
        x0 + cols[0] / n,
        y0 + rows[0] / n,
        x0 + (cols[-1] + 1) / n,
        y0 + (rows[-1] + 1) / n,
    )
    return _Raster(x0, y0, x1, y1, alpha, box)


def _paint(
    rng: np.random.Generator,
    shape: Dict[str, Any],
    raster: _Raster,
    colour: np.ndarray,
    texture: str,
) -> np.ndarray:
    """The item's colours over its window, (h, w, 3) float32."""
    dx = (np.arange(raster.x0, raster.x1, dtype=np.float32) + 0.5 - shape["cx"])[None, :]
    dy = (np.arange(raster.y0, raster.y1, dtype=np.float32) + 0.5 - shape["cy"])[:, None]
    shape_hw = (raster.y1 - raster.y0, raster.x1 - raster.x0, 3)
    if texture == "solid":
        return np.broadcast_to(colour, shape_hw)
    phi = rng.uniform(0, math.pi)
    a = dx * math.cos(phi) + dy * math.sin(phi)
    b = dy * math.cos(phi) - dx * math.sin(phi)
    if texture == "shaded":
        gain = 1.0 + rng.uniform(0.3, 0.6) * np.clip(a / shape["r"], -1.0, 1.0)
        return np.clip(colour * gain[..., None], 0, 255)
    # Texture scale grows with big objects so that their pattern is not just fine noise.
    period = rng.uniform(2.5, 6.0) * max(1.0, shape["r"] / 20.0)
    if rng.random() < 0.5:
        second = colour * rng.uniform(0.3, 0.65)
    else:
        second = colour + (255.0 - colour) * rng.uniform(0.4, 0.7)
    if texture == "stripes":
        mask = np.mod(a / period + rng.uniform(), 1.0) < 0.5
    elif texture == "checker":
        mask = (np.floor(a / period) + np.floor(b / period)) % 2 == 0
    elif texture == "dots":
        fa, fb = np.mod(a / period, 1.0) - 0.5, np.mod(b / period, 1.0) - 0.5
        mask = fa * fa + fb * fb <= rng.uniform(0.25, 0.4) ** 2
    else:
        raise ValueError(f"Unknown texture {texture!r}")
    mask = np.broadcast_to(mask, shape_hw[:2])
    return np.where(mask[..., None], second, colour).astype(np.float32)


def _sample_geometry(rng: np.random.Generator, kind: str, r: float) -> Dict[str, Any]:
    """Pose and class-specific parameters; the centre is set by the caller."""
    shape: Dict[str, Any] = {"kind": kind, "r": r, "angle": rng.uniform(0, 2 * math.pi)}
    # The ellipse carries its own aspect ratio (>= 1.54); the others get a mild stretch for variety
    # (aspect <= 1.22), so that a stretched disc stays distinguishable from an ellipse.
    shape["stretch"] = 1.0 if kind == "ellipse" else rng.uniform(0.9, 1.1)
    if kind == "ring":
        shape["inner"] = rng.uniform(0.45, 0.7)
    elif kind == "star":
        shape["inner"] = rng.uniform(0.38, 0.5)
    elif kind == "cross":
        shape["width"] = rng.uniform(0.22, 0.36)
    elif kind == "ellipse":
        shape["minor"] = rng.uniform(0.35, 0.65)
    return shape


def _sample_object(rng: np.random.Generator, size: int, cls: ShapeClass) -> Dict[str, Any]:
    # Log-uniform skewed towards large (exponent < 1): plain log-uniform puts ~80% of the objects
    # in COCO's "small" range, which would leave medium objects too rare to measure.
    log_span = math.log(MAX_OBJECT_FRACTION * size / MIN_OBJECT_DIAMETER)
    diameter = MIN_OBJECT_DIAMETER * math.exp(log_span * rng.uniform() ** SIZE_SKEW)
    shape = _sample_geometry(rng, cls.name, diameter / 2)
    reach = shape["r"] * max(shape["stretch"], 1.0 / shape["stretch"])
    shape["cx"] = rng.uniform(reach, size - reach)
    shape["cy"] = rng.uniform(reach, size - reach)
    return shape


def _sample_clutter(rng: np.random.Generator, size: int) -> Tuple[Dict[str, Any], np.ndarray, str]:
    """An unannotated distractor: its shape, colour and texture."""
    kind = str(rng.choice(["blob", "bar", "partial"], p=[0.45, 0.3, 0.25]))
    if kind == "partial":
        # A piece of a class shape cut by a straight edge: looks like an object, is not one.
        cls = CLASSES[int(rng.integers(len(CLASSES)))]
        diameter = math.exp(rng.uniform(math.log(8.0), math.log(0.45 * size)))
        shape = _sample_geometry(rng, cls.name, diameter / 2)
        if cls.name == "triangle":
            # Cut across a corner: a cut parallel to a side would leave a smaller equilateral
            # triangle, i.e. an unannotated true triangle.
            phi = 2 * math.pi / 3 * int(rng.integers(3)) + rng.uniform(-math.pi / 9, math.pi / 9)
        else:
            phi = rng.uniform(0, 2 * math.pi)
        # Offsets in [-0.35, 0.1] keep ~20-60% of the shape: a clear fragment, not a whole object.
        shape["cut"] = (phi, rng.uniform(-0.35, 0.1))
        colour, texture = _class_colour(rng, cls), _class_texture(rng, cls)
    else:
        if kind == "blob":
            diameter = math.exp(rng.uniform(math.log(4.0), math.log(0.45 * size)))
            shape = {"kind": "blob", "r": diameter / 2, "stretch": rng.uniform(0.7, 1.4)}
            harmonics = [(rng.uniform(0.05, 0.3), rng.uniform(0, 2 * math.pi)) for _ in range(4)]
            shape["harmonics"] = harmonics
            # Scale so that the lumpy outline never leaves the unit circle (the raster window).
            shape["base"] = 1.0 / (1.0 + sum(amp for amp, _ in harmonics))
        else:
            length = rng.uniform(8.0, 0.8 * size)
            shape = {"kind": "bar", "r": length / 2, "stretch": 1.0}
            shape["half_width"] = rng.uniform(0.5, 1.75) / shape["r"]
        shape["angle"] = rng.uniform(0, 2 * math.pi)
        colour, texture = _any_colour(rng), str(rng.choice(_TEXTURES))
    shape["cx"], shape["cy"] = rng.uniform(0, size), rng.uniform(0, size)
    return shape, colour, texture


def render_image(
    rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE
) -> Tuple[np.ndarray, List[Dict[str, Any]], int]:
    """Draw one image.

    Args:
        rng: the image's own generator; everything drawn comes from it.
        size: side of the square image in pixels.

    Returns:
        The image (uint8, HxWx3, RGB); its annotations (dicts with 0-based ``class_index``,
        ``bbox`` as [x, y, w, h], ``area`` and ``visibility``); and the number of objects left
        out because too little of them was visible.
    """
    while True:
        image = _background(rng, size)
        num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
        num_clutter = int(rng.integers(1, MAX_CLUTTER + 1))
        is_object = np.zeros(num_objects + num_clutter, bool)
        is_object[:num_objects] = True
        drawn: List[Tuple[int, _Raster, np.ndarray]] = []  # class index, raster, visible coverage
        for obj in rng.permutation(is_object):
            if obj:
                class_index = int(rng.integers(len(CLASSES)))
                cls = CLASSES[class_index]
                shape = _sample_object(rng, size, cls)
                colour, texture = _class_colour(rng, cls), _class_texture(rng, cls)
            else:
                shape, colour, texture = _sample_clutter(rng, size)
            raster = _rasterize(shape, size)
            if raster is None:
                continue
            window = (slice(raster.y0, raster.y1), slice(raster.x0, raster.x1))
            alpha = raster.alpha[..., None]
            paint = _paint(rng, shape, raster, colour, texture)
            image[window] = image[window] * (1 - alpha) + paint * alpha
            # Later items hide what they cover of earlier objects.
            for _, _, visible in drawn:
                visible[window] *= 1 - raster.alpha
            if obj:
                visible = np.zeros((size, size), np.float32)
                visible[window] = raster.alpha
                drawn.append((class_index, raster, visible))
        annotations, dropped = [], 0
        for class_index, raster, visible in drawn:
            area = float(raster.alpha.sum())
            visibility = float(visible.sum()) / area
            if visibility < MIN_VISIBLE_FRACTION:
                dropped += 1
                continue
            x_min, y_min, x_max, y_max = raster.box
            annotations.append(
                {
                    "class_index": class_index,
                    "bbox": [x_min, y_min, x_max - x_min, y_max - y_min],
                    "area": area,
                    "visibility": visibility,
                }
            )
        if annotations:
            break
    # Sensor noise over everything, so that objects are not perfectly flat.
    image += rng.normal(0, rng.uniform(0, 5), image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), annotations, dropped
