"""Region outlines of a VGG Image Annotator (VIA 2) CSV export, rasterised into a lesion mask.

VIA's "Export annotations (as csv)" writes one row per region::

    #filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes

An image without any region has one row whose ``region_shape_attributes`` is ``{}``; an image with
several regions has one row per region (``region_id`` 0, 1, ...), all of which belong to its mask.
``region_shape_attributes`` is a JSON object in the image's pixel coordinates (x to the right, y
down, from the top-left corner), one of:

==========  ========================================================================
shape       keys
==========  ========================================================================
polygon     ``all_points_x``, ``all_points_y``: the outline's vertices (3 or more)
polyline    the same keys; an open path, closed here (an outline drawn without the last click)
ellipse     ``cx``, ``cy``, ``rx``, ``ry`` and optionally ``theta``: rotation in radians, as the
            HTML canvas turns (from +x towards +y, i.e. clockwise on screen)
circle      ``cx``, ``cy``, ``r``
rect        ``x``, ``y``, ``width``, ``height``
point       ``cx``, ``cy``: a marked spot without area (no mask pixel)
==========  ========================================================================

:func:`parse_region` turns one cell into a :class:`Region` (an outline polygon; an ellipse or
circle as :data:`ELLIPSE_VERTICES` vertices) and raises :class:`RegionError` saying why a cell is
unusable (malformed JSON, unknown shape, missing or non-numeric key); :func:`rasterise` fills the
union of an image's regions. Pixels are filled as Pillow's ImageDraw fills a polygon: the
inside and the pixels the outline passes through, so a mask reaches up to a pixel beyond the line
that was drawn (a hand-drawn outline is not more exact than that).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

ELLIPSE_VERTICES = 360  # an inscribed 360-gon is within 0.5 px of an ellipse of radius < 12,000 px
POINT = "point"


class RegionError(ValueError):
    """One ``region_shape_attributes`` cell cannot be used; the message says why."""


@dataclass(frozen=True)
class Region:
    """One annotated region: its VIA shape name and outline (x, y) vertices (none for a point)."""

    shape: str
    outline: tuple[tuple[float, float], ...]

    @property
    def has_area(self) -> bool:
        return self.shape != POINT


def _number(attributes: Mapping, key: str, shape: str) -> float:
    value = attributes.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegionError(f"{shape}: {key!r} is {value!r}, not a number")
    return float(value)


def _positive(attributes: Mapping, key: str, shape: str) -> float:
    value = _number(attributes, key, shape)
    if value <= 0:
        raise RegionError(f"{shape}: {key!r} is {value:g}, not above 0")
    return value


def _polygon(attributes: Mapping, shape: str) -> tuple[tuple[float, float], ...]:
    xs, ys = attributes.get("all_points_x"), attributes.get("all_points_y")
    if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys):
        raise RegionError(f"{shape}: 'all_points_x' and 'all_points_y' must be lists of equal length")
    if len(xs) < 3:
        raise RegionError(f"{shape}: {len(xs)} point(s); an outline needs at least 3")
    for key, values in (("all_points_x", xs), ("all_points_y", ys)):
        for value in values:
            _number({key: value}, key, shape)
    return tuple((float(x), float(y)) for x, y in zip(xs, ys))


def ellipse_outline(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0) -> tuple[tuple[float, float], ...]:
    """Vertices of the ellipse centred at (cx, cy) with radii rx, ry, turned by ``theta`` (canvas sense)."""
    c, s = math.cos(theta), math.sin(theta)
    vertices = []
    for k in range(ELLIPSE_VERTICES):
        t = 2 * math.pi * k / ELLIPSE_VERTICES
        x, y = rx * math.cos(t), ry * math.sin(t)
        vertices.append((cx + x * c - y * s, cy + x * s + y * c))
    return tuple(vertices)


def _outline(shape: str, attributes: Mapping) -> tuple[tuple[float, float], ...]:
    """The outline of one region of a known ``shape``; RegionError when a key is missing or wrong."""
    if shape in ("polygon", "polyline"):
        return _polygon(attributes, shape)
    if shape == "ellipse":
        theta = _number(attributes, "theta", shape) if "theta" in attributes else 0.0
        return ellipse_outline(_number(attributes, "cx", shape), _number(attributes, "cy", shape),
                               _positive(attributes, "rx", shape), _positive(attributes, "ry", shape), theta)
    if shape == "circle":
        r = _positive(attributes, "r", shape)
        return ellipse_outline(_number(attributes, "cx", shape), _number(attributes, "cy", shape), r, r)
    if shape == "rect":
        x, y = _number(attributes, "x", shape), _number(attributes, "y", shape)
        w, h = _positive(attributes, "width", shape), _positive(attributes, "height", shape)
        return ((x, y), (x + w, y), (x + w, y + h), (x, y + h))
    # a point: its position must still be readable, but it has no outline
    _number(attributes, "cx", shape)
    _number(attributes, "cy", shape)
    return ()


SHAPES = ("polygon", "polyline", "ellipse", "circle", "rect", POINT)


def parse_region(text: str) -> Region | None:
    """One ``region_shape_attributes`` cell as a :class:`Region`; None for ``{}`` (no region)."""
    try:
        attributes = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegionError(f"malformed JSON in region_shape_attributes ({exc.msg} at character {exc.pos})") from None
    if not isinstance(attributes, dict):
        raise RegionError(f"region_shape_attributes is {type(attributes).__name__} JSON, not an object")
    if not attributes:
        return None
    shape = attributes.get("name")
    if shape not in SHAPES:
        raise RegionError(f"unknown region shape {shape!r}; VIA shapes are {list(SHAPES)}")
    return Region(shape, _outline(shape, attributes))


def rasterise(regions: Iterable[Region], rows: int, columns: int) -> np.ndarray:
    """Boolean ``(rows, columns)`` mask: the union of the regions' areas (points add nothing)."""
    canvas = Image.new("L", (columns, rows), 0)
    draw = ImageDraw.Draw(canvas)
    for region in regions:
        if region.has_area:
            draw.polygon(list(region.outline), fill=1)
    return np.asarray(canvas, dtype=np.uint8) > 0
