"""Named MediaPipe face-mesh regions and their rasterisation into masks (pure torch/numpy).

This module does not import mediapipe, so masks, loss weights and part labels can be built at
training time from cached landmarks. The index sets are the vertices of the face mesh's own
connection sets (``mediapipe.solutions.face_mesh_connections.FACEMESH_*``, mediapipe 0.10.21);
``tests/models/test_conditioning_landmarks.py`` checks them against mediapipe.

Landmark convention: float ``[..., 478, 3]`` with ``x`` and ``y`` normalised to ``[0, 1]`` by the
image width and height (origin at the top-left corner, y down) and ``z`` MediaPipe's relative depth
(same scale as ``x``). "left" and "right" are the subject's: the left eye is on the image's right
for a frontal face. Frames with no face are NaN rows; they give empty masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from avatar_models.conditioning._checks import as_tensor, check_dim, check_rank

NUM_LANDMARKS = 478  # 468 mesh points + 10 iris points (refine_landmarks=True)

#: vertex indices of each FACEMESH_* connection set (sorted)
PART_INDICES: dict[str, tuple[int, ...]] = {
    "left_eye": (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466),
    "right_eye": (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246),
    "left_eyebrow": (276, 282, 283, 285, 293, 295, 296, 300, 334, 336),
    "right_eyebrow": (46, 52, 53, 55, 63, 65, 66, 70, 105, 107),
    "lips": (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181,
             185, 191, 267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402,
             405, 409, 415),
    "nose": (1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294,
             326, 327, 344, 440),
    "face_oval": (10, 21, 54, 58, 67, 93, 103, 109, 127, 132, 136, 148, 149, 150, 152, 162, 172,
                  176, 234, 251, 284, 288, 297, 323, 332, 338, 356, 361, 365, 377, 378, 379, 389,
                  397, 400, 454),
    "left_iris": (474, 475, 476, 477),
    "right_iris": (469, 470, 471, 472),
}

#: region name -> the parts whose convex hulls are united into its mask
REGIONS: dict[str, tuple[str, ...]] = {
    "eyes": ("left_eye", "right_eye"),
    "eyebrows": ("left_eyebrow", "right_eyebrow"),
    "nose": ("nose",),
    "mouth": ("lips",),  # hull of the outer lip contour: lips plus the mouth opening
    "face": ("face_oval",),
    "irises": ("left_iris", "right_iris"),
    **{name: (name,) for name in PART_INDICES},
}

DEFAULT_REGIONS = ("face", "eyebrows", "eyes", "nose", "mouth")
#: Anchored Diffusion's expressive regions: landmarks around the mouth and eyes (sec. 4.1)
EXPRESSIVE_REGIONS = ("eyes", "mouth")
#: landmark indices of the Expressive-LMSE metric (eyes and lips points, sec. 4.2)
EXPRESSIVE_INDICES: tuple[int, ...] = tuple(sorted(
    set(PART_INDICES["left_eye"]) | set(PART_INDICES["right_eye"]) | set(PART_INDICES["lips"])))
#: label values of :func:`face_part_labels` (LaVieID-style parts; the mesh has no hair)
FACE_PARTS = ("background", "skin", "eyebrows", "eyes", "nose", "mouth")


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
    return int(hw[0]), int(hw[1])


def _check_landmarks(landmarks: object) -> torch.Tensor:
    x = as_tensor("landmarks", landmarks)
    check_rank("landmarks", x, range(2, 8), "[..., 478, 2 or 3]")
    if x.shape[-1] not in (2, 3):
        raise ValueError(f"landmarks must be [..., 478, 2 or 3], got shape {list(x.shape)}")
    check_dim("landmarks", x, -2, NUM_LANDMARKS, "[..., 478, 2 or 3]")
    if not x.is_floating_point():
        raise TypeError(f"landmarks must be floating point (normalised coordinates), got {x.dtype}")
    return x


def to_pixels(landmarks: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Normalised ``[..., N, 2|3]`` -> pixel ``(x, y)`` ``[..., N, 2]`` for an image of ``size``
    ``(H, W)``. Pixel ``(j, i)`` covers ``[j, j+1) x [i, i+1)``."""
    x = as_tensor("landmarks", landmarks)
    h, w = _size(size)
    return x[..., :2] * torch.tensor([w, h], dtype=x.dtype, device=x.device)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Monotone-chain hull, counter-clockwise in (x, y) value order; [K, 2] (K may be < 3)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[np.ndarray] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[np.ndarray] = []
    for p in pts[::-1]:
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _fill_hull(mask: np.ndarray, hull: np.ndarray) -> None:
    """Set the pixels of ``mask`` [H, W] whose centres lie in the convex polygon ``hull``."""
    if len(hull) < 3:
        return
    h, w = mask.shape
    x0, y0 = np.floor(hull.min(0)).astype(int)
    x1, y1 = np.ceil(hull.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1) + 0.5
    ys = np.arange(y0, y1) + 0.5
    px, py = xs[None, :], ys[:, None]
    inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):
        inside &= (b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0]) >= 0
    mask[y0:y1, x0:x1] |= inside


