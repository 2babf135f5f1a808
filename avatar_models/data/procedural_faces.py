"""Procedural "talking faces": a deterministic toy reenactment dataset, no downloads.

A face is drawn from two kinds of parameters:

- identity (fixed per identity seed): skin, hair, shirt, iris and lip colours, face shape
  (ellipse radii), hair style (volume, hairline, long or short) and a background texture
  (stripes, checker, rings or a gradient in two colours);
- per-frame pose and expression, the 8 columns of ``params`` (``PARAM_NAMES``):
  ``head_x, head_y, tilt`` in [-1, 1] (head shift of +-6 / +-4 px and roll of +-0.25 rad),
  ``eye_left, eye_right, mouth_open`` in [0, 1], ``smile`` in [-1, 1], ``brow`` in [0, 1].

``render`` rasterises both into 64x64 RGB frames in [0, 1] with anti-aliased signed-distance
shapes (plain torch, vectorised over frames, differentiable in ``params``), plus a per-frame
mask of the expressive regions (eyes, brows, mouth) for the weighted loss. ``landmarks`` turns
``params`` into the per-frame control vector: 20 landmark-style 2-D points (face outline, eyes,
brows, nose, mouth) of a canonical face posed and animated by the frame's parameters, in
[-1, 1] image coordinates. The canonical face makes the controls identity-free, like
identity-normalised landmarks used for retargeting in cross-identity reenactment.

Two worlds (``WORLDS``). ``"plain"`` (what the bundled demo model was trained on) is the above.
``"fine"`` adds, per identity seed and from its own random stream (so the coarse attributes of a
seed are the same in both worlds), salient appearance that the global condition does not carry
(:class:`FineAttributes`): a background pattern (stripes at an angle, checker or dots, with its
period and 2-D phase) replacing the plain world's texture, a patterned shirt, and an accessory
(glasses, earrings or a hat); the inks of both patterns contrast with their ground colour. The
global condition of the fine world, :func:`global_condition`, is the 4x4 thumbnail of the
*coarse* portrait (flat background in the pattern's ground colour, plain shirt, no accessory):
palette, coarse layout, face and hair colours, like a CLIP descriptor, and exactly invariant to
the fine attributes, so a video model must invent them and keep them by copying across frames.
:func:`region_masks` gives, for a clip, the face+hair region of every frame (PSNR target) and
the background and shirt pixels that the head never covers in it (pose-invariant readout).

A third world, ``"parts"`` (LaVieID's toy, :mod:`avatar_models.data.face_parts`), is the plain
world with larger, more distinct facial-part attributes per identity (:class:`PartAttributes`,
drawn from their own random stream, so the coarse attributes of a seed are the plain world's):
iris colour (from a wide palette) and size, lip colour and shape (width and thickness of the lip
rim), brow colour and shape (length, slant, thickness). Identity then lives in the parts, not
only in the global colours.

Everything is deterministic per seed: ``sample_identity(seed)`` and ``sample_motion(seed, n)``
use their own ``numpy.random.Generator``. ``ProceduralFaces`` yields training sequences in the
layout the sDiT trainer takes (non-uniform frame indices, source frame furthest in time, as in
the Anchored Diffusion paper, section 3.1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 64
PARAM_NAMES = ("head_x", "head_y", "tilt", "eye_left", "eye_right", "mouth_open", "smile",
               "brow")
N_PARAMS = len(PARAM_NAMES)
N_LANDMARKS = 20
CONTROL_DIM = 2 * N_LANDMARKS
IDENTITY_GRID = 4
IDENTITY_DIM = 3 * IDENTITY_GRID * IDENTITY_GRID
# identity seeds at or above this value are never drawn by ProceduralFaces (held out)
HELD_OUT_SEED_BASE = 1_000_000

MOUTH_INSIDE = (0.42, 0.04, 0.12)  # dark crimson, the same for every identity
SCLERA = (0.96, 0.96, 0.94)
LINER = (0.12, 0.08, 0.08)

_SKINS = ((0.98, 0.84, 0.72), (0.93, 0.74, 0.60), (0.82, 0.60, 0.45), (0.64, 0.44, 0.30),
          (0.45, 0.30, 0.21), (0.99, 0.88, 0.80))
_HAIRS = ((0.10, 0.08, 0.07), (0.35, 0.22, 0.12), (0.85, 0.70, 0.40), (0.62, 0.26, 0.10),
          (0.70, 0.70, 0.72), (0.25, 0.35, 0.75), (0.80, 0.40, 0.65))
_IRISES = ((0.25, 0.15, 0.08), (0.20, 0.40, 0.75), (0.25, 0.55, 0.30), (0.40, 0.40, 0.45))
TEXTURES = ("stripes_h", "stripes_v", "stripes_diag", "checker", "rings", "gradient")
WORLDS = ("plain", "fine", "parts")
FLAT_BACKGROUND = -1  # texture index that coarse() uses: bg_a, the pattern's ground colour
BACKGROUND_PATTERNS = ("stripes", "checker", "dots")
SHIRT_PATTERNS = ("stripes_h", "stripes_v", "checker", "dots")
ACCESSORIES = ("glasses", "earrings", "hat")


@dataclass(frozen=True)
class FineAttributes:
    """Appearance of the ``"fine"`` world that the global condition does not carry."""

    bg_pattern: int  # index into BACKGROUND_PATTERNS, drawn in bg_ink on bg_a
    bg_ink: tuple[float, float, float]
    bg_angle: float  # rad
    bg_period: float  # px
    bg_phase: tuple[float, float]  # fractions of a period along and across the pattern
    shirt_pattern: int  # index into SHIRT_PATTERNS, drawn in shirt_b on shirt
    shirt_b: tuple[float, float, float]
    shirt_period: float  # px
    shirt_phase: float
    accessory: int  # index into ACCESSORIES
    accessory_colour: tuple[float, float, float]


# the "parts" world's palettes: far apart, so each part tells identities apart on its own
_PART_IRISES = ((0.30, 0.16, 0.06), (0.15, 0.40, 0.95), (0.10, 0.70, 0.25), (0.55, 0.55, 0.60),
                (0.85, 0.60, 0.05), (0.55, 0.15, 0.80), (0.05, 0.75, 0.80), (0.90, 0.10, 0.15))
_PART_LIPS = ((0.85, 0.10, 0.15), (0.95, 0.50, 0.65), (0.45, 0.10, 0.35), (0.50, 0.28, 0.18),
              (0.95, 0.50, 0.15), (0.30, 0.05, 0.55), (0.20, 0.45, 0.85), (0.90, 0.80, 0.70))
_PART_BROWS = ((0.05, 0.05, 0.05), (0.35, 0.20, 0.08), (0.80, 0.65, 0.30), (0.65, 0.20, 0.05),
               (0.60, 0.60, 0.65), (0.15, 0.25, 0.70))


@dataclass(frozen=True)
class PartAttributes:
    """Facial-part appearance of the ``"parts"`` world (the plain world's values in brackets)."""

    iris_size: float  # iris radius / eye half-width [0.45]
    lip_width: float  # px the lip rim extends past the mouth opening sideways [1.2]
    lip_thickness: float  # px the lip rim extends past the mouth opening up and down [1.2]
    brow: tuple[float, float, float]  # brow colour [0.7 * hair]
    brow_length: float  # brow half-length / face_rx [0.25]
    brow_slant: float  # px the inner end sits below the outer end [1.0]
    brow_thickness: float  # capsule radius px [1.0]


@dataclass(frozen=True)
class FaceIdentity:
    """Appearance of one person and their background (see module docstring)."""

    seed: int
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    shirt: tuple[float, float, float]
    iris: tuple[float, float, float]
    lips: tuple[float, float, float]
    bg_a: tuple[float, float, float]
    bg_b: tuple[float, float, float]
    texture: int  # index into TEXTURES
    tex_freq: float  # cycles per image
    tex_phase: float
    face_rx: float  # px
    face_ry: float  # px
    hair_volume: float  # hair ellipse radii / face radii
    hairline: float  # fringe reaches this fraction of face_ry above the centre
    long_hair: bool
    fine: FineAttributes | None = None  # None: the "plain" world
    parts: PartAttributes | None = None  # the "parts" world only


def _colour(rng: np.random.Generator, base, jitter: float) -> tuple[float, float, float]:
    c = np.clip(np.asarray(base) + rng.uniform(-jitter, jitter, 3), 0.0, 1.0)
    return tuple(float(v) for v in c)


def _random_colour(rng: np.random.Generator, lo: float, hi: float) -> tuple[float, float, float]:
    # saturated-ish colours away from the white sclera and the dark mouth key colours
    c = rng.uniform(lo, hi, 3)
    c[rng.integers(3)] *= rng.uniform(0.3, 0.7)
    return tuple(float(v) for v in c)


def _contrasting(rng: np.random.Generator, base) -> tuple[float, float, float]:
    """A colour clearly apart from ``base``: 0.45 brighter or darker (away from the nearer end),
    with a random tint, so every pattern is salient."""
    c = np.asarray(base)
    step = -0.45 if c.mean() > 0.5 else 0.45
    return tuple(float(v) for v in np.clip(c + step + rng.uniform(-0.2, 0.2, 3), 0.0, 1.0))


def sample_fine_attributes(seed: int) -> FineAttributes:
    """The fine attributes of identity ``seed`` (own random stream, deterministic per seed)."""
    if seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed}")
    base = sample_identity(seed)  # the coarse attributes: the inks contrast with them
    rng = np.random.default_rng([int(seed), 0xF17E])
    return FineAttributes(
        bg_pattern=int(rng.integers(len(BACKGROUND_PATTERNS))),
        bg_ink=_contrasting(rng, base.bg_a),
        bg_angle=float(rng.choice([0.0, 0.25, 0.5, 0.75]) * math.pi + rng.uniform(-0.15, 0.15)),
        bg_period=float(rng.uniform(7.0, 12.0)),
        bg_phase=(float(rng.uniform(0, 1)), float(rng.uniform(0, 1))),
        shirt_pattern=int(rng.integers(len(SHIRT_PATTERNS))),
        shirt_b=_contrasting(rng, base.shirt), shirt_period=float(rng.uniform(5.0, 8.0)),
        shirt_phase=float(rng.uniform(0, 1)), accessory=int(rng.integers(len(ACCESSORIES))),
        accessory_colour=_random_colour(rng, 0.05, 0.9))


