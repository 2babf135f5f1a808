"""Video metrics shared by the long-video systems (Lookahead Anchoring, MCDM, ...), pure tensor
code on sequences the caller has already read off the video (audio energy, mouth opening,
landmarks, per-frame features).

- ``lip_sync_score``: a Sync-C stand-in. Pearson correlation of the audio energy and the mouth
  opening at every lag in [-max_lag, max_lag] frames; the score is the peak minus the median over
  the lags (high for a synced pair, about 0 for unrelated sequences), and ``lag`` is where the
  peak is (``mouth[t + lag]`` follows ``audio[t]``).
- ``dynamic_degree``: the variance over frames of every landmark coordinate, averaged over
  points and coordinates (in the caller's units squared; 0 for a still face).
- ``smoothness_error``: the mean absolute difference between frame t and the mean of frames
  t - 1 and t + 1, over the interior frames (0 for motion linear in time; lower is smoother).
- ``seam_jump``: the mean absolute frame-to-frame change across segment boundaries, against the
  same inside segments (an extra, not in the Lookahead paper).
- ``windowed_consistency``: per-frame similarity (cosine) or distance (L2) of features to the
  first frame, to the previous frame and to a reference, averaged per window (e.g. 1 s), and the
  reference curve normalised by its first window (the Lookahead paper's Fig. 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LIP_SYNC_ABOUT = (
    "Pearson correlation of audio energy and mouth opening, corr(audio[t], mouth[t + lag]) for "
    "every lag in [-max_lag, max_lag] frames over the overlapping frames; peak_minus_median = "
    "max over lags - median over lags (a Sync-C stand-in), lag = argmax")
DYNAMIC_DEGREE_ABOUT = ("variance over frames of every landmark coordinate, mean over points "
                        "and coordinates (units of the landmarks, squared)")
SMOOTHNESS_ABOUT = ("mean |x_t - (x_{t-1} + x_{t+1}) / 2| over interior frames and pixels "
                    "(lower is smoother)")
SEAM_ABOUT = ("mean |x_t - x_{t-1}| over pixels at the first frame t of every segment after the "
              "first (seam) and at every other frame (interior); ratio = seam / interior")
CONSISTENCY_ABOUT = (
    "per-frame similarity (cosine) or distance (l2) of features to the first frame, the "
    "previous frame and the reference, averaged per window; reference_normalised = each "
    "window's reference value / the first window's")


def _sequence(name: str, x) -> torch.Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.double()
    if t.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {tuple(t.shape)}")
    return t.double()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return (a @ b).item() / den if den > 1e-12 else 0.0


def lip_sync_score(audio_energy, mouth_open, max_lag: int = 15) -> dict:
    """``LIP_SYNC_ABOUT``. ``audio_energy``, ``mouth_open``: 1-D, one value per video frame, of
    equal length T >= max_lag + 3 (every lag then has at least 3 overlapping frames).

    Returns ``peak_minus_median``, ``lag`` (int), ``peak``, ``median`` and ``correlation`` (the
    list over lags -max_lag..max_lag)."""
    a, m = _sequence("audio_energy", audio_energy), _sequence("mouth_open", mouth_open)
    if a.shape != m.shape:
        raise ValueError(f"audio_energy, mouth_open: expected equal lengths, got {a.numel()} "
                         f"and {m.numel()}")
    if not isinstance(max_lag, int) or max_lag < 0:
        raise ValueError(f"max_lag: expected an int >= 0, got {max_lag!r}")
    if a.numel() < max_lag + 3:
        raise ValueError(f"audio_energy: expected at least max_lag + 3 = {max_lag + 3} frames, "
                         f"got {a.numel()}")
    n = a.numel()
    corr = []
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            corr.append(_pearson(a[:n - lag], m[lag:]))
        else:
            corr.append(_pearson(a[-lag:], m[:n + lag]))
    c = torch.tensor(corr, dtype=torch.float64)
    peak, best = c.max().item(), int(c.argmax())
    median = c.median().item()
    return dict(peak_minus_median=peak - median, lag=best - max_lag, peak=peak, median=median,
                correlation=corr)


def dynamic_degree(landmarks: torch.Tensor) -> float:
    """``DYNAMIC_DEGREE_ABOUT``; ``landmarks``: [N >= 2, K, 2 or 3]."""
    if landmarks.ndim != 3 or landmarks.shape[0] < 2 or landmarks.shape[-1] not in (2, 3):
        raise ValueError(f"landmarks: expected shape [N >= 2, K, 2|3], got "
                         f"{tuple(landmarks.shape)}")
    return landmarks.double().var(0, unbiased=False).mean().item()


def _frames(name: str, frames: torch.Tensor, least: int) -> torch.Tensor:
    if frames.ndim < 2 or frames.shape[0] < least:
        raise ValueError(f"{name}: expected [N >= {least}, ...] frames, got "
                         f"{tuple(frames.shape)}")
    return frames.double()


def smoothness_error(frames: torch.Tensor) -> float:
    """``SMOOTHNESS_ABOUT``; ``frames``: [N >= 3, ...]."""
    x = _frames("frames", frames, 3)
    return (x[1:-1] - (x[:-2] + x[2:]) / 2).abs().mean().item()


def seam_jump(frames: torch.Tensor, segment_starts) -> dict[str, float]:
    """``SEAM_ABOUT``; ``frames``: [N >= 3, ...]; ``segment_starts``: the first frame index of
    every segment after the first (each in 1..N-1, at least one)."""
    x = _frames("frames", frames, 3)
    steps = (x[1:] - x[:-1]).abs().flatten(1).mean(1)              # steps[t - 1] = |x_t - x_{t-1}|
    starts = sorted({int(s) for s in segment_starts})
    if not starts or starts[0] < 1 or starts[-1] >= x.shape[0]:
        raise ValueError(f"segment_starts: expected indices in 1..{x.shape[0] - 1}, got "
                         f"{list(segment_starts)}")
    seam = torch.zeros(steps.numel(), dtype=torch.bool)
    seam[[s - 1 for s in starts]] = True
    if seam.all():
        raise ValueError("segment_starts: expected at least one frame that is not a seam")
    s, i = steps[seam].mean().item(), steps[~seam].mean().item()
    return dict(seam=s, interior=i, ratio=s / max(i, 1e-12))


def windowed_consistency(features: torch.Tensor, window: int, reference: torch.Tensor | None = None,
                         kind: str = "cosine") -> dict[str, list[float]]:
    """``CONSISTENCY_ABOUT``. ``features``: [N >= 2, D] per frame; ``window``: frames per window
    (the last window may be shorter); ``reference``: [D] or None; ``kind``: ``"cosine"``
    (similarity, higher is more consistent) or ``"l2"`` (distance, lower is more consistent).

    Returns per-window lists ``to_first``, ``to_previous`` (frame 0 excluded), and with a
    reference ``to_reference`` and ``reference_normalised``."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected shape [N >= 2, D], got {tuple(features.shape)}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected an int >= 1, got {window!r}")
    if kind not in ("cosine", "l2"):
        raise ValueError(f"kind: expected 'cosine' or 'l2', got {kind!r}")
    f = features.double()

    def score(a, b):
        if kind == "cosine":
            return F.cosine_similarity(a, b.expand_as(a), dim=-1)
        return (a - b).norm(dim=-1)

    def per_window(values: torch.Tensor, first: int = 0) -> list[float]:
        idx = torch.arange(first, f.shape[0])
        return [values[(idx // window) == w].mean().item()
                for w in range(int(idx[0]) // window, (f.shape[0] - 1) // window + 1)
                if bool(((idx // window) == w).any())]

    out = dict(to_first=per_window(score(f, f[0])),
               to_previous=per_window(score(f[1:], f[:-1]), first=1))
    if reference is not None:
        if reference.shape != f.shape[1:]:
            raise ValueError(f"reference: expected shape {tuple(f.shape[1:])}, got "
                             f"{tuple(reference.shape)}")
        ref = per_window(score(f, reference.double()))
        out["to_reference"] = ref
        out["reference_normalised"] = [v / ref[0] if abs(ref[0]) > 1e-12 else float("nan")
                                       for v in ref]
    return out
