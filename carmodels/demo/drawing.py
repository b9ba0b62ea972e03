"""Procedurally drawn car photos for the offline demo catalog.

A car is modelled as its side profile (a closed outline of rounded corners) extruded across
the car's width, with the cabin pulled in towards the roof ("tumblehome"). Every point lives
in car units, where the car is 1 tall, so that one small projection serves all three views:

- ``side``: the camera looks straight at the car's flank (yaw ~0);
- ``three_quarter``: the car is turned so that its nose swings towards the camera, showing
  the flank, the front face, the hood and the far wheels peeking out beneath the body;
- ``front``: the camera looks at the nose (yaw ~90 degrees).

Surfaces are painted back to front and the ones facing away are culled, which is enough for
a convex-ish body. The car is always drawn nose-right and the whole picture is mirrored for
``facing="left"``, so that the two facings are exact mirror images of one another. Drawing
happens at ``SUPERSAMPLE`` times the output size and is downsampled with a box filter, which
antialiases every edge without per-primitive work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

BODY_TYPES = ("sedan", "suv", "pickup", "hatchback", "coupe")
VIEWS = ("side", "three_quarter", "front")
FACINGS = ("left", "right")
BACKGROUNDS = ("street", "city", "park", "studio")

#: Paint colours, by name.
CAR_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 232),
    "silver": (178, 182, 188),
    "grey": (110, 114, 120),
    "black": (28, 29, 32),
    "red": (178, 24, 30),
    "maroon": (104, 22, 34),
    "blue": (30, 80, 170),
    "navy": (26, 36, 78),
    "sky blue": (96, 150, 200),
    "green": (32, 104, 60),
    "olive": (96, 102, 52),
    "yellow": (232, 190, 30),
    "orange": (222, 108, 26),
    "beige": (200, 184, 150),
    "brown": (104, 70, 46),
}

#: Picture sizes (width, height) seen on listing sites, with how often each is drawn.
OUTPUT_SIZES: dict[tuple[int, int], float] = {
    (640, 480): 0.35,
    (600, 400): 0.2,
    (800, 533): 0.2,
    (800, 600): 0.1,
    (320, 240): 0.15,
}

#: Drawing resolution relative to the output; the box-filter downsample antialiases edges.
SUPERSAMPLE = 2

Rgb = tuple[int, int, int]


@dataclass(frozen=True)
class BodyProportions:
    """The shape of one body type, in car units (the car's height is 1).

    Lengthwise positions (``*_x``) are fractions of the car's length, measured from the rear
    bumper (0) to the nose (1); heights are fractions of the car's height.
    """

    length: float  # overall length / overall height
    width: float  # overall width / overall height
    clearance: float  # underside of the body above the ground
    shoulder: float  # beltline: where the side windows start
    hood: float  # top of the nose
    tail: float  # top of the rear end: trunk lid, tailgate or bed rail
    windscreen_base_x: float
    windscreen_top_x: float
    roof_rear_x: float
    rear_glass_base_x: float
    rear_axle_x: float
    front_axle_x: float
    wheel_radius: float
    tumblehome: float  # how far the roof is pulled in on each side, in car units
    pillars_x: tuple[float, ...]  # B (and C) pillars splitting the side glass
    rear_doors: bool
    open_bed: bool = False  # pickups: the deck behind the cab is a (covered) load bed
    grille_height: float = 0.22  # fraction of the nose height taken by the grille


BODY_PROPORTIONS: dict[str, BodyProportions] = {
    # Three boxes: hood, cabin, trunk.
    "sedan": BodyProportions(
        length=3.3, width=1.28, clearance=0.13, shoulder=0.6, hood=0.52, tail=0.6,
        windscreen_base_x=0.68, windscreen_top_x=0.55, roof_rear_x=0.3, rear_glass_base_x=0.18,
        rear_axle_x=0.2, front_axle_x=0.8, wheel_radius=0.22, tumblehome=0.14,
        pillars_x=(0.455,), rear_doors=True,
    ),
    # Tall and boxy: the roof runs to the very back over an upright tailgate.
    "suv": BodyProportions(
        length=2.75, width=1.12, clearance=0.17, shoulder=0.6, hood=0.57, tail=0.62,
        windscreen_base_x=0.74, windscreen_top_x=0.63, roof_rear_x=0.04, rear_glass_base_x=0.02,
        rear_axle_x=0.18, front_axle_x=0.81, wheel_radius=0.21, tumblehome=0.1,
        pillars_x=(0.47, 0.19), rear_doors=True, grille_height=0.3,
    ),
    # A cab over the front axle, then an open load bed with an upright cab wall.
    "pickup": BodyProportions(
        length=3.0, width=1.08, clearance=0.2, shoulder=0.62, hood=0.6, tail=0.6,
        windscreen_base_x=0.72, windscreen_top_x=0.63, roof_rear_x=0.4, rear_glass_base_x=0.39,
        rear_axle_x=0.17, front_axle_x=0.8, wheel_radius=0.2, tumblehome=0.08,
        pillars_x=(0.53,), rear_doors=True, open_bed=True, grille_height=0.4,
    ),
    # Short, with the roof sloping straight into a hatch and almost no rear overhang.
    "hatchback": BodyProportions(
        length=2.75, width=1.2, clearance=0.13, shoulder=0.57, hood=0.5, tail=0.56,
        windscreen_base_x=0.7, windscreen_top_x=0.53, roof_rear_x=0.14, rear_glass_base_x=0.03,
        rear_axle_x=0.16, front_axle_x=0.83, wheel_radius=0.22, tumblehome=0.13,
        pillars_x=(0.43, 0.2), rear_doors=True,
    ),
    # Low and long-nosed: a fastback roof, one long door, big wheels.
    "coupe": BodyProportions(
        length=3.55, width=1.45, clearance=0.11, shoulder=0.58, hood=0.45, tail=0.55,
        windscreen_base_x=0.63, windscreen_top_x=0.47, roof_rear_x=0.34, rear_glass_base_x=0.12,
        rear_axle_x=0.2, front_axle_x=0.79, wheel_radius=0.25, tumblehome=0.16,
        pillars_x=(0.33,), rear_doors=False, grille_height=0.18,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ViewSettings:
    """Camera placement for one kind of view."""

    yaw_degrees: tuple[float, float]  # 0: flank on, 90: nose on
    eye_height: tuple[float, float]  # camera height, in car heights
    car_width_fraction: tuple[float, float]  # how much of the picture width the car spans


VIEW_SETTINGS: dict[str, ViewSettings] = {
    "side": ViewSettings(yaw_degrees=(0.0, 2.5), eye_height=(0.5, 0.75),
                         car_width_fraction=(0.72, 0.9)),
    "three_quarter": ViewSettings(yaw_degrees=(24.0, 42.0), eye_height=(0.6, 0.95),
                                  car_width_fraction=(0.7, 0.88)),
    "front": ViewSettings(yaw_degrees=(84.0, 90.0), eye_height=(0.7, 1.0),
                          car_width_fraction=(0.45, 0.62)),
}  # fmt: skip


@dataclass(frozen=True)
class DrawingSettings:
    """Everything about a drawing that is not specific to the body type or view."""

    proportion_jitter: float = 0.03  # relative standard deviation applied to each proportion
    camera_distance: float = 9.0  # in car heights: mild perspective, like a normal lens
    max_car_height_fraction: float = 0.62  # of the picture height
    ground_line: tuple[float, float] = (0.8, 0.9)  # where the wheels touch, fraction of height
    horizontal_jitter: float = 0.04  # of the picture width
    pillar_width: float = 0.045  # window frames, in car units
    tyre_width: float = 0.17
    rim_fraction: float = 0.64  # rim radius / wheel radius
    wheel_inset: float = 0.03  # wheels sit this far inside the flank
    corner_samples: int = 7  # points per rounded corner of the profile


DEFAULT_SETTINGS = DrawingSettings()

GLASS_TOP: Rgb = (118, 132, 148)
GLASS_BOTTOM: Rgb = (30, 35, 43)
TYRE: Rgb = (24, 24, 26)
WHEEL_WELL: Rgb = (14, 14, 16)
RIM: Rgb = (196, 198, 202)
RIM_SHADOW: Rgb = (58, 60, 64)
HEADLIGHT: Rgb = (240, 238, 222)
TAIL_LIGHT: Rgb = (176, 18, 22)
TRIM: Rgb = (34, 35, 38)
BED_COVER: Rgb = (40, 41, 44)
PLATE: Rgb = (236, 236, 228)


# --------------------------------------------------------------------------- colours


def _shade(colour: Rgb, factor: float) -> Rgb:
    """Darken (factor < 1) by scaling, or lighten (factor > 1) by blending towards white."""
    c = np.asarray(colour, dtype=float)
    c = c * factor if factor <= 1 else c + (255 - c) * min(factor - 1, 1)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def _mix(a: Rgb, b: Rgb, t: float) -> Rgb:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _resolve_colour(colour: str | Rgb) -> Rgb:
    if isinstance(colour, str):
        if colour not in CAR_COLOURS:
            raise ValueError(f"unknown colour {colour!r}: use one of {sorted(CAR_COLOURS)}")
        return CAR_COLOURS[colour]
    if len(colour) != 3 or not all(0 <= int(v) <= 255 for v in colour):
        raise ValueError(f"colour must be a name or an (r, g, b) tuple of 0..255, got {colour!r}")
    return (int(colour[0]), int(colour[1]), int(colour[2]))


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Corner:
    """A corner of the side profile; ``material`` is that of the edge leaving it."""

    x: float
    y: float
    radius: float
    material: str  # body | glass | bed


@dataclass(frozen=True)
class _Profile:
    """The rounded side outline, counter-clockwise, nose to the right (x grows to the nose)."""

    points: np.ndarray  # (N, 2) in car units
    materials: list[str]  # material of the edge from point i to point i + 1


def _jittered(p: BodyProportions, rng: np.random.Generator, amount: float) -> BodyProportions:
    """Every float proportion scaled by a small random factor: no two cars are identical."""
    changes = {
        f.name: getattr(p, f.name) * float(1 + rng.normal(0, amount))
        for f in fields(p)
        if isinstance(getattr(p, f.name), float)
    }
    return replace(p, **changes)


def _profile_corners(p: BodyProportions) -> list[_Corner]:
    """The side outline before rounding, starting at the rear of the underside."""
    length, c = p.length, p.clearance
    deck = "bed" if p.open_bed else "body"
    # Pickups have a sharp corner where the upright cab wall meets the bed rail.
    cab_corner = 0.0 if p.open_bed else 0.05
    return [
        _Corner(0.03 * length, c, 0.06, "body"),
        _Corner(0.97 * length, c, 0.06, "body"),
        _Corner(1.0 * length, c + 0.45 * (p.hood - c), 0.12, "body"),
        _Corner(0.975 * length, p.hood, 0.1, "body"),
        _Corner(p.windscreen_base_x * length, p.shoulder, 0.04, "glass"),
        _Corner(p.windscreen_top_x * length, 1.0, 0.14, "body"),
        _Corner(p.roof_rear_x * length, 1.0, 0.12, "glass"),
        _Corner(p.rear_glass_base_x * length, p.tail, cab_corner, deck),
        _Corner(0.006 * length, p.tail, 0.06, "body"),
        _Corner(0.0, c + 0.45 * (p.tail - c), 0.12, "body"),
    ]


def _round_corners(corners: Sequence[_Corner], samples: int) -> _Profile:
    """Replace each corner by a quadratic Bezier arc of (at most) its radius."""
    xy = np.array([(k.x, k.y) for k in corners], dtype=float)
    points: list[np.ndarray] = []
    materials: list[str] = []
    t = np.linspace(0.0, 1.0, samples)[:, None]
    for i, corner in enumerate(corners):
        here, before, after = xy[i], xy[i - 1], xy[(i + 1) % len(xy)]
        to_before, to_after = before - here, after - here
        len_before, len_after = np.linalg.norm(to_before), np.linalg.norm(to_after)
        radius = min(corner.radius, len_before / 2, len_after / 2)
        if radius < 1e-6:
            points.append(here)
            materials.append(corner.material)
            continue
        start = here + to_before / len_before * radius
        end = here + to_after / len_after * radius
        arc = (1 - t) ** 2 * start + 2 * (1 - t) * t * here + t**2 * end
        # Frames around glass are body-coloured, so the arc is glass only inside a glass run.
        previous = corners[i - 1].material
        arc_material = previous if previous == corner.material else "body"
        points.extend(arc)
        materials.extend([arc_material] * (samples - 1) + [corner.material])
    return _Profile(np.array(points), materials)


def _tumble(p: BodyProportions, y: np.ndarray | float) -> np.ndarray:
    """How far the body is pulled in from the flank at height ``y`` (the cabin leans in)."""
    rise = np.clip((np.asarray(y, dtype=float) - p.shoulder) / (1.0 - p.shoulder), 0.0, 1.0)
    return p.tumblehome * rise


def _near(p: BodyProportions, xy: np.ndarray) -> np.ndarray:
    """Profile points placed on the near flank (z = 0 at the beltline and below)."""
    xy = np.atleast_2d(xy)
    return np.column_stack([xy[:, 0], xy[:, 1], _tumble(p, xy[:, 1])])


def _far(p: BodyProportions, xy: np.ndarray) -> np.ndarray:
    xy = np.atleast_2d(xy)
    return np.column_stack([xy[:, 0], xy[:, 1], p.width - _tumble(p, xy[:, 1])])


def _circle(centre_x: float, centre_y: float, radius: float, z: float, n: int = 48) -> np.ndarray:
    """A circle in the plane of constant z (a wheel seen from the side)."""
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack(
        [centre_x + radius * np.cos(angle), centre_y + radius * np.sin(angle), np.full(n, z)]
    )


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain, counter-clockwise."""
    pts = sorted(map(tuple, points))

    def cross(o: tuple, a: tuple, b: tuple) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple] = []
    upper: list[tuple] = []
    for pt in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], pt) <= 0:
            lower.pop()
        lower.append(pt)
    for pt in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], pt) <= 0:
            upper.pop()
        upper.append(pt)
    return np.array(lower[:-1] + upper[:-1])


