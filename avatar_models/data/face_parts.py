"""Per-part labels, part crops and a prompt-driven motion program for the procedural faces
(LaVieID's toy world).

Part labels come from the renderer's own shapes, composited in its painting order, so a pixel's
label fractions are the coverages that produced its colour: ``[T, M, 64, 64]`` soft fractions
over PARTS = (brows, eyes, mouth, nose, skin, hair); the rest of the pixel (background, torso,
neck, ears) is unlabelled. The shapes are rebuilt with :mod:`procedural_faces`' geometry helpers
(``_pose``, ``_feature_layout``, ``_ellipse``, ``_segment``, ``_cov``), so a change of the
renderer's geometry must be mirrored here; ``tests/models/test_lavieid_model.py`` checks the
labels against the rendered colours.

The toy's identities come from the ``"parts"`` world of :mod:`procedural_faces` (iris, lip and
brow attributes per identity on top of the plain world's colours and shapes), and the frames can
be zoomed in on the face (``window``: the side of the square around the face centre that is
resampled to the model's size), so the parts cover more tokens.

Prompts: a small vocabulary (:data:`VOCABULARY`) whose words map to a motion program the
renderer can draw (expression, blink, mouth, head shift and roll; the renderer has no yaw).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from avatar_models.data import procedural_faces as pf

PARTS = ("brows", "eyes", "mouth", "nose", "skin", "hair")

# slot -> word -> what it does (applied by motion_program)
VOCABULARY: dict[str, tuple[str, ...]] = {
    "expression": ("smiling", "neutral", "frowning"),
    "eyes": ("blinking", "staring"),
    "mouth": ("talking", "silent", "gaping"),
    "head": ("nodding", "swaying", "tilting", "still"),
}


def random_prompt(rng: np.random.Generator) -> str:
    words = [VOCABULARY[slot][rng.integers(len(VOCABULARY[slot]))] for slot in VOCABULARY]
    return "a person {}, {}, {} and {}".format(*words)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The vocabulary word of each slot found in ``prompt`` (first match; a missing slot takes
    the slot's neutral word: neutral, staring, silent, still)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.lower().replace(",", " ").split()
    neutral = {"expression": "neutral", "eyes": "staring", "mouth": "silent", "head": "still"}
    return {slot: next((w for w in words if w in choices), neutral[slot])
            for slot, choices in VOCABULARY.items()}


def motion_program(prompt: str, frames: int, seed: int = 0) -> torch.Tensor:
    """Pose and expression ``[frames, 8]`` (procedural_faces.PARAM_NAMES) drawn by ``prompt``;
    ``seed`` sets phases and the blink times."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    slots = parse_prompt(prompt)
    rng = np.random.default_rng([int(seed), 0x1A71E])
    t = np.arange(frames, dtype=np.float64)
    phase = rng.uniform(0, 2 * math.pi)
    wave = np.sin(2 * math.pi * t / max(frames, 4) + phase)        # one cycle per clip
    p = np.zeros((frames, pf.N_PARAMS))
    head = {"nodding": 1, "swaying": 0, "tilting": 2}.get(slots["head"])
    if head is not None:
        p[:, head] = 0.8 * wave
    p[:, 3] = 0.9
    if slots["eyes"] == "blinking":
        at = rng.integers(0, frames)
        p[max(0, at - 1):at + 2, 3] = 0.05
    p[:, 4] = p[:, 3]
    p[:, 5] = {"talking": 0.45 + 0.45 * np.sin(2 * math.pi * t / 3 + phase), "silent": 0.0 * t,
               "gaping": 0.85 + 0.0 * t}[slots["mouth"]]
    p[:, 6] = {"smiling": 0.9, "neutral": 0.2, "frowning": -0.8}[slots["expression"]]
    p[:, 7] = 0.3 if slots["expression"] != "frowning" else 0.0
    return torch.from_numpy(p).float()