def region_masks(landmarks: torch.Tensor | np.ndarray, size: int | Sequence[int],
                 regions: Sequence[str] = DEFAULT_REGIONS, *, dilate: int = 0) -> torch.Tensor:
    """Rasterise face regions as boolean masks at any resolution.

    Each region is the union of the convex hulls of its parts (``REGIONS``), e.g. ``"eyes"`` is
    two hulls, one per eye. A pixel is inside when its centre is.

    Args:
        landmarks: float ``[..., 478, 2|3]`` normalised (see module doc); NaN frames -> empty.
        size: output ``H`` (square) or ``(H, W)``, e.g. the latent size for a latent-space loss.
        regions: names from ``REGIONS``.
        dilate: grow each mask by this many pixels (square structuring element).

    Returns:
        bool ``[..., R, H, W]`` on ``landmarks``' device, R = ``len(regions)``.
    """
    x = _check_landmarks(landmarks)
    h, w = _size(size)
    unknown = [r for r in regions if r not in REGIONS]
    if unknown or not regions:
        raise ValueError(f"regions must be non-empty names from {sorted(REGIONS)}, got "
                         f"{list(regions)}")
    if dilate < 0:
        raise ValueError(f"dilate must be >= 0, got {dilate}")
    lead = x.shape[:-2]
    pix = to_pixels(x.detach().reshape(-1, NUM_LANDMARKS, x.shape[-1]), (h, w))
    pix = pix.double().cpu().numpy()
    out = np.zeros((pix.shape[0], len(regions), h, w), dtype=bool)
    for f in range(pix.shape[0]):
        for r, name in enumerate(regions):
            for part in REGIONS[name]:
                pts = pix[f, list(PART_INDICES[part])]
                if np.isfinite(pts).all():
                    _fill_hull(out[f, r], _convex_hull(pts))
    masks = torch.from_numpy(out)
    if dilate:
        k = 2 * dilate + 1
        masks = torch.nn.functional.max_pool2d(masks.float(), k, stride=1, padding=dilate) > 0
    return masks.reshape(*lead, len(regions), h, w).to(x.device)


def expressive_weights(landmarks: torch.Tensor | np.ndarray, size: int | Sequence[int], *,
                       lambda_ex: float = 1.0, regions: Sequence[str] = EXPRESSIVE_REGIONS,
                       dilate: int = 0) -> torch.Tensor:
    """Per-pixel loss weights ``1 + lambda_ex * [pixel in an expressive region]``.

    Anchored Diffusion's weighted MSE gives the mouth and eye landmark regions weight
    ``1 + lambda_ex`` (``lambda_ex = 1``) and every other pixel 1.

    Returns:
        float32 ``[..., H, W]``.
    """
    m = region_masks(landmarks, size, regions, dilate=dilate).any(dim=-3)
    return 1.0 + float(lambda_ex) * m.float()


def face_part_labels(landmarks: torch.Tensor | np.ndarray, size: int | Sequence[int], *,
                     dilate: int = 0) -> torch.Tensor:
    """Face-part segmentation from landmarks, labels indexing ``FACE_PARTS``.

    0 background, 1 skin (face oval not covered by another part), 2 eyebrows, 3 eyes, 4 nose,
    5 mouth; later parts win where hulls overlap. Used as LaVieID's local-router targets (the
    paper's hair class has no mesh counterpart and is left to background).

    Returns:
        int64 ``[..., H, W]``.
    """
    parts = ("face", "eyebrows", "eyes", "nose", "mouth")
    m = region_masks(landmarks, size, parts, dilate=dilate)
    labels = torch.zeros(m.shape[:-3] + m.shape[-2:], dtype=torch.long, device=m.device)
    for value, k in enumerate(range(len(parts)), start=1):
        labels[m[..., k, :, :]] = value
    return labels
