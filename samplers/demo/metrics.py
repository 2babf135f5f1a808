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


# ----------------------------------------------------------------------------------------------
# long-video metrics, fixed before any result was looked at (docs/demo.md, "Metrics (fixed
# before results)"); every one compares the generated video with the ideal video of the same
# pair, so what the toy world itself varies (pose, expression) cancels.

READOUT_ABOUT = (
    "regions: background and shirt pixels that the head never touches in the clip "
    "(procedural_faces.region_masks), the same pixels in every frame. Pixel readout: the RGB "
    "values there; pixel_spread = RMS over frames and region pixels of the deviation from the "
    "temporal mean, pixel_anchor_distance = mean over frames of the RMS difference from the "
    "anchor frame. Statistics readout (phase-blind): per region mean RGB, RGB standard "
    "deviation and mean absolute difference of neighbouring pixels along x, y and both "
    "diagonals (10 values); readout_spread / readout_anchor_distance: the same on them (L2)")
DRIFT_ABOUT = (
    "drift(d) = mean over frame pairs (i, j) with |i - j| = d of [cos_ideal(i, j) - "
    "cos_generated(i, j)], cosines of the rgbhist4-hog9x8 embeddings; 0 for the ideal video, "
    "positive when the generated frames grow apart faster than the ideal ones")
FLICKER_ABOUT = ("mean |x_{t+1} - x_t| over pixels and consecutive frames (frames in [0, 1]) of "
                 "the generated video minus the same of the ideal video")
TRANSFER_ABOUT = (
    "residual r_t = embed(generated_t) - embed(ideal_t) (what the model invented); transfer = "
    "mean over the frames of sequences b != 0 (not the anchor) of cos(r_t, r_anchor) - "
    "cos(r_t, r'_anchor), r'_anchor the anchor residual of an independent sample of the same "
    "inputs (noise seed + 1, one window of the T frames around the anchor); > 0 when the "
    "anchor passes what it invented to the other sequences, 0 when it passes nothing")
INTERVAL_ABOUT = ("95% Student-t interval of the mean over held-out identity/driver pairs: "
                  "mean +- t_{0.975, n-1} * sd / sqrt(n)")


def _pairwise_cos(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e.double(), dim=1)
    return e @ e.T


def drift_by_distance(generated: torch.Tensor, ideal: torch.Tensor) -> torch.Tensor:
    """``drift[d]`` for d = 0 .. N-1 (float64 [N]; ``drift[0]`` is 0): see ``DRIFT_ABOUT``.
    ``generated``, ``ideal``: [N, 3, H, W] in [0, 1], frame i of one is frame i of the other."""
    if generated.shape != ideal.shape or generated.ndim != 4:
        raise ValueError(f"generated, ideal: expected equal shapes [N, 3, H, W], got "
                         f"{tuple(generated.shape)} and {tuple(ideal.shape)}")
    gap = _pairwise_cos(embed(ideal)) - _pairwise_cos(embed(generated))
    n = gap.shape[0]
    return torch.stack([gap.diagonal(d).mean() for d in range(n)])


def drift_curve(generated: torch.Tensor, ideal: torch.Tensor,
                distances: tuple[int, ...]) -> list[float]:
    """``drift_by_distance`` at each of ``distances`` (each must be < N)."""
    d = drift_by_distance(generated, ideal)
    if max(distances) >= d.shape[0] or min(distances) < 1:
        raise ValueError(f"distances: expected values in 1..{d.shape[0] - 1}, got {distances}")
    return [d[k].item() for k in distances]


def _region_readout(frames: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """[N, 10] readout (see ``READOUT_ABOUT``) of ``frames`` [N, 3, H, W] over ``region``
    [H, W] bool; texture terms only where both pixels of the pair lie in the region."""
    x = frames.double().clamp(0, 1)
    m = region.to(x.device)
    if int(m.sum()) < 2:
        raise ValueError(f"region: expected at least 2 pixels, got {int(m.sum())}")
    px = x[:, :, m]                                                       # [N, 3, P]
    parts = [px.mean(-1), px.std(-1)]
    gray = x.mean(1)
    h, w = gray.shape[-2:]
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):  # pixel (y, x) against (y + dy, x + dx)
        x0, x1 = max(0, -dx), w - max(0, dx)
        both = m[:h - dy, x0:x1] & m[dy:, x0 + dx:x1 + dx]
        diff = (gray[:, :h - dy, x0:x1] - gray[:, dy:, x0 + dx:x1 + dx]).abs()[:, both]
        parts.append(diff.mean(-1, keepdim=True) if both.any()
                     else torch.zeros(x.shape[0], 1, dtype=x.dtype))
    return torch.cat(parts, 1)