def part_labels(ident: pf.FaceIdentity, params: torch.Tensor) -> torch.Tensor:
    """Soft per-pixel part fractions ``[T, M, 64, 64]`` (rows of PARTS) matching
    ``pf.render(ident, params)``: each shape is composited with its coverage in the render's
    order, so a later shape takes over the fraction it covers."""
    params = params.float()
    n = params.shape[0]
    grid = torch.arange(pf.SIZE, dtype=params.dtype) + 0.5
    x, y = grid.view(1, 1, pf.SIZE), grid.view(1, pf.SIZE, 1)
    cx, cy, c, s = pf._pose(params)
    u = c * (x - cx) + s * (y - cy)
    v = -s * (x - cx) + c * (y - cy)
    rx, ry = ident.face_rx, ident.face_ry
    lay = pf._feature_layout(rx, ry, params)
    geo = pf.part_geometry(ident)
    frac = torch.zeros(n, len(PARTS) + 1, pf.SIZE, pf.SIZE)        # last row: unlabelled
    frac[:, -1] = 1.0
    index = {name: i for i, name in enumerate(PARTS)}

    def paint(alpha: torch.Tensor, part: str | None) -> None:
        nonlocal frac
        a = alpha.expand(n, pf.SIZE, pf.SIZE).unsqueeze(1)
        onehot = torch.zeros(1, len(PARTS) + 1, 1, 1)
        onehot[0, index[part] if part is not None else -1] = 1.0
        frac = frac * (1 - a) + onehot * a

    paint(pf._cov(pf._ellipse(x - (32 + 0.3 * (cx - 32)), y - 70.0, 26.0, 18.0)), None)
    paint(pf._cov(pf._segment(x, y, 32 + 0.6 * (cx - 32), cy + 0.6 * ry, 32.0, 56.0, 5.0)), None)
    hv = ident.hair_volume
    hair_back = pf._ellipse(u, v + 0.12 * ry, rx * hv, ry * hv)
    if ident.long_hair:
        hair_back = torch.minimum(hair_back, pf._segment(u, v, 0.0, 0.0, 0.0, 1.1 * ry, rx * hv))
    paint(pf._cov(hair_back), "hair")
    paint(pf._cov(pf._ellipse(u.abs() - rx, v, 2.5, 4.0)), None)   # ears: unlabelled
    paint(pf._cov(pf._ellipse(u, v, rx, ry)), "skin")
    paint(pf._cov(torch.maximum(hair_back, v + ident.hairline * ry - 0.15 * u)), "hair")
    for side, key in ((-1.0, "eye_ry_l"), (1.0, "eye_ry_r")):
        eu, ev = u - side * lay["eye_dx"], v - lay["eye_y"]
        paint(pf._cov(pf._ellipse(eu, ev, lay["eye_rx"] + 0.8, lay[key] + 0.8)), "eyes")
        paint(pf._cov(pf.brow_sdf(u, v, side, rx, lay, geo)), "brows")
    paint(pf._cov(pf._ellipse(u, v - 0.2 * ry, 1.6, 2.8)), "nose")
    mv = v - lay["mouth_y"] + lay["smile"] * 0.12 * ry * (u / lay["mouth_rx"]).pow(2)
    paint(pf._cov(pf._ellipse(u, mv, lay["mouth_rx"] + geo.lip_width,
                              lay["mouth_ry"] + geo.lip_thickness)), "mouth")
    return frac[:, :-1]


# the window is centred on the neutral face centre (procedural_faces._pose: x 32, y 30)
WINDOW_CENTRE = (30, 32)


