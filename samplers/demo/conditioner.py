"""``sample anchored`` conditions for models trained on procedural faces (the demo checkpoint).

``procedural_conditioner(source, driving, *, global_dim, control_dim)`` (the conditioner the demo
checkpoint records) turns a source image and a driving video, uint8 files as any user has them,
into the conditions the demo model was trained with:

- G: the source image, centre-cropped to a square and area-resized to 64x64, averaged to a
  ``grid x grid`` thumbnail (:func:`procedural_faces.identity_embedding`). For the plain world
  this is exactly the training G; in the fine world training used the thumbnail of the *coarse*
  portrait (no patterns, no accessory), which a real image cannot give, so G here also carries the
  thumbnail's small share of the fine attributes;
- L_t: the 20 canonical landmarks (:func:`procedural_faces.landmarks`) of the pose and expression
  recovered from every driving frame by fitting the generator (:func:`samplers.demo.metrics.
  fit_params`) with a stand-in identity whose skin, hair, background and shirt colours are read
  off the first driving frame; the eye, brow and mouth colours that carry the expression are the
  same for every procedural identity, which is what makes the fit identity-agnostic enough.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from avatar_models.data import procedural_faces as pf


def to_toy_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, 64, 64] in [0, 1]: centre square, area resize."""
    h, w = frames.shape[-3:-1]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = frames[..., top:top + s, left:left + s, :].movedim(-1, -3).float() / 255
    lead = x.shape[:-3]
    x = F.interpolate(x.reshape(-1, 3, s, s), size=(pf.SIZE, pf.SIZE), mode="area")
    return x.reshape(*lead, 3, pf.SIZE, pf.SIZE)


def _median_colour(frame: torch.Tensor, x: int, y: int, r: int = 2) -> tuple[float, ...]:
    patch = frame[:, y - r:y + r + 1, x - r:x + r + 1].reshape(3, -1)
    return tuple(patch.median(1).values.tolist())


def stand_in_identity(frame: torch.Tensor) -> pf.FaceIdentity:
    """A plain-world identity with the colours of ``frame`` [3, 64, 64] in [0, 1] at places every
    procedural portrait shares: cheeks (skin), the top centre (hair), the top corners
    (background), the bottom corners (shirt)."""
    skin = tuple((a + b) / 2 for a, b in zip(_median_colour(frame, 24, 36),
                                             _median_colour(frame, 40, 36)))
    corner = _median_colour(frame, 3, 3)
    return dataclasses.replace(pf.sample_identity(0), skin=skin, hair=_median_colour(frame, 32, 9),
                               bg_a=corner, bg_b=corner, shirt=_median_colour(frame, 4, 61),
                               fine=None, texture=pf.FLAT_BACKGROUND)


def driving_params(driving: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Pose and expression [N, 8] of driving frames [N, 3, 64, 64] in [0, 1]."""
    from samplers.demo.metrics import fit_params

    return fit_params(stand_in_identity(driving[0]), driving, steps=steps)


def procedural_conditioner(source: torch.Tensor, driving: torch.Tensor, *, global_dim: int,
                           control_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G [global_dim], L_t [N, control_dim]) from uint8 ``source`` [H, W, 3] and ``driving``
    [N, H, W, 3] (see the module docstring)."""
    grid = round((global_dim / 3) ** 0.5)
    if 3 * grid * grid != global_dim or control_dim != pf.CONTROL_DIM:
        raise ValueError(f"global_dim, control_dim: expected 3 * grid ** 2 and "
                         f"{pf.CONTROL_DIM}, got {global_dim}, {control_dim}")
    g = pf.identity_embedding(to_toy_frames(source), grid)
    return g, pf.landmarks(driving_params(to_toy_frames(driving)))
