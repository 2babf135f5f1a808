"""Anchored Diffusion's evaluation metrics (section 4.2), pure tensor code.

Inputs are embeddings and landmarks, not videos: compute CLIP embeddings with
``avatar_models.conditioning.CLIPEncoder.encode_images`` and landmarks with
``avatar_models.conditioning.detect_landmarks`` (``avatar-kernels eval`` does both).

- CSIM: minimum cosine similarity between the source image's embedding and each generated
  frame's (higher is better: the least faithful frame still resembles the source).
- Self-CSIM: ``|min_{i<j} cos(g_i, g_j) - min_{i<j} cos(d_i, d_j)|`` over the generated and the
  driving frames (lower is better: the generated video varies as much as the driving one).
- LMSE: mean squared error between corresponding landmark coordinates (x, y, z, normalised as
  MediaPipe returns them) of generated and driving frames, averaged over frames, points and
  coordinates; frames where either side has no face (NaN) are skipped.
- Expressive-LMSE: LMSE restricted to the eye and lip points.
"""

from __future__ import annotations

import math

import torch


def _check_emb(name: str, x: torch.Tensor, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim or not x.is_floating_point():
        want = "[D]" if ndim == 1 else "[N, D]"
        raise ValueError(f"{name} must be a float {want} tensor, got {x.dtype} "
                         f"{list(x.shape)}")
    return x.double()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.transpose(-1, -2)


def csim(source: torch.Tensor, generated: torch.Tensor) -> float:
    """min_i cos(source, generated_i); source [D], generated [N, D]."""
    s = _check_emb("source", source, 1)
    g = _check_emb("generated", generated, 2)
    if g.shape[-1] != s.shape[-1]:
        raise ValueError(f"generated must have D={s.shape[-1]} like source, got "
                         f"{list(generated.shape)}")
    return float(_cos(s[None], g).min())


def min_pairwise_similarity(embeddings: torch.Tensor) -> float:
    """min_{i<j} cos(e_i, e_j) of [N, D] embeddings (N >= 2)."""
    e = _check_emb("embeddings", embeddings, 2)
    if e.shape[0] < 2:
        raise ValueError(f"embeddings need at least 2 frames, got {e.shape[0]}")
    sim = _cos(e, e)
    iu = torch.triu_indices(e.shape[0], e.shape[0], offset=1)
    return float(sim[iu[0], iu[1]].min())


def self_csim(generated: torch.Tensor, driving: torch.Tensor) -> float:
    """|min pairwise cos within generated - min pairwise cos within driving|."""
    return abs(min_pairwise_similarity(generated) - min_pairwise_similarity(driving))


def lmse(generated: torch.Tensor, driving: torch.Tensor,
         indices: torch.Tensor | list[int] | tuple[int, ...] | None = None) -> float:
    """Landmark MSE of [N, K, 3] (or [N, K, 2]) landmark sets, optionally on points ``indices``.

    Returns NaN when no frame has a face on both sides."""
    for name, x in (("generated", generated), ("driving", driving)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] not in (2, 3):
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a [N, K, 2|3] landmark tensor, got {shape}")
    if generated.shape != driving.shape:
        raise ValueError(f"generated and driving must have the same shape, got "
                         f"{list(generated.shape)} and {list(driving.shape)}")
    g, d = generated.double(), driving.double()
    if indices is not None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        g, d = g[:, idx], d[:, idx]
    ok = torch.isfinite(g).flatten(1).all(1) & torch.isfinite(d).flatten(1).all(1)
    if not bool(ok.any()):
        return math.nan
    return float(((g[ok] - d[ok]) ** 2).mean())


def expressive_lmse(generated: torch.Tensor, driving: torch.Tensor) -> float:
    """LMSE on the eye and lip points of the 478-point MediaPipe mesh."""
    from avatar_models.conditioning.face_regions import EXPRESSIVE_INDICES

    if generated.dim() != 3 or generated.shape[1] != 478:
        raise ValueError(f"generated must be [N, 478, 3] MediaPipe landmarks, got "
                         f"{list(generated.shape)}")
    return lmse(generated, driving, EXPRESSIVE_INDICES)


def vbench_consistency(embeddings: torch.Tensor) -> float:
    """VBench-style temporal consistency of one video's per-frame embeddings [N, D] (N >= 2):
    the mean over frames t >= 1 of (cos(e_t, e_0) + cos(e_t, e_(t-1))) / 2, i.e. similarity to
    the first and to the previous frame (VBench's subject / background consistency, which it
    computes on DINO / CLIP features). 1 for a static video; higher is more consistent."""
    e = _check_emb("embeddings", embeddings, 2)
    if e.shape[0] < 2:
        raise ValueError(f"embeddings need at least 2 frames, got {e.shape[0]}")
    sim = _cos(e, e)
    t = torch.arange(1, e.shape[0])
    return float(((sim[t, 0] + sim[t, t - 1]) / 2).mean())


def kid(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Kernel Inception Distance on any fixed embedding: the unbiased squared MMD between the
    embedding sets generated [N, D] and real [M, D] (N, M >= 2) under the cubic polynomial
    kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018). 0 in expectation when both come
    from one distribution; lower is better; can be slightly negative."""
    g = _check_emb("generated", generated, 2)
    r = _check_emb("real", real, 2)
    if g.shape[0] < 2 or r.shape[0] < 2 or g.shape[1] != r.shape[1]:
        raise ValueError(f"generated and real must be [N >= 2, D] with the same D, got "
                         f"{list(generated.shape)} and {list(real.shape)}")
    d = g.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    n, m = g.shape[0], r.shape[0]
    kgg, krr = k(g, g), k(r, r)
    within_g = (kgg.sum() - kgg.diagonal().sum()) / (n * (n - 1))
    within_r = (krr.sum() - krr.diagonal().sum()) / (m * (m - 1))
    return float(within_g + within_r - 2 * k(g, r).mean())