def sample_part_attributes(seed: int) -> tuple[PartAttributes, tuple, tuple]:
    """(part attributes, iris colour, lip colour) of identity ``seed`` in the ``"parts"`` world
    (own random stream, deterministic per seed)."""
    if seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed}")
    rng = np.random.default_rng([int(seed), 0x9A27])
    iris = _colour(rng, _PART_IRISES[rng.integers(len(_PART_IRISES))], 0.05)
    lips = _colour(rng, _PART_LIPS[rng.integers(len(_PART_LIPS))], 0.05)
    parts = PartAttributes(
        iris_size=float(rng.uniform(0.55, 0.85)), lip_width=float(rng.uniform(0.5, 3.0)),
        lip_thickness=float(rng.uniform(0.6, 2.8)),
        brow=_colour(rng, _PART_BROWS[rng.integers(len(_PART_BROWS))], 0.05),
        brow_length=float(rng.uniform(0.17, 0.34)), brow_slant=float(rng.uniform(-2.0, 2.5)),
        brow_thickness=float(rng.uniform(0.7, 1.9)))
    return parts, iris, lips


def part_geometry(ident: FaceIdentity) -> PartAttributes:
    """The part attributes the renderer draws ``ident`` with (the fixed plain-world values
    outside the ``"parts"`` world)."""
    if ident.parts is not None:
        return ident.parts
    return PartAttributes(iris_size=0.45, lip_width=1.2, lip_thickness=1.2,
                          brow=tuple(0.7 * ch for ch in ident.hair), brow_length=0.25,
                          brow_slant=1.0, brow_thickness=1.0)