def _inset(polygon: np.ndarray, distance: float) -> np.ndarray:
    """Move every edge of a counter-clockwise polygon inwards by ``distance`` (mitred)."""
    edges = np.roll(polygon, -1, axis=0) - polygon
    lengths = np.linalg.norm(edges, axis=1, keepdims=True)
    inward = np.column_stack([-edges[:, 1], edges[:, 0]]) / np.maximum(lengths, 1e-9)
    before, after = np.roll(inward, 1, axis=0), inward
    bisector = before + after
    bisector /= np.maximum(np.linalg.norm(bisector, axis=1, keepdims=True), 1e-9)
    # A mitre's length grows as the corner sharpens; capping it keeps spikes out.
    cos_half = np.maximum(np.sum(bisector * after, axis=1, keepdims=True), 0.35)
    return polygon + bisector * distance / cos_half


# --------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class _Camera:
    """Car units -> picture pixels: a yaw turn, mild perspective and a screen placement."""

    yaw: float  # radians
    eye_height: float
    distance: float
    pivot: tuple[float, float]  # (x, z) the car turns about: its centre on the ground
    scale: float = 1.0  # pixels per car unit
    origin: tuple[float, float] = (0.0, 0.0)  # pixel of the projected (0, 0)

    def screen(self, points: np.ndarray) -> np.ndarray:
        """Projected (x right, y up) coordinates in car units."""
        points = np.atleast_2d(points)
        x = points[:, 0] - self.pivot[0]
        z = points[:, 2] - self.pivot[1]
        across = x * math.cos(self.yaw) + z * math.sin(self.yaw)
        depth = -x * math.sin(self.yaw) + z * math.cos(self.yaw)
        shrink = self.distance / (self.distance + depth)
        up = self.eye_height + (points[:, 1] - self.eye_height) * shrink
        return np.column_stack([across * shrink, up])

    def depth(self, points: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(points)
        x = points[:, 0] - self.pivot[0]
        z = points[:, 2] - self.pivot[1]
        return -x * math.sin(self.yaw) + z * math.cos(self.yaw)

    def pixels(self, points: np.ndarray) -> list[tuple[float, float]]:
        s = self.screen(points)
        px = self.origin[0] + s[:, 0] * self.scale
        py = self.origin[1] - s[:, 1] * self.scale
        return list(zip(px.tolist(), py.tolist(), strict=True))

    def horizon_y(self) -> float:
        """Pixel row of the horizon: points infinitely far away converge to eye level."""
        return self.origin[1] - self.eye_height * self.scale


def _signed_areas(polygons: np.ndarray) -> np.ndarray:
    """Shoelace areas of (..., N, 2) screen polygons; positive when counter-clockwise."""
    x, y = polygons[..., 0], polygons[..., 1]
    return 0.5 * np.sum(x * np.roll(y, -1, axis=-1) - np.roll(x, -1, axis=-1) * y, axis=-1)


def _faces_camera(camera: _Camera, points: np.ndarray) -> bool:
    """Back-face test: a surface wound counter-clockwise from outside faces the camera when
    its outline is still counter-clockwise on screen."""
    return bool(_signed_areas(camera.screen(points)) > 1e-9)


# --------------------------------------------------------------------------- painting


def _gradient_polygon(
    canvas: Image.Image,
    polygon: Sequence[tuple[float, float]],
    top: Rgb,
    bottom: Rgb,
    holes: Sequence[Sequence[tuple[float, float]]] = (),
) -> None:
    """Fill a polygon with a vertical colour gradient, leaving ``holes`` untouched."""
    xs = [p[0] for p in polygon]
    ys = [p[1] for p in polygon]
    left, upper = max(int(min(xs)) - 1, 0), max(int(min(ys)) - 1, 0)
    right, lower = min(int(max(xs)) + 2, canvas.width), min(int(max(ys)) + 2, canvas.height)
    if right <= left or lower <= upper:
        return
    mask = Image.new("L", (right - left, lower - upper), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([(x - left, y - upper) for x, y in polygon], fill=255)
    for hole in holes:
        draw.polygon([(x - left, y - upper) for x, y in hole], fill=0)
    fill = _vertical_gradient((right - left, lower - upper), [(0.0, top), (1.0, bottom)])
    canvas.paste(fill, (left, upper), mask)


def _vertical_gradient(size: tuple[int, int], stops: Sequence[tuple[float, Rgb]]) -> Image.Image:
    """An image interpolating colour stops (position 0..1 from the top) down its height."""
    width, height = size
    rows = np.linspace(0.0, 1.0, height)
    positions = [s[0] for s in stops]
    column = np.column_stack(
        [np.interp(rows, positions, [s[1][c] for s in stops]) for c in range(3)]
    )
    strip = Image.fromarray(np.round(column)[:, None, :].astype(np.uint8), "RGB")
    return strip.resize((width, height), Image.Resampling.NEAREST)


# --------------------------------------------------------------------------- background


def _draw_background(
    rng: np.random.Generator, size: tuple[int, int], horizon: float, kind: str
) -> Image.Image:
    width, height = size
    h = float(np.clip(horizon / height, 0.05, 0.95))
    if kind == "studio":
        wall = _shade((226, 226, 228), float(rng.uniform(0.8, 1.05)))
        floor = _shade(wall, 0.86)
        return _vertical_gradient(
            size, [(0.0, _shade(wall, 0.88)), (h, wall), (min(h + 0.08, 1.0), floor), (1.0, floor)]
        )

    sky_top = _mix((64, 118, 190), (150, 160, 172), float(rng.uniform(0, 0.6)))
    sky_horizon = _mix(sky_top, (236, 240, 244), 0.75)
    if kind == "park":
        ground_far, ground_near = (108, 140, 76), (78, 112, 54)
    else:
        asphalt = float(rng.uniform(0.8, 1.15))
        ground_far, ground_near = _shade((128, 128, 130), asphalt), _shade((88, 88, 92), asphalt)
    image = _vertical_gradient(
        size, [(0.0, sky_top), (h, sky_horizon), (h, ground_far), (1.0, ground_near)]
    )
    draw = ImageDraw.Draw(image)
    if kind == "city":
        _draw_buildings(draw, rng, size, horizon)
    if kind in ("park", "street"):
        _draw_trees(
            draw, rng, size, horizon, count=int(rng.integers(2 if kind == "street" else 4, 9))
        )
    if kind == "street":
        # A kerb along the far side of the road.
        kerb = horizon + (height - horizon) * 0.08
        draw.rectangle((0, kerb, width, kerb + max(2, height // 120)), fill=(170, 170, 166))
    return image


def _draw_buildings(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int], horizon: float
) -> None:
    width, height = size
    x = -float(rng.uniform(0, width * 0.1))
    while x < width:
        w = float(rng.uniform(0.12, 0.3)) * width
        h = float(rng.uniform(0.15, 0.45)) * height
        wall = _mix((150, 140, 130), tuple(int(v) for v in rng.integers(90, 210, 3)), 0.5)
        draw.rectangle((x, horizon - h, x + w, horizon), fill=wall)
        window = _shade(wall, 0.6)
        step = max(height / 28, 4.0)
        for wy in np.arange(horizon - h + step * 0.6, horizon - step, step * 1.6):
            for wx in np.arange(x + step * 0.6, x + w - step, step * 1.4):
                draw.rectangle((wx, wy, wx + step * 0.7, wy + step * 0.9), fill=window)
        x += w + float(rng.uniform(0, 0.05)) * width


def _draw_trees(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    size: tuple[int, int],
    horizon: float,
    count: int,
) -> None:
    width, height = size
    for _ in range(count):
        cx = float(rng.uniform(0, width))
        crown = float(rng.uniform(0.06, 0.14)) * height
        trunk_h = crown * float(rng.uniform(0.6, 1.1))
        base = horizon + float(rng.uniform(0, 0.02)) * height
        draw.rectangle(
            (cx - crown * 0.12, base - trunk_h, cx + crown * 0.12, base), fill=(84, 62, 44)
        )
        green = _mix((44, 92, 40), (88, 128, 56), float(rng.uniform()))
        for _ in range(3):
            ox, oy = rng.normal(0, crown * 0.3, 2)
            r = crown * float(rng.uniform(0.7, 1.0))
            cy = base - trunk_h - crown * 0.5 + oy
            draw.ellipse((cx + ox - r, cy - r, cx + ox + r, cy + r), fill=_shade(green, 0.9))


def _draw_shadow(canvas: Image.Image, camera: _Camera, p: BodyProportions) -> None:
    """A soft dark pool on the ground under the car, darker right beneath the body."""
    margin = 0.12
    footprint = np.array(
        [[-margin, 0, -margin], [p.length + margin, 0, -margin],
         [p.length + margin, 0, p.width + margin], [-margin, 0, p.width + margin]]
    )  # fmt: skip
    pixels = camera.pixels(footprint)
    xs, ys = [q[0] for q in pixels], [q[1] for q in pixels]
    spread = 0.08 * camera.scale
    blur = max(2.0, camera.scale * 0.06)
    # Only the region around the footprint is blurred: a full-canvas blur is the slow part.
    pad = 3 * blur + spread
    left, top = int(min(xs) - pad), int(min(ys) - pad)
    right, bottom = int(max(xs) + pad), int(max(ys) + pad)
    mask = Image.new("L", (right - left, bottom - top), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse(
        (min(xs) - left, min(ys) - spread - top, max(xs) - left, max(ys) + spread - top), fill=110
    )
    draw.polygon([(x - left, y - top) for x, y in pixels], fill=170)
    mask = mask.filter(ImageFilter.GaussianBlur(blur))
    canvas.paste((12, 12, 14), (left, top, right, bottom), mask)


# --------------------------------------------------------------------------- the car


@dataclass
class _Car:
    """One car being drawn: its shape, paint, camera and canvas."""

    p: BodyProportions
    profile: _Profile
    paint: Rgb
    camera: _Camera
    canvas: Image.Image
    settings: DrawingSettings
    rim_spokes: int

    @property
    def draw(self) -> ImageDraw.ImageDraw:
        return ImageDraw.Draw(self.canvas)

    def polygon(self, points3d: np.ndarray, fill: Rgb) -> None:
        self.draw.polygon(self.camera.pixels(points3d), fill=fill)

    def paint_shade(self, normal: np.ndarray) -> Rgb:
        """Body colour lit from above and slightly in front."""
        light = np.array([0.35, 1.0])
        light /= np.linalg.norm(light)
        facing_light = float(np.dot(normal, light))
        return _shade(self.paint, 0.72 + 0.42 * max(facing_light, 0.0))

    # ----------------------------------------------------------------- surfaces

    def draw_extruded_surfaces(self) -> None:
        """Hood, nose, windscreen, roof, ... : every profile edge swept across the width."""
        a = self.profile.points
        b = np.roll(a, -1, axis=0)
        edges = b - a
        lengths = np.linalg.norm(edges, axis=1)
        keep = lengths > 1e-9
        a, b, edges, lengths = a[keep], b[keep], edges[keep], lengths[keep]
        materials = [m for m, k in zip(self.profile.materials, keep, strict=True) if k]
        # Each strip is wound like the flank: counter-clockwise seen from outside the body.
        corners = np.stack(
            [_near(self.p, a), _far(self.p, a), _far(self.p, b), _near(self.p, b)], 1
        )
        flat = corners.reshape(-1, 3)
        screen = self.camera.screen(flat).reshape(-1, 4, 2)
        visible = _signed_areas(screen) > 1e-9
        depth = self.camera.depth(flat).reshape(-1, 4).mean(axis=1)
        outward = np.column_stack([edges[:, 1], -edges[:, 0]]) / lengths[:, None]
        for i in sorted(np.flatnonzero(visible), key=lambda k: -depth[k]):
            if materials[i] == "bed":
                colour = BED_COVER
            elif materials[i] == "glass":
                colour = _shade(self.paint_shade(outward[i]), 0.9)  # frame; glass inset later
            else:
                colour = self.paint_shade(outward[i])
            pixels = self.camera.pixels(corners[i])
            self.draw.polygon(pixels, fill=colour, outline=colour)
        self.draw_windscreen()

    def draw_windscreen(self) -> None:
        """The windscreen glass, inset from the A-pillars, if it faces the camera."""
        pts, mats = self.profile.points, self.profile.materials
        run = [i for i, m in enumerate(mats) if m == "glass" and pts[i][0] > self.p.length / 2]
        if not run:
            return
        glass = pts[run[0] : run[-1] + 2]
        frame = self.settings.pillar_width
        near = _near(self.p, glass) + [0, 0, frame]
        far = _far(self.p, glass) - [0, 0, frame]
        # Pull the top and bottom edges in along the glass too.
        near[0, :2] += (glass[1] - glass[0]) * 0.15
        far[0, :2] += (glass[1] - glass[0]) * 0.15
        outline = np.vstack([far, near[::-1]])
        if _faces_camera(self.camera, outline):
            _gradient_polygon(self.canvas, self.camera.pixels(outline), GLASS_TOP, GLASS_BOTTOM)

    def draw_near_flank(self) -> None:
        """The side of the car facing the camera, shaded darker towards the sills."""
        flank = _near(self.p, self.profile.points)
        if not _faces_camera(self.camera, flank):
            return
        pixels = self.camera.pixels(flank)
        _gradient_polygon(self.canvas, pixels, _shade(self.paint, 1.12), _shade(self.paint, 0.62))
        self.draw_side_windows()
        self.draw_body_lines()
        self.draw_side_lights()
        self.draw_mirror()

    def greenhouse(self) -> np.ndarray:
        """The part of the profile above the window sill, closed along the sill."""
        sill = self.p.shoulder + 0.03
        pts = self.profile.points
        above = pts[:, 1] > sill
        # The cabin is the one run of points above the sill; find where it starts.
        start = next(i for i in range(len(pts)) if above[i] and not above[i - 1])
        run = []
        i = start
        while above[i % len(pts)]:
            run.append(pts[i % len(pts)])
            i += 1

        def crossing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            t = (sill - a[1]) / (b[1] - a[1])
            return a + (b - a) * t

        first = crossing(pts[start - 1], pts[start])
        last = crossing(pts[(i - 1) % len(pts)], pts[i % len(pts)])
        return np.vstack([first, run, last])

    def draw_side_windows(self) -> None:
        window = _inset(self.greenhouse(), self.settings.pillar_width)
        pixels = self.camera.pixels(_near(self.p, window))
        top, bottom = window[:, 1].max(), window[:, 1].min()
        pillars = []
        for x_fraction in self.p.pillars_x:
            x = x_fraction * self.p.length
            half = self.settings.pillar_width * 1.1
            lean = 0.06  # pillars lean back slightly towards the roof
            quad = np.array(
                [[x - half, bottom - 0.05], [x + half, bottom - 0.05],
                 [x + half - lean, top + 0.05], [x - half - lean, top + 0.05]]
            )  # fmt: skip
            pillars.append(self.camera.pixels(_near(self.p, quad)))
        _gradient_polygon(self.canvas, pixels, GLASS_TOP, GLASS_BOTTOM, holes=pillars)

    def door_cuts(self) -> list[float]:
        """x positions of the door shut lines."""
        p, r = self.p, self.p.wheel_radius
        front = p.front_axle_x * p.length - r * 1.35
        b_pillar = p.pillars_x[0] * p.length
        cuts = [front, b_pillar]
        if p.rear_doors:
            cuts.append(max(p.rear_axle_x * p.length + r * 1.3, b_pillar - 1.1))
        return cuts

    def draw_body_lines(self) -> None:
        p, draw = self.p, self.draw
        line = _shade(self.paint, 0.5)
        width = max(1, int(self.camera.scale * 0.012))
        top, bottom = p.shoulder + 0.02, p.clearance + 0.07
        for x in self.door_cuts():
            draw.line(self.camera.pixels(_near(p, np.array([[x, top], [x - 0.03, bottom]]))),
                      fill=line, width=width)  # fmt: skip
        # Character line along the flank catches the light.
        crease = p.shoulder - 0.09
        highlight = self.camera.pixels(
            _near(p, np.array([[0.04 * p.length, crease], [0.95 * p.length, crease - 0.02]]))
        )
        draw.line(highlight, fill=_shade(self.paint, 1.3), width=width)
        # Door handles just ahead of each door's rear edge.
        cuts = sorted(self.door_cuts())
        for x in cuts[:-1] if len(cuts) > 1 else cuts:
            handle = np.array([[x + 0.06, crease - 0.02], [x + 0.2, crease - 0.02],
                               [x + 0.2, crease - 0.05], [x + 0.06, crease - 0.05]])  # fmt: skip
            self.polygon(_near(p, handle), _shade(self.paint, 0.55))
        # Dark sill between the wheels.
        sill = np.array(
            [[p.rear_axle_x * p.length, p.clearance], [p.front_axle_x * p.length, p.clearance],
             [p.front_axle_x * p.length, p.clearance + 0.05],
             [p.rear_axle_x * p.length, p.clearance + 0.05]]
        )  # fmt: skip
        self.polygon(_near(p, sill), _shade(self.paint, 0.45))

    def draw_side_lights(self) -> None:
        p = self.p
        head_y = p.hood - 0.07
        headlight = np.array(
            [[0.9 * p.length, head_y], [0.99 * p.length, head_y - 0.02],
             [0.995 * p.length, head_y - 0.08], [0.91 * p.length, head_y - 0.06]]
        )  # fmt: skip
        self.polygon(_near(p, headlight), HEADLIGHT)
        tail_y = p.tail - 0.06
        tail_light = np.array(
            [[0.003 * p.length, tail_y], [0.06 * p.length, tail_y],
             [0.055 * p.length, tail_y - 0.1], [0.0, tail_y - 0.1]]
        )  # fmt: skip
        self.polygon(_near(p, tail_light), TAIL_LIGHT)
        if p.open_bed:
            # The bed's top rail and tailgate seam.
            rail = np.array([[0.01 * p.length, p.tail - 0.02],
                             [p.rear_glass_base_x * p.length, p.tail - 0.02]])  # fmt: skip
            self.draw.line(self.camera.pixels(_near(p, rail)), fill=_shade(self.paint, 0.55),
                           width=max(1, int(self.camera.scale * 0.012)))  # fmt: skip

    def draw_mirror(self, far: bool = False) -> None:
        """A door mirror at the foot of the A-pillar: an arm out of the flank, and a housing."""
        p = self.p
        x, y = p.windscreen_base_x * p.length - 0.06, p.shoulder + 0.02
        root, tip = (-0.02, -0.14) if not far else (p.width + 0.02, p.width + 0.14)
        arm = np.array([[x, y, root], [x + 0.12, y, root], [x + 0.1, y + 0.09, tip],
                        [x - 0.01, y + 0.09, tip]])  # fmt: skip
        self.polygon(arm, _shade(self.paint, 0.8))
        # The housing's forward face: what a camera in front of the car sees.
        housing = np.array([[x + 0.1, y + 0.03, root], [x + 0.1, y + 0.03, tip],
                            [x + 0.1, y + 0.12, tip], [x + 0.1, y + 0.12, root]])  # fmt: skip
        if math.sin(self.camera.yaw) > 0.25:
            self.polygon(housing, _shade(self.paint, 0.7))

    # ----------------------------------------------------------------- front

    def front_point(self, y: float, z_fraction: float) -> np.ndarray:
        return np.array([self.p.length, y, z_fraction * self.p.width])

    def front_rect(self, y0: float, y1: float, z0: float, z1: float, fill: Rgb) -> None:
        quad = np.array(
            [self.front_point(y0, z0), self.front_point(y0, z1),
             self.front_point(y1, z1), self.front_point(y1, z0)]
        )  # fmt: skip
        self.polygon(quad, fill)

    def draw_front_face(self) -> None:
        """Grille, headlights, intake and plate, when the nose is turned towards the camera."""
        if math.sin(self.camera.yaw) < 0.25:
            return
        p = self.p
        nose_bottom, nose_top = p.clearance + 0.03, p.hood - 0.04
        span = nose_top - nose_bottom
        grille_top = nose_top - 0.06
        grille_bottom = grille_top - span * p.grille_height * 1.6
        self.front_rect(grille_bottom, grille_top, 0.3, 0.7, TRIM)
        for k in range(1, 4):  # horizontal slats
            y = grille_bottom + (grille_top - grille_bottom) * k / 4
            self.front_rect(y - 0.006, y + 0.006, 0.31, 0.69, _shade(self.paint, 0.6))
        light_bottom = grille_top - 0.09
        for z0, z1 in ((0.06, 0.27), (0.73, 0.94)):
            self.front_rect(light_bottom, grille_top, z0, z1, HEADLIGHT)
        self.front_rect(nose_bottom, nose_bottom + 0.05, 0.2, 0.8, TRIM)  # lower intake
        self.front_rect(nose_bottom + 0.06, nose_bottom + 0.12, 0.42, 0.58, PLATE)

    # ----------------------------------------------------------------- wheels

    def wheel_centres(self, far: bool) -> list[tuple[float, float, float, float]]:
        """(x, y, outer z, inner z) of each wheel on one side."""
        p, s = self.p, self.settings
        r = p.wheel_radius
        outer = s.wheel_inset if not far else p.width - s.wheel_inset
        inner = outer + s.tyre_width if not far else outer - s.tyre_width
        return [(axle * p.length, r, outer, inner) for axle in (p.rear_axle_x, p.front_axle_x)]

    def draw_tyres(self, far: bool) -> None:
        r = self.p.wheel_radius
        for x, y, outer, inner in self.wheel_centres(far):
            both = np.vstack([_circle(x, y, r, outer), _circle(x, y, r, inner)])
            hull = _convex_hull(np.array(self.camera.pixels(both)))
            self.draw.polygon([tuple(q) for q in hull], fill=TYRE)

    def draw_wheel_arches(self) -> None:
        p = self.p
        for x, y, _, _ in self.wheel_centres(far=False):
            arch = _circle(x, y, p.wheel_radius * 1.13, 0.0)
            arch[:, 1] = np.maximum(arch[:, 1], p.clearance)
            self.polygon(arch, WHEEL_WELL)

    def draw_rims(self) -> None:
        """Rim, spokes and hub on the outer face of each near wheel."""
        if math.cos(self.camera.yaw) < 0.3:
            return
        p, s = self.p, self.settings
        r = p.wheel_radius
        width = max(1, int(self.camera.scale * r * 0.12))
        for x, y, outer, _ in self.wheel_centres(far=False):
            self.polygon(_circle(x, y, r * 0.9, outer), _shade(TYRE, 1.06))  # sidewall
            self.polygon(_circle(x, y, r * s.rim_fraction, outer), RIM)
            self.polygon(_circle(x, y, r * s.rim_fraction * 0.88, outer), RIM_SHADOW)
            for k in range(self.rim_spokes):
                angle = 2 * np.pi * k / self.rim_spokes
                spoke = np.array(
                    [[x + r * 0.15 * np.cos(angle), y + r * 0.15 * np.sin(angle), outer],
                     [x + r * s.rim_fraction * 0.9 * np.cos(angle),
                      y + r * s.rim_fraction * 0.9 * np.sin(angle), outer]]
                )  # fmt: skip
                self.draw.line(self.camera.pixels(spoke), fill=RIM, width=width)
            self.polygon(_circle(x, y, r * 0.2, outer, n=16), _shade(RIM, 0.85))


# --------------------------------------------------------------------------- assembly


def _place_camera(
    rng: np.random.Generator,
    p: BodyProportions,
    view: str,
    canvas_size: tuple[int, int],
    settings: DrawingSettings,
) -> _Camera:
    """Turn the car for the view, then scale and position it in the picture with some jitter."""
    vs = VIEW_SETTINGS[view]
    camera = _Camera(
        yaw=math.radians(float(rng.uniform(*vs.yaw_degrees))),
        eye_height=float(rng.uniform(*vs.eye_height)),
        distance=settings.camera_distance,
        pivot=(p.length / 2, p.width / 2),
    )
    outline = np.vstack(
        [
            _near(p, np.array([[0, 0], [p.length, 0], [p.length, 1], [0, 1]])),
            _far(p, np.array([[0, 0], [p.length, 0], [p.length, 1], [0, 1]])),
        ]
    )
    screen = camera.screen(outline)
    span_x = screen[:, 0].max() - screen[:, 0].min()
    span_y = screen[:, 1].max() - screen[:, 1].min()
    width, height = canvas_size
    scale = min(
        float(rng.uniform(*vs.car_width_fraction)) * width / span_x,
        settings.max_car_height_fraction * height / span_y,
    )
    centre_x = width * (0.5 + float(rng.uniform(-1, 1)) * settings.horizontal_jitter)
    ground = height * float(rng.uniform(*settings.ground_line))
    origin_x = centre_x - (screen[:, 0].max() + screen[:, 0].min()) / 2 * scale
    origin_y = ground + screen[:, 1].min() * scale
    return replace(camera, scale=float(scale), origin=(float(origin_x), float(origin_y)))


def draw_car(
    rng: np.random.Generator,
    *,
    body_type: str,
    colour: str | Rgb,
    facing: str,
    view: str,
    size: tuple[int, int],
    background: str | None = None,
    settings: DrawingSettings = DEFAULT_SETTINGS,
) -> Image.Image:
    """Draw one car photo.

    ``rng`` drives every random detail (proportion jitter, camera, background, rims), so the
    same generator state gives the same picture. ``facing`` is the direction the nose points
    in the picture. ``background`` is one of `BACKGROUNDS`, random when None.
    """
    for name, value, allowed in (
        ("body_type", body_type, BODY_TYPES),
        ("view", view, VIEWS),
        ("facing", facing, FACINGS),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}: use one of {list(allowed)}")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}: use one of {list(BACKGROUNDS)}")
    width, height = size
    if width < 32 or height < 32:
        raise ValueError(f"size must be at least 32x32 pixels, got {size}")
    paint = _resolve_colour(colour)

    p = _jittered(BODY_PROPORTIONS[body_type], rng, settings.proportion_jitter)
    profile = _round_corners(_profile_corners(p), settings.corner_samples)
    canvas_size = (width * SUPERSAMPLE, height * SUPERSAMPLE)
    camera = _place_camera(rng, p, view, canvas_size, settings)
    kind = background or str(rng.choice(BACKGROUNDS))
    canvas = _draw_background(rng, canvas_size, camera.horizon_y(), kind)
    _draw_shadow(canvas, camera, p)

    car = _Car(p, profile, paint, camera, canvas, settings, rim_spokes=int(rng.integers(5, 11)))
    nose_on = math.cos(camera.yaw) < 0.3
    car.draw_tyres(far=True)
    if nose_on:
        car.draw_tyres(far=False)
    car.draw_extruded_surfaces()
    car.draw_front_face()
    if nose_on:
        car.draw_mirror(far=False)
        car.draw_mirror(far=True)
    if not nose_on:
        car.draw_near_flank()
        car.draw_wheel_arches()
        car.draw_tyres(far=False)
        car.draw_rims()

    # A box filter over each SUPERSAMPLE x SUPERSAMPLE block is exact antialiasing for an integer
    # factor and ten times faster than LANCZOS, which matters when the server draws on demand.
    image = canvas.reduce(SUPERSAMPLE)
    return ImageOps.mirror(image) if facing == "left" else image


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    """A picture size drawn from `OUTPUT_SIZES`."""
    sizes = list(OUTPUT_SIZES)
    weights = np.array(list(OUTPUT_SIZES.values()))
    return sizes[int(rng.choice(len(sizes), p=weights / weights.sum()))]