def window_view(images: torch.Tensor, window: int, size: int) -> torch.Tensor:
    """``images`` [..., C, 64, 64] -> the ``window x window`` square around the face centre,
    area-resampled to ``size x size`` ([..., C, size, size]); window 64 is the whole frame."""
    if not size <= window <= pf.SIZE or window % 2:
        raise ValueError(f"window: expected an even value in [size={size}, {pf.SIZE}], got "
                         f"{window}")
    y0 = min(max(WINDOW_CENTRE[0] - window // 2, 0), pf.SIZE - window)
    x0 = min(max(WINDOW_CENTRE[1] - window // 2, 0), pf.SIZE - window)
    lead = images.shape[:-3]
    crop = images[..., y0:y0 + window, x0:x0 + window].reshape(-1, *images.shape[-3:-2],
                                                               window, window)
    if window != size:
        crop = F.interpolate(crop, size=(size, size), mode="area")
    return crop.reshape(*lead, *crop.shape[-3:])


def label_view(labels: torch.Tensor, window: int, size: int) -> torch.Tensor:
    """Per-pixel part fractions [T, M, 64, 64] seen through :func:`window_view`, at the window's
    own resolution when it is a multiple of ``size`` (the route loss pools them to tokens), else
    area-resampled to ``size``."""
    return window_view(labels, window, window if window % size == 0 else size)


def part_crops(image: torch.Tensor, labels: torch.Tensor, size: int,
               margin: int = 2) -> torch.Tensor:
    """Square crops ``[M, 3, size, size]`` of ``image`` [3, 64, 64] around each part's pixels
    (fraction > 0.5, plus ``margin``); a part that is not visible gives a zero crop."""
    crops = []
    for m in range(labels.shape[0]):
        ys, xs = torch.nonzero(labels[m] > 0.5, as_tuple=True)
        if ys.numel() == 0:
            crops.append(torch.zeros(3, size, size))
            continue
        cy, cx = (ys.min() + ys.max()).item() / 2, (xs.min() + xs.max()).item() / 2
        half = max(ys.max() - ys.min(), xs.max() - xs.min()).item() / 2 + margin + 0.5
        y0 = int(max(0, math.floor(cy - half)))
        x0 = int(max(0, math.floor(cx - half)))
        y1 = int(min(pf.SIZE, math.ceil(cy + half) + 1))
        x1 = int(min(pf.SIZE, math.ceil(cx + half) + 1))
        patch = image[:, y0:y1, x0:x1][None]
        crops.append(F.interpolate(patch, size=(size, size), mode="bilinear",
                                   align_corners=False)[0])
    return torch.stack(crops)


class PartFaces(torch.utils.data.IterableDataset):
    """Endless toy text-to-video samples for LaVieID.

    Identities come from ``world`` (default ``"parts"``); frames and reference are seen through
    :func:`window_view` (``window`` px around the face centre, resampled to ``size``).

    Item: ``frames`` [F, 3, S, S] in [-1, 1] (the clip the prompt describes), ``reference``
    [3, S, S] (the same identity in a different static pose, :func:`reference_pose`),
    ``identity`` [48] (pf.identity_embedding of the whole 64 px reference), ``crops``
    [M, 3, c, c] (part crops of the 64 px reference, in [-1, 1]), ``labels`` [F, M, H', W']
    (:func:`part_labels` of the clip through :func:`label_view`; 64 px for the whole frame),
    ``prompt_seed`` (to rebuild the prompt: :func:`random_prompt` of that seed; -1 for items
    built by :meth:`item` from a prompt) and ``text`` [Lt, Ct] when ``text_encoder`` is given."""

    def __init__(self, frames: int = 5, size: int = 16, crop_size: int = 8, seed: int = 0,
                 identities: int | None = None, text_encoder=None, world: str = "parts",
                 window: int = pf.SIZE):
        super().__init__()
        if frames < 1 or pf.SIZE % size:
            raise ValueError(f"frames must be >= 1 and size divide {pf.SIZE}, got "
                             f"frames={frames}, size={size}")
        if world not in pf.WORLDS:
            raise ValueError(f"world: expected one of {pf.WORLDS}, got {world!r}")
        window_view(torch.zeros(1, 1, pf.SIZE, pf.SIZE), window, size)   # validates window
        self.frames, self.size, self.crop_size, self.seed = frames, size, crop_size, seed
        self.identities = identities or pf.HELD_OUT_SEED_BASE
        self.text_encoder, self.world, self.window = text_encoder, world, window

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.sample(gen)

    def sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        ident_seed, motion_seed, prompt_seed, pose_seed = torch.randint(
            0, 2 ** 31 - 1, (4,), generator=gen).tolist()
        prompt = random_prompt(np.random.default_rng(prompt_seed))
        return self.item(ident_seed % self.identities, prompt, motion_seed, pose_seed,
                         prompt_seed)

    def item(self, identity_seed: int, prompt: str, motion_seed: int, pose_seed: int,
             prompt_seed: int = -1) -> dict[str, torch.Tensor]:
        """The item of one identity, prompt, motion seed and reference-pose seed (any identity
        seed, e.g. a held-out one >= pf.HELD_OUT_SEED_BASE; see the class docstring)."""
        ident = pf.sample_identity(identity_seed, self.world)
        params = motion_program(prompt, self.frames, motion_seed)
        video, _ = pf.render(ident, params)                                   # [F, 3, 64, 64]
        ref_params = reference_pose(pose_seed)
        ref, _ = pf.render(ident, ref_params)                                 # [1, 3, 64, 64]
        item = {
            "frames": window_view(video, self.window, self.size) * 2 - 1,
            "reference": window_view(ref, self.window, self.size)[0] * 2 - 1,
            "identity": pf.identity_embedding(ref[0]),
            "crops": part_crops(ref[0], part_labels(ident, ref_params)[0], self.crop_size) * 2
            - 1,
            "labels": label_view(part_labels(ident, params), self.window, self.size),
            "prompt_seed": torch.tensor(prompt_seed),
        }
        if self.text_encoder is not None:
            item["text"] = self.text_encoder([prompt])[0]
        return item


def reference_pose(seed: int) -> torch.Tensor:
    """Pose and expression [1, 8] of a reference image: neutral expression, head shift and roll
    drawn uniformly by ``seed`` (so it differs from the target clip's pose)."""
    params = motion_program("a person neutral", 1, seed)
    params[:, :3] = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, 3)).float()
    return params


def canonical_part_labels(identities: int = 8, world: str = "parts") -> torch.Tensor:
    """Mean part fractions ``[M, 64, 64]`` of ``identities`` faces in the neutral, centred pose:
    where the parts usually are, for crops of a reference whose own labels are unknown."""
    neutral = motion_program("a person neutral", 1)
    return torch.stack([part_labels(pf.sample_identity(i, world), neutral)[0]
                        for i in range(identities)]).mean(0)


def part_colours(frames: torch.Tensor, labels: torch.Tensor,
                 min_pixels: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean colour of each part: frames [T, 3, S, S] and part fractions [T, M, S, S] (e.g.
    :func:`label_view` at the frames' size) -> (colours [T, M, 3], visible [T, M] bool: the part
    covers at least ``min_pixels`` pixels of area). Each pixel counts with its part fraction."""
    if frames.shape[0] != labels.shape[0] or frames.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"frames [T, 3, S, S] and labels [T, M, S, S] must agree, got "
                         f"{list(frames.shape)} and {list(labels.shape)}")
    w = labels.double()
    area = w.sum((-2, -1))                                                   # [T, M]
    colours = torch.einsum("tmhw,tchw->tmc", w, frames.double()) / area.clamp_min(1e-9)[..., None]
    return colours, area >= min_pixels