def sample_identity(seed: int, world: str = "plain") -> FaceIdentity:
    """The identity drawn by ``seed`` (any int >= 0) in ``world`` (``WORLDS``); the same seed
    always gives the same face, and the same coarse attributes in both worlds."""
    if seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed}")
    if world not in WORLDS:
        raise ValueError(f"world: expected one of {WORLDS}, got {world!r}")
    rng = np.random.default_rng([int(seed), 0xFACE])
    skin = _colour(rng, _SKINS[rng.integers(len(_SKINS))], 0.04)
    hair = _colour(rng, _HAIRS[rng.integers(len(_HAIRS))], 0.05)
    lips = _colour(rng, (0.80, 0.38, 0.40), 0.07)
    ident = FaceIdentity(
        seed=int(seed), skin=skin, hair=hair, shirt=_random_colour(rng, 0.15, 0.85),
        iris=_colour(rng, _IRISES[rng.integers(len(_IRISES))], 0.05), lips=lips,
        bg_a=_random_colour(rng, 0.25, 0.9), bg_b=_random_colour(rng, 0.1, 0.7),
        texture=int(rng.integers(len(TEXTURES))), tex_freq=float(rng.uniform(1.5, 4.0)),
        tex_phase=float(rng.uniform(0, 2 * math.pi)),
        face_rx=float(rng.uniform(12.5, 16.0)), face_ry=float(rng.uniform(16.0, 19.5)),
        hair_volume=float(rng.uniform(1.08, 1.3)), hairline=float(rng.uniform(0.3, 0.6)),
        long_hair=bool(rng.random() < 0.45),
        fine=sample_fine_attributes(seed) if world == "fine" else None)
    if world == "parts":
        parts, iris, part_lips = sample_part_attributes(seed)
        ident = replace(ident, iris=iris, lips=part_lips, parts=parts)
    return ident


def coarse(ident: FaceIdentity) -> FaceIdentity:
    """What the global condition sees of a fine-world identity: the same identity drawn with a
    flat background in its pattern's ground colour, a plain shirt and no accessory (unchanged in
    the plain world)."""
    return ident if ident.fine is None else replace(ident, fine=None, texture=FLAT_BACKGROUND)


def _smooth_noise(rng: np.random.Generator, n: int, periods: tuple[float, float],
                  k: int = 3) -> np.ndarray:
    """Sum of ``k`` sinusoids with random periods (frames) and phases, scaled to about [-1, 1]."""
    t = np.arange(n, dtype=np.float64)
    out = np.zeros(n)
    for i in range(k):
        period = rng.uniform(*periods)
        out += rng.uniform(0.5, 1.0) / (i + 1) * np.sin(2 * np.pi * t / period
                                                       + rng.uniform(0, 2 * np.pi))
    return out / sum(1.0 / (i + 1) for i in range(k))


def _bumps(rng: np.random.Generator, n: int, gap: tuple[int, int], shape) -> np.ndarray:
    """Zero except for copies of ``shape`` placed at random gaps (blinks, brow raises)."""
    out = np.zeros(n)
    t = int(rng.integers(0, gap[1]))
    while t < n:
        seg = np.asarray(shape)[: n - t]
        out[t: t + len(seg)] = np.maximum(out[t: t + len(seg)], seg)
        t += int(rng.integers(*gap))
    return out


