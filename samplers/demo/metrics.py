"""The demo's metrics: scene consistency (CSIM, Self-CSIM), control following, fidelity.

No CLIP weights are available offline, so consistency uses a fixed, documented embedding:

``rgbhist4-hog9x8`` (``EMBEDDING``): the concatenation, each half L2-normalised, of
- a joint RGB colour histogram, 4 soft (triangular) bins per channel = 64 bins, square-rooted
  (Hellinger), which captures palette: skin, hair, clothes, background colours;
- a HOG-like descriptor: unsigned gradient orientation in 9 bins, magnitude-weighted, over an
  8x8 grid of 8x8-pixel cells = 576 values, which captures layout and texture.
Like CLIP it sees the whole frame (background, hair and clothes included), not just the face.

Consistency follows the paper (section 4.2): CSIM = minimum cosine similarity between the
source image and any generated frame (higher is better); Self-CSIM = |min pairwise cosine
similarity among generated frames - the same among the ground-truth frames| (lower is better).
Here the ground truth exists: the generator renders the source identity with the driving
parameters, which is exactly the video a perfect reenactment would produce.

Control following: the pose and expression parameters of every generated frame are recovered by
fitting the differentiable generator (with the source identity) to the frame, and their
landmarks are compared with the driving landmarks (mean point distance in pixels: the analogue
of the paper's LMSE, and Expressive-LMSE over the eye, brow and mouth points). The fit's own
error on the ground-truth frames is reported as the estimator's floor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avatar_models.data import procedural_faces as pf

EMBEDDING = "rgbhist4-hog9x8"
EMBEDDING_ABOUT = (
    "per frame: joint RGB histogram (4 soft bins per channel, square-rooted, L2-normalised) "
    "concatenated with a HOG-like descriptor (9 unsigned orientation bins, magnitude-weighted, "
    "8x8 cells of 8x8 px, L2-normalised); whole frame; deterministic, no learned weights. "
    "CSIM = min cosine(source, frame); Self-CSIM = |min pairwise cosine(generated) - min "
    "pairwise cosine(ideal video)|, the ideal video being the source identity rendered by the "
    "generator with the driving motion")
CONTROL_ABOUT = (
    "pose and expression of every generated frame recovered by fitting the differentiable "
    "procedural generator (source identity) to it by Adam on pixel MSE; lmse_px / "
    "expressive_lmse_px = mean distance in pixels (64x64 frame) between the 20 landmarks of the "
    "recovered and of the driving parameters (all points / eye, brow and mouth points); mse and "
    "psnr_db compare the frames with the ideal video")
# landmark indices of eyes (5..10), brows (11..14) and mouth (16..19) in procedural_faces.landmarks
EXPRESSIVE_POINTS = tuple(range(5, 15)) + tuple(range(16, 20))


def _soft_bins(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Triangular memberships ``[..., bins]`` of values in [0, 1] to evenly spaced bin centres."""
    centres = torch.linspace(0, 1, bins, dtype=x.dtype)
    return (1 - (x.unsqueeze(-1) - centres).abs() * (bins - 1)).clamp_min(0)