def appearance_readout(frames: torch.Tensor, regions: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, 10 * R] readout of ``frames`` [N, 3, H, W] over the regions [1, H, W] (or [H, W]) of
    ``regions`` with at least 8 pixels, in the dict's order (``READOUT_ABOUT``)."""
    used = [r.reshape(r.shape[-2:]) for r in regions.values() if int(r.sum()) >= 8]
    if not used:
        raise ValueError("regions: expected at least one region with >= 8 pixels")
    return torch.cat([_region_readout(frames, r) for r in used], 1)


def appearance_stability(generated: torch.Tensor, ideal: torch.Tensor,
                         regions: dict[str, torch.Tensor], anchor: int) -> dict[str, float]:
    """Spread over time and distance from the anchor frame of the appearance readout, for the
    generated and the ideal video (``READOUT_ABOUT``)."""
    out = {}
    region = torch.zeros(generated.shape[-2:], dtype=torch.bool)
    for r in regions.values():
        region |= r.reshape(r.shape[-2:]).bool()
    for name, video in (("", generated), ("_ideal", ideal)):
        px = video.double().clamp(0, 1)[:, :, region]                        # [N, 3, P]
        out["pixel_spread" + name] = (px - px.mean(0)).pow(2).mean().sqrt().item()
        out["pixel_anchor_distance" + name] = (
            (px - px[anchor]).pow(2).mean((1, 2)).sqrt().mean().item())
        r = appearance_readout(video, regions)
        out["readout_spread" + name] = (r - r.mean(0)).norm(dim=1).pow(2).mean().sqrt().item()
        out["readout_anchor_distance" + name] = (r - r[anchor]).norm(dim=1).mean().item()
    return out


def flicker(generated: torch.Tensor, ideal: torch.Tensor) -> float:
    """``FLICKER_ABOUT``; ``generated``, ``ideal``: [N, 3, H, W] (N >= 2) in [0, 1]."""
    if generated.shape != ideal.shape or generated.shape[0] < 2:
        raise ValueError(f"generated, ideal: expected equal shapes [N >= 2, 3, H, W], got "
                         f"{tuple(generated.shape)} and {tuple(ideal.shape)}")

    def step(v):
        v = v.double().clamp(0, 1)
        return (v[1:] - v[:-1]).abs().mean().item()

    return step(generated) - step(ideal)


def masked_psnr(generated: torch.Tensor, ideal: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB, peak 1) over the pixels of ``mask`` [N, 1, H, W] bool (e.g. face and hair)."""
    m = mask.expand_as(generated)
    if not m.any():
        raise ValueError("mask: expected at least one pixel")
    err = (generated.double().clamp(0, 1) - ideal.double())[m]
    return 10 * math.log10(1.0 / max(err.pow(2).mean().item(), 1e-12))


def anchor_transfer(generated: torch.Tensor, ideal: torch.Tensor, anchor: int,
                    frames: torch.Tensor, other_anchor: torch.Tensor) -> dict[str, float]:
    """The anchor-transfer diagnostic (``TRANSFER_ABOUT``).

    ``generated``, ``ideal``: [N, 3, H, W]; ``anchor``: the anchor's frame index; ``frames``:
    bool [N], the frames to average over (those of sequences b != 0, the anchor excluded);
    ``other_anchor``: [3, H, W], the anchor frame of an independent sample of the same inputs.
    """
    if not frames.any() or frames[anchor]:
        raise ValueError("frames: expected a non-empty mask without the anchor frame")
    res = embed(generated).double() - embed(ideal).double()                # [N, E]
    other = embed(other_anchor[None]).double()[0] - embed(ideal[anchor:anchor + 1]).double()[0]
    own = F.cosine_similarity(res[frames], res[anchor][None], dim=1)
    alien = F.cosine_similarity(res[frames], other[None], dim=1)
    return dict(anchor_transfer=(own - alien).mean().item(), cos_to_anchor=own.mean().item(),
                cos_to_other_anchor=alien.mean().item())


def t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t distribution (Simpson integration of the density, bisection)."""
    if not 0.5 <= p < 1 or dof < 1:
        raise ValueError(f"p, dof: expected 0.5 <= p < 1 and dof >= 1, got {p}, {dof}")
    nu = float(dof)
    log_c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)

    def cdf(q: float) -> float:
        x = torch.linspace(0, q, 4001, dtype=torch.float64)
        y = torch.exp(log_c - (nu + 1) / 2 * torch.log1p(x ** 2 / nu))
        w = torch.ones(4001, dtype=torch.float64)
        w[1:-1:2], w[2:-1:2] = 4, 2
        return 0.5 + (q / 4000 / 3) * float((w * y).sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def interval(values) -> dict[str, float]:
    """Mean and 95% Student-t interval over pairs (``INTERVAL_ABOUT``); n = 1 gives a zero-width
    interval flagged by ``n``."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() == 0:
        raise ValueError("values: expected at least one value")
    mean = v.mean().item()
    half = 0.0 if v.numel() < 2 else (
        t_quantile(0.975, v.numel() - 1) * v.std().item() / math.sqrt(v.numel()))
    return dict(mean=mean, low=mean - half, high=mean + half, n=int(v.numel()))