def sample_motion(seed: int, frames: int) -> torch.Tensor:
    """Smooth pose and expression trajectories, ``[frames, 8]`` float32 (``PARAM_NAMES``).

    Head motion and smiles are slow sums of sinusoids; blinks are 3-frame dips at random gaps
    (sometimes a wink); speech opens the mouth quickly with pauses; brows rise now and then.
    """
    if frames < 1:
        raise ValueError(f"frames: expected >= 1, got {frames}")
    rng = np.random.default_rng([int(seed), 0x0B0E])
    n = int(frames)
    p = np.zeros((n, N_PARAMS))
    p[:, 0] = np.clip(1.2 * _smooth_noise(rng, n, (24, 90)), -1, 1)
    p[:, 1] = np.clip(1.1 * _smooth_noise(rng, n, (20, 80)), -1, 1)
    p[:, 2] = np.clip(1.1 * _smooth_noise(rng, n, (30, 100)), -1, 1)
    base_open = rng.uniform(0.65, 1.0)
    blinks = _bumps(rng, n, (8, 30), (0.6, 1.0, 0.6))
    wink = rng.random() < 0.3
    p[:, 3] = np.clip(base_open + 0.15 * _smooth_noise(rng, n, (30, 80)) - blinks, 0, 1)
    p[:, 4] = p[:, 3] if not wink else np.clip(base_open - 0.8 * _bumps(rng, n, (10, 30),
                                                                        (0.5, 1.0, 1.0, 0.5)), 0, 1)
    speech = 0.5 + 0.7 * _smooth_noise(rng, n, (3, 9))
    pauses = (_smooth_noise(rng, n, (16, 40), k=1) > rng.uniform(-0.6, 0.3)).astype(np.float64)
    p[:, 5] = np.clip(speech * pauses, 0, 1)
    p[:, 6] = np.clip(0.3 + 0.9 * _smooth_noise(rng, n, (24, 80), k=2), -1, 1)
    p[:, 7] = np.clip(rng.uniform(0.0, 0.4) + _bumps(rng, n, (10, 40), (0.4, 0.8, 0.8, 0.4)), 0, 1)
    return torch.from_numpy(p).float()


# ----------------------------------------------------------------------------------------------
# rasteriser

def _cov(sdf: torch.Tensor) -> torch.Tensor:
    """Coverage of a pixel by a shape from its signed distance in px (anti-aliased edge)."""
    return (0.5 - sdf).clamp(0.0, 1.0)


def _ellipse(u: torch.Tensor, v: torch.Tensor, rx, ry) -> torch.Tensor:
    """Signed distance (px, first-order estimate f / |grad f|) to an axis-aligned ellipse at
    (0, 0); accurate near the edge even for very thin ellipses (a closed eye or mouth)."""
    rx = torch.as_tensor(rx, dtype=u.dtype).clamp_min(0.05)
    ry = torch.as_tensor(ry, dtype=u.dtype).clamp_min(0.05)
    r = torch.sqrt((u / rx) ** 2 + (v / ry) ** 2 + 1e-12)
    grad = torch.sqrt((u / rx ** 2) ** 2 + (v / ry ** 2) ** 2 + 1e-12) / r
    return (r - 1.0) / grad.clamp_min(1e-6)


def _segment(u, v, ax, ay, bx, by, radius) -> torch.Tensor:
    """Signed distance (px) to a capsule from (ax, ay) to (bx, by)."""
    pu, pv, du, dv = u - ax, v - ay, bx - ax, by - ay
    h = ((pu * du + pv * dv) / (du * du + dv * dv + 1e-9)).clamp(0.0, 1.0)
    return torch.sqrt((pu - h * du) ** 2 + (pv - h * dv) ** 2 + 1e-12) - radius


def _paint(img: torch.Tensor, alpha: torch.Tensor, colour) -> torch.Tensor:
    """``colour``: RGB or per-pixel [T, 3, H, W]."""
    c = torch.as_tensor(colour, dtype=img.dtype)
    c = c.view(1, 3, 1, 1) if c.ndim == 1 else c
    a = alpha.unsqueeze(1)
    return img * (1 - a) + c * a


def _pattern(kind: str, xs: torch.Tensor, ys: torch.Tensor, angle: float, period: float,
             phase: tuple[float, float]) -> torch.Tensor:
    """A two-colour pattern's mixing weight in [0, 1] at pixel coordinates ``xs, ys`` (px)."""
    a = (math.cos(angle) * xs + math.sin(angle) * ys) / period + phase[0]
    b = (-math.sin(angle) * xs + math.cos(angle) * ys) / period + phase[1]
    if kind in ("stripes", "stripes_h", "stripes_v"):
        w = torch.sin(2 * math.pi * a)
    elif kind == "checker":
        w = 2 * torch.sin(2 * math.pi * a) * torch.sin(2 * math.pi * b)
    elif kind == "dots":  # discs of radius period / 4 on a square lattice
        da, db = a - torch.round(a), b - torch.round(b)
        return _cov((torch.sqrt(da ** 2 + db ** 2 + 1e-12) - 0.25) * period)
    else:
        raise ValueError(f"pattern: unknown kind {kind!r}")
    return torch.sigmoid(4.0 * w)


def _mix(a, b, t: torch.Tensor) -> torch.Tensor:
    """[..., H, W] weights -> [..., 3, H, W] colours a * (1 - t) + b * t."""
    ca = torch.tensor(a, dtype=t.dtype).view(3, 1, 1)
    cb = torch.tensor(b, dtype=t.dtype).view(3, 1, 1)
    return ca * (1 - t.unsqueeze(-3)) + cb * t.unsqueeze(-3)