def embed(frames: torch.Tensor) -> torch.Tensor:
    """``rgbhist4-hog9x8`` embeddings ``[N, 640]`` (unit norm) of frames ``[N, 3, 64, 64]`` in
    [0, 1]. Deterministic, weight-free; see the module docstring."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames: expected shape [N, 3, H, W], got {tuple(frames.shape)}")
    x = frames.double().clamp(0, 1)
    n = x.shape[0]
    r, g, b = (_soft_bins(x[:, c].reshape(n, -1), 4) for c in range(3))
    hist = torch.einsum("npi,npj,npk->nijk", r, g, b).reshape(n, 64) / r.shape[1]
    hist = F.normalize(hist.sqrt(), dim=1)

    gray = x.mean(1, keepdim=True)
    gx = F.pad(gray[..., :, 2:] - gray[..., :, :-2], (1, 1, 0, 0))
    gy = F.pad(gray[..., 2:, :] - gray[..., :-2, :], (0, 0, 1, 1))
    mag = torch.sqrt(gx ** 2 + gy ** 2 + 1e-12)
    ang = torch.atan2(gy, gx) % math.pi  # unsigned orientation
    pos = ang / math.pi * 9  # soft assignment to the two nearest of 9 circular bins
    lo = pos.floor().long() % 9
    frac = pos - pos.floor()
    votes = torch.zeros(n, 9, *gray.shape[-2:], dtype=x.dtype)
    votes.scatter_add_(1, lo, mag * (1 - frac))
    votes.scatter_add_(1, (lo + 1) % 9, mag * frac)
    cells = F.avg_pool2d(votes, frames.shape[-1] // 8)  # [N, 9, 8, 8]
    hog = F.normalize(cells.reshape(n, -1), dim=1)
    return (torch.cat([hist, hog], 1) / math.sqrt(2)).float()


def consistency(generated: torch.Tensor, source: torch.Tensor,
                truth: torch.Tensor) -> dict[str, float]:
    """CSIM (min cosine to the source), Self-CSIM against the ideal video, and the min pairwise
    similarities themselves (``avatar_models.metrics``, on ``embed`` embeddings).
    ``generated``/``truth``: [N, 3, 64, 64] (N >= 2), ``source``: [3, 64, 64], all in [0, 1]."""
    from avatar_models import metrics

    eg, et = embed(generated).double(), embed(truth).double()
    es = embed(source.reshape(1, 3, *source.shape[-2:]))[0].double()
    return dict(csim=metrics.csim(es, eg), self_csim=metrics.self_csim(eg, et),
                min_pairwise_csim=metrics.min_pairwise_similarity(eg),
                min_pairwise_csim_ideal=metrics.min_pairwise_similarity(et))


def fit_params(ident: pf.FaceIdentity, frames: torch.Tensor, steps: int = 120,
               lr: float = 0.05) -> torch.Tensor:
    """Pose and expression ``[N, 8]`` that make ``render(ident, .)`` closest to ``frames``.

    Adam on the pixel MSE (plus the MSE of 2x-blurred images, which widens the basin), from the
    neutral face, with the parameters clamped to their ranges after each step.
    """
    n = frames.shape[0]
    lo = torch.tensor([-1, -1, -1, 0, 0, 0, -1, 0.0])
    hi = torch.ones(pf.N_PARAMS)
    p = torch.tensor([0, 0, 0, 0.8, 0.8, 0.3, 0, 0.2]).repeat(n, 1).requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    target = frames.float().clamp(0, 1)
    target_blur = F.avg_pool2d(target, 2)
    for _ in range(steps):
        img, _ = pf.render(ident, p)
        loss = (F.mse_loss(img, target, reduction="sum")
                + 4 * F.mse_loss(F.avg_pool2d(img, 2), target_blur, reduction="sum")) / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            p.copy_(torch.maximum(torch.minimum(p, hi), lo))
    return p.detach()


def landmark_error(params: torch.Tensor, driving_params: torch.Tensor) -> dict[str, float]:
    """Mean landmark distance in pixels (all points, and eye/brow/mouth points)."""
    a = pf.landmarks(params).view(-1, pf.N_LANDMARKS, 2)
    b = pf.landmarks(driving_params).view(-1, pf.N_LANDMARKS, 2)
    d = (a - b).norm(dim=-1) * (pf.SIZE / 2)
    return dict(lmse_px=d.mean().item(),
                expressive_lmse_px=d[:, list(EXPRESSIVE_POINTS)].mean().item())


def fidelity(generated: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    mse = F.mse_loss(generated.double().clamp(0, 1), truth.double()).item()
    return dict(mse=mse, psnr_db=10 * math.log10(1.0 / max(mse, 1e-12)))