def _background(ident: FaceIdentity, n: int) -> torch.Tensor:
    fine = ident.fine
    if fine is not None:
        px = torch.arange(SIZE, dtype=torch.float32) + 0.5
        t = _pattern(BACKGROUND_PATTERNS[fine.bg_pattern], px.view(1, SIZE), px.view(SIZE, 1),
                     fine.bg_angle, fine.bg_period, fine.bg_phase)
        return _mix(ident.bg_a, fine.bg_ink, t).expand(n, 3, SIZE, SIZE).clone()
    if ident.texture == FLAT_BACKGROUND:
        return torch.tensor(ident.bg_a).view(1, 3, 1, 1).expand(n, 3, SIZE, SIZE).clone()
    ys, xs = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    f, ph = ident.tex_freq, ident.tex_phase
    kind = TEXTURES[ident.texture]
    if kind == "stripes_h":
        w = torch.sin(2 * math.pi * f * ys + ph)
    elif kind == "stripes_v":
        w = torch.sin(2 * math.pi * f * xs + ph)
    elif kind == "stripes_diag":
        w = torch.sin(2 * math.pi * f * (xs + ys) / math.sqrt(2) + ph)
    elif kind == "checker":
        w = torch.sin(2 * math.pi * f * xs + ph) * torch.sin(2 * math.pi * f * ys + ph) * 2
    elif kind == "rings":
        w = torch.sin(2 * math.pi * f * torch.sqrt(xs ** 2 + ys ** 2) + ph)
    else:  # gradient
        w = 2 * ys - 1
    t = torch.sigmoid(3.0 * w)
    a = torch.tensor(ident.bg_a).view(3, 1, 1)
    b = torch.tensor(ident.bg_b).view(3, 1, 1)
    return (a * (1 - t) + b * t).unsqueeze(0).expand(n, 3, SIZE, SIZE).clone()


def _shirt_colour(ident: FaceIdentity, x: torch.Tensor, y: torch.Tensor,
                  shift: torch.Tensor) -> torch.Tensor | tuple[float, float, float]:
    """The shirt's colour: plain, or [T, 3, H, W] with the pattern moving with the torso."""
    fine = ident.fine
    if fine is None:
        return ident.shirt
    kind = SHIRT_PATTERNS[fine.shirt_pattern]
    angle = math.pi / 2 if kind == "stripes_h" else 0.0
    t = _pattern(kind, x - shift, y, angle, fine.shirt_period, (fine.shirt_phase, 0.25))
    return _mix(ident.shirt, fine.shirt_b, t)


def _pose(params: torch.Tensor):
    """(cx, cy, cos, sin) of the face centre and roll, each [T, 1, 1]."""
    cx = 32.0 + 6.0 * params[:, 0]
    cy = 30.0 + 4.0 * params[:, 1]
    ang = 0.25 * params[:, 2]
    view = (-1, 1, 1)
    return cx.view(view), cy.view(view), torch.cos(ang).view(view), torch.sin(ang).view(view)


def _feature_layout(rx, ry, params: torch.Tensor) -> dict[str, torch.Tensor]:
    """Face-local positions and sizes of the features (px), each [T, 1, 1] or scalar."""
    view = (-1, 1, 1)
    eye_open = params[:, 3:5]
    mouth, smile, brow = (params[:, i].view(view) for i in (5, 6, 7))
    return dict(
        eye_dx=0.40 * rx, eye_y=-0.12 * ry, eye_rx=0.21 * rx,
        eye_ry_l=(0.05 + 0.15 * eye_open[:, 0]).view(view) * ry,
        eye_ry_r=(0.05 + 0.15 * eye_open[:, 1]).view(view) * ry,
        brow_y=-0.12 * ry - (0.24 + 0.12 * brow) * ry,
        mouth_y=0.52 * ry, mouth_rx=(0.30 + 0.07 * smile) * rx,
        mouth_ry=0.03 * ry + 0.17 * ry * mouth, smile=smile)


def brow_sdf(u: torch.Tensor, v: torch.Tensor, side: float, rx: float, lay: dict,
             geo: PartAttributes) -> torch.Tensor:
    """Signed distance (px) to the brow on ``side`` (-1 left, +1 right) in face-local (u, v)."""
    bu = side * (u - side * lay["eye_dx"])
    half = geo.brow_length * rx
    return _segment(bu, v, -half, lay["brow_y"] + geo.brow_slant, half, lay["brow_y"],
                    geo.brow_thickness)


def render(ident: FaceIdentity, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``[T, 3, 64, 64]`` in [0, 1] and expressive masks ``[T, 1, 64, 64]`` in {0, 1}.

    ``params``: ``[T, 8]`` (``PARAM_NAMES``), float32 or float64. The frames are differentiable
    in ``params``. The mask covers the eyes, brows and mouth with a 2 px margin.
    """
    img, mask, _ = _draw(ident, params)
    return img, mask


def _check_params(params: torch.Tensor) -> torch.Tensor:
    if params.ndim != 2 or params.shape[1] != N_PARAMS:
        raise ValueError(f"params: expected shape [T, {N_PARAMS}], got {tuple(params.shape)}")
    return params.float() if params.dtype not in (torch.float32, torch.float64) else params


def _draw(ident: FaceIdentity, params: torch.Tensor):
    """(frames, expressive masks, coverage layers [T, H, W]: ``torso``, ``face_hair`` (hair,
    ears, face), ``head`` (face_hair, neck and accessory), ``accessory``)."""
    params = _check_params(params)
    n = params.shape[0]
    img = _background(ident, n).to(params.dtype)
    grid = torch.arange(SIZE, dtype=params.dtype) + 0.5
    x, y = grid.view(1, 1, SIZE), grid.view(1, SIZE, 1)
    cx, cy, c, s = _pose(params)
    u = c * (x - cx) + s * (y - cy)  # face-local coordinates (rotated with the head)
    v = -s * (x - cx) + c * (y - cy)
    rx, ry = ident.face_rx, ident.face_ry
    lay = _feature_layout(rx, ry, params)
    geo = part_geometry(ident)
    skin = torch.tensor(ident.skin)
    shade = tuple((skin * 0.82).tolist())

    # torso and neck follow the head partly
    torso_dx = 0.3 * (cx - 32)
    torso = _cov(_ellipse(x - (32 + torso_dx), y - 70.0, 26.0, 18.0))
    img = _paint(img, torso, _shirt_colour(ident, x, y, torso_dx))
    neck = _cov(_segment(x, y, 32 + 0.6 * (cx - 32), cy + 0.6 * ry, 32.0, 56.0, 5.0))
    img = _paint(img, neck, shade)
    hv = ident.hair_volume
    hair_back = _ellipse(u, v + 0.12 * ry, rx * hv, ry * hv)
    if ident.long_hair:
        hair_back = torch.minimum(hair_back, _segment(u, v, 0.0, 0.0, 0.0, 1.1 * ry, rx * hv))
    img = _paint(img, _cov(hair_back), ident.hair)
    ears = _ellipse(u.abs() - rx, v, 2.5, 4.0)
    img = _paint(img, _cov(ears), shade)
    accessory = ACCESSORIES[ident.fine.accessory] if ident.fine is not None else None
    acc_cov = torch.zeros_like(torso)
    if accessory == "earrings":  # a ring hanging below each ear lobe
        ring = (_ellipse(u.abs() - rx, v - 6.0, 2.4, 2.4).abs() - 0.8)
        acc_cov = _cov(ring)
        img = _paint(img, acc_cov, ident.fine.accessory_colour)
    face = _ellipse(u, v, rx, ry)
    img = _paint(img, _cov(face), ident.skin)
    fringe = torch.maximum(hair_back, v + ident.hairline * ry - 0.15 * u)
    img = _paint(img, _cov(fringe), ident.hair)
    face_hair = _cov(torch.minimum(torch.minimum(hair_back, ears), face))

    masks = []
    for side, key in ((-1.0, "eye_ry_l"), (1.0, "eye_ry_r")):
        eu, ev = u - side * lay["eye_dx"], v - lay["eye_y"]
        erx, ery = lay["eye_rx"], lay[key]
        img = _paint(img, _cov(_ellipse(eu, ev, erx + 0.8, ery + 0.8)), LINER)
        sclera = _cov(_ellipse(eu, ev, erx, ery))
        img = _paint(img, sclera, SCLERA)
        iris = geo.iris_size * erx
        img = _paint(img, torch.minimum(sclera, _cov(_ellipse(eu, ev, iris, iris))), ident.iris)
        brow = brow_sdf(u, v, side, rx, lay, geo)
        img = _paint(img, _cov(brow), geo.brow)
        masks += [_ellipse(eu, ev, erx + 2.0, 0.2 * ry + 2.0), brow - 2.0]
    img = _paint(img, _cov(_ellipse(u, v - 0.2 * ry, 1.6, 2.8)), shade)  # nose
    if accessory == "glasses":  # round rims around both eyes and a bridge
        rim = lay["eye_rx"] + 2.5
        rims = [(_ellipse(u - side * lay["eye_dx"], v - lay["eye_y"], rim, rim)).abs() - 0.8
                for side in (-1.0, 1.0)]
        bridge = _segment(u, v, -lay["eye_dx"] + rim, lay["eye_y"], lay["eye_dx"] - rim,
                          lay["eye_y"], 0.8)
        acc_cov = _cov(torch.minimum(torch.minimum(*rims), bridge))
        img = _paint(img, acc_cov, ident.fine.accessory_colour)

    mu = u
    mv = v - lay["mouth_y"] + lay["smile"] * 0.12 * ry * (mu / lay["mouth_rx"]).pow(2)
    img = _paint(img, _cov(_ellipse(mu, mv, lay["mouth_rx"] + geo.lip_width,
                                    lay["mouth_ry"] + geo.lip_thickness)), ident.lips)
    inside = _cov(_ellipse(mu, mv, lay["mouth_rx"], lay["mouth_ry"] - 0.5))
    img = _paint(img, inside * (lay["mouth_ry"] > 0.6).to(img.dtype), MOUTH_INSIDE)
    masks.append(_ellipse(mu, mv, lay["mouth_rx"] + 3.0, 0.2 * ry + 3.0))
    mask = (torch.stack(masks).amin(0) < 0).to(params.dtype).unsqueeze(1)
    if accessory == "hat":  # a crown over the top of the hair and a brim above the brows
        top = -0.55 * ry
        crown = torch.maximum(_ellipse(u, v + 0.12 * ry, rx * hv + 1.0, ry * hv + 1.0), v - top)
        brim = _segment(u, v, -1.2 * rx * hv, top, 1.2 * rx * hv, top, 1.5)
        acc_cov = _cov(torch.minimum(crown, brim))
        img = _paint(img, acc_cov, ident.fine.accessory_colour)
    head = torch.maximum(torch.maximum(face_hair, neck), acc_cov)
    layers = dict(torso=torso, face_hair=face_hair, head=head, accessory=acc_cov)
    return img.clamp(0.0, 1.0), mask, layers


# ----------------------------------------------------------------------------------------------
# controls, identity embedding, videos

_CANON_RX, _CANON_RY = 14.0, 18.0


def landmarks(params: torch.Tensor) -> torch.Tensor:
    """Per-frame control vectors ``[T, 40]``: 20 (x, y) points of the canonical face in [-1, 1].

    Order: face centre, top, chin, left, right; per eye (left, right) centre, top, bottom; per
    brow inner and outer end; nose tip; mouth left and right corner, top, bottom.
    """
    if params.ndim != 2 or params.shape[1] != N_PARAMS:
        raise ValueError(f"params: expected shape [T, {N_PARAMS}], got {tuple(params.shape)}")
    params = params.float()
    rx, ry = _CANON_RX, _CANON_RY
    lay = {k: (val.view(-1) if torch.is_tensor(val) else torch.full((params.shape[0],), val))
           for k, val in _feature_layout(rx, ry, params).items()}
    zero = torch.zeros(params.shape[0])
    pts = [(zero, zero), (zero, zero - ry), (zero, zero + ry), (zero - rx, zero), (zero + rx, zero)]
    for side, key in ((-1.0, "eye_ry_l"), (1.0, "eye_ry_r")):
        ex, ey = side * lay["eye_dx"], lay["eye_y"]
        pts += [(ex, ey), (ex, ey - lay[key]), (ex, ey + lay[key])]
    for side in (-1.0, 1.0):
        pts += [(side * lay["eye_dx"] - side * 0.25 * rx, lay["brow_y"] + 1.0),
                (side * lay["eye_dx"] + side * 0.25 * rx, lay["brow_y"])]
    pts.append((zero, zero + 0.2 * ry + 2.8))
    corner_y = lay["mouth_y"] - lay["smile"] * 0.12 * ry
    pts += [(-lay["mouth_rx"], corner_y), (lay["mouth_rx"], corner_y),
            (zero, lay["mouth_y"] - lay["mouth_ry"]), (zero, lay["mouth_y"] + lay["mouth_ry"])]
    pu = torch.stack([p[0] for p in pts], 1)  # [T, 20]
    pv = torch.stack([p[1] for p in pts], 1)
    cx, cy, c, s = (t.view(-1, 1) for t in _pose(params))
    px = cx + c * pu - s * pv  # inverse of the rotation used in render
    py = cy + s * pu + c * pv
    return (torch.stack([px, py], -1).reshape(params.shape[0], CONTROL_DIM) - 32.0) / 32.0


def identity_embedding(source: torch.Tensor, grid: int = IDENTITY_GRID) -> torch.Tensor:
    """Global identity vector ``[..., 3 * grid * grid]`` of source frames ``[..., 3, 64, 64]``
    in [0, 1].

    The source image area-averaged to ``grid x grid`` and mapped to [-1, 1]: a fixed, weight-free
    stand-in for the paper's CLIP image embedding (no pretrained weights ship with the project).
    Like CLIP's, a coarse grid gives the palette and layout but not the details (texture, hair
    style, face shape, iris colour), which the model must then keep consistent across frames.
    """
    if source.shape[-3:] != (3, SIZE, SIZE):
        raise ValueError(f"source: expected shape [..., 3, {SIZE}, {SIZE}], "
                         f"got {tuple(source.shape)}")
    lead = source.shape[:-3]
    if SIZE % grid:
        raise ValueError(f"grid: expected a divisor of {SIZE}, got {grid}")
    small = F.adaptive_avg_pool2d(source.reshape(-1, 3, SIZE, SIZE).float(), grid)
    return (small * 2 - 1).reshape(*lead, 3 * grid * grid)


def global_condition(ident: FaceIdentity, params: torch.Tensor,
                     grid: int = IDENTITY_GRID) -> torch.Tensor:
    """The global condition G ``[T, 3 * grid * grid]`` of ``ident`` posed by ``params`` [T, 8]:
    :func:`identity_embedding` of the :func:`coarse` rendering, so in the fine world it carries
    palette, coarse layout, face and hair colours but none of the fine attributes (in the plain
    world it equals ``identity_embedding(render(ident, params)[0])``)."""
    return identity_embedding(render(coarse(ident), params)[0], grid)


def _dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    return F.max_pool2d(mask.float(), 2 * px + 1, stride=1, padding=px) if px else mask.float()


def region_masks(ident: FaceIdentity, params: torch.Tensor,
                 margin: int = 1) -> dict[str, torch.Tensor]:
    """Region masks of the clip ``render(ident, params)``, bool:

    - ``face_hair`` [T, 1, 64, 64]: face, ears and hair of every frame (coverage >= 0.5) minus
      the accessory: what G and the controls determine (the PSNR target region);
    - ``background`` [1, 64, 64]: pixels that neither the head (hair, face, neck, accessory) nor
      the torso touch in any frame of the clip, ``margin`` px away from them;
    - ``shirt`` [1, 64, 64]: pixels fully inside the torso in every frame and ``margin`` px away
      from anything the head touches in any frame.

    ``background`` and ``shirt`` are the same pixels in every frame: a pose-invariant readout of
    the appearance there needs no alignment.
    """
    _, _, layers = _draw(ident, params)
    face_hair = (layers["face_hair"] >= 0.5) & (layers["accessory"] < 0.5)
    head_ever = _dilate((layers["head"] > 0).any(0, keepdim=True)[None], margin)[0] > 0
    torso_ever = _dilate((layers["torso"] > 0).any(0, keepdim=True)[None], margin)[0] > 0
    torso_always = (layers["torso"] >= 1).all(0, keepdim=True)
    shirt = -_dilate(-torso_always[None].float(), margin)[0] > 0  # eroded by margin
    return dict(face_hair=face_hair.unsqueeze(1), background=~(head_ever | torso_ever),
                shirt=shirt & ~head_ever)


def make_video(identity_seed: int, motion_seed: int, frames: int,
               world: str = "plain") -> dict[str, torch.Tensor]:
    """A whole clip: ``frames`` [N, 3, 64, 64] in [0, 1], ``masks`` [N, 1, 64, 64], ``params``
    [N, 8], ``controls`` [N, 40] (see ``landmarks``)."""
    params = sample_motion(motion_seed, frames)
    video, masks = render(sample_identity(identity_seed, world), params)
    return dict(frames=video, masks=masks, params=params, controls=landmarks(params))


class ProceduralFaces(torch.utils.data.IterableDataset):
    """Endless training sequences from procedural faces, rendered on the fly.

    Each item is one identity (seed < ``identities`` <= ``HELD_OUT_SEED_BASE``) and one motion
    clip of ``video_frames`` frames; ``frames`` non-uniformly spaced indices and the source frame
    furthest in time from them are drawn with ``avatar_models.data.nonuniform_indices`` (paper,
    section 3.1) and rendered. Items are dicts in the layout ``train_anchored`` takes:
    ``frames`` [T, 3, 64, 64] in [-1, 1], ``control`` [T, 40] (``landmarks``), ``global``
    [3 * identity_grid ** 2] (``identity_embedding`` of the source frame), ``mask``
    [T, 1, 64, 64] (expressive regions).
    ``world`` (``WORLDS``) picks the identities; G is :func:`global_condition` of the source
    frame (in the plain world: ``identity_embedding`` of the source frame itself).
    With an ``autoencoder`` (e.g. :class:`avatar_models.data.patch_pca.PatchPCA`), ``frames``
    holds its latents ``autoencoder.encode(frames)`` instead of pixels.
    """

    def __init__(self, frames: int = 4, video_frames: int = 48, seed: int = 0,
                 identities: int = HELD_OUT_SEED_BASE, autoencoder=None,
                 identity_grid: int = IDENTITY_GRID, world: str = "plain"):
        super().__init__()
        if world not in WORLDS:
            raise ValueError(f"world: expected one of {WORLDS}, got {world!r}")
        self.autoencoder, self.identity_grid, self.world = autoencoder, identity_grid, world
        if not 1 <= frames < video_frames:
            raise ValueError(f"frames: expected 1 <= frames < video_frames ({video_frames}), "
                             f"got {frames}")
        if not 1 <= identities <= HELD_OUT_SEED_BASE:
            raise ValueError(f"identities: expected 1..{HELD_OUT_SEED_BASE}, got {identities}")
        self.frames, self.video_frames, self.seed = frames, video_frames, seed
        self.identities = identities

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.sample(gen)

    def sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        from avatar_models.data.samplers import nonuniform_indices

        seeds = torch.randint(0, 2 ** 31 - 1, (2,), generator=gen).tolist()
        ident = sample_identity(seeds[0] % self.identities, self.world)
        params = sample_motion(seeds[1], self.video_frames)
        idx, src = nonuniform_indices(self.video_frames, self.frames, gen)
        frames, masks = render(ident, params[idx])
        clip = frames * 2 - 1
        if self.autoencoder is not None:
            clip = self.autoencoder.encode(clip)
        g = global_condition(ident, params[src][None], self.identity_grid)[0]
        return {"frames": clip, "control": landmarks(params[idx]), "global": g, "mask": masks}


def training_dataset(frames: int = 4, video_frames: int = 48, seed: int = 0,
                     autoencoder: str | None = None,
                     identity_grid: int = IDENTITY_GRID, world: str = "plain"
                     ) -> ProceduralFaces:
    """Factory for ``avatar-kernels train anchored --dataset
    avatar_models.data.procedural_faces:training_dataset --dataset-arg frames=4
    [--dataset-arg autoencoder=PATH]`` (PATH: a :class:`~avatar_models.data.patch_pca.PatchPCA`
    safetensors file; latents instead of pixels)."""
    ae = None
    if autoencoder is not None:
        from avatar_models.data.patch_pca import PatchPCA

        ae = PatchPCA.load(autoencoder)
    return ProceduralFaces(frames=frames, video_frames=video_frames, seed=seed, autoencoder=ae,
                           identity_grid=identity_grid, world=world)


def autoencoder_fit_frames(count: int = 1024, seed: int = 0,
                           world: str = "plain") -> torch.Tensor:
    """``count`` training frames [count, 3, 64, 64] in [-1, 1] (16 per identity, identities
    below ``HELD_OUT_SEED_BASE``) to fit a patch-PCA autoencoder on, deterministic per seed."""
    clips = []
    for i in range((count + 15) // 16):
        ident = sample_identity((seed * 7919 + i) % HELD_OUT_SEED_BASE, world)
        clips.append(render(ident, sample_motion(seed * 104729 + i + 1, 16))[0])
    return torch.cat(clips)[:count] * 2 - 1
