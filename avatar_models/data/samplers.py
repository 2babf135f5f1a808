"""Training-time frame samplers as pure functions on indices (no video needed).

- :func:`nonuniform_indices`: Anchored Diffusion (seeds/000, sec. 3.1): a random non-uniform,
  sorted sequence of T frames plus the source frame farthest in time from it.
- :func:`segment_indices` + :func:`audio_span`: contiguous segments with aligned audio
  (Lookahead Anchoring, MCDM). For MCDM's archived clip, draw ``history + length`` frames and
  split.
- :func:`keyframe_index`: Lookahead Anchoring's flexible keyframe position
  ``l ~ U[0, n - 1 + d_max]`` relative to the segment start (seeds/001, sec. 3.3).

All take an optional ``torch.Generator`` (CPU) and return plain ints / int64 CPU tensors.
"""

from __future__ import annotations

import torch


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def farthest_frame(indices: torch.Tensor, num_frames: int) -> int:
    """The frame of ``range(num_frames)`` not in ``indices`` whose mean absolute time distance to
    the frames of ``indices`` is largest (ties: the earlier frame).

    The mean distance is convex in the frame index, so the answer is the first or the last frame
    not in the sequence: "effectively the first or last frame of the entire video" (seeds/000).
    """
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    _check_int("num_frames", num_frames, 1)
    if idx.numel() == 0:
        raise ValueError("indices must hold at least one frame")
    if int(idx.min()) < 0 or int(idx.max()) >= num_frames:
        raise ValueError(f"indices must lie in [0, {num_frames - 1}], got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    taken = torch.zeros(num_frames, dtype=torch.bool)
    taken[idx] = True
    free = (~taken).nonzero().flatten()
    if free.numel() == 0:
        raise ValueError(f"all {num_frames} frames are in indices: no source frame left")
    lo, hi = int(free[0]), int(free[-1])
    d_lo = (idx - lo).abs().double().mean()
    d_hi = (idx - hi).abs().double().mean()
    return hi if d_hi > d_lo else lo


def nonuniform_indices(num_frames: int, length: int, generator: torch.Generator | None = None,
                       *, max_span: int | None = None) -> tuple[torch.Tensor, int]:
    """Random non-uniform frame sequence plus its source frame (Anchored Diffusion training).

    A window of ``span`` frames, ``span ~ U[length, min(max_span, num_frames - 1)]``, is placed
    uniformly at random in the video, and ``length`` distinct frames are drawn uniformly from it
    and sorted, so the spacing between consecutive frames varies. ``max_span=None`` allows the
    whole video. The source is :func:`farthest_frame` over the whole video (never in the
    sequence).

    Args:
        num_frames: frames in the video (>= length + 1).
        length: T, frames in the sequence.

    Returns:
        ``(indices int64 [length] strictly increasing, source index)``.
    """
    _check_int("length", length, 1)
    _check_int("num_frames", num_frames, length + 1)
    limit = num_frames - 1  # keep one frame free for the source
    if max_span is not None:
        _check_int("max_span", max_span, length)
        limit = min(limit, max_span)
    span = _randint(length, limit, generator)
    start = _randint(0, num_frames - span, generator)
    picks = torch.randperm(span, generator=generator)[:length]
    indices = torch.sort(picks).values + start
    return indices, farthest_frame(indices, num_frames)


def segment_indices(num_frames: int, length: int, generator: torch.Generator | None = None,
                    *, stride: int = 1) -> torch.Tensor:
    """Contiguous segment: ``start + stride * arange(length)`` with a uniform random start such
    that the segment fits. Returns int64 ``[length]``."""
    _check_int("length", length, 1)
    _check_int("stride", stride, 1)
    needed = (length - 1) * stride + 1
    _check_int("num_frames", num_frames, needed)
    start = _randint(0, num_frames - needed, generator)
    return start + stride * torch.arange(length, dtype=torch.long)


def keyframe_index(start: int, length: int, num_frames: int, max_distance: int,
                   generator: torch.Generator | None = None) -> int:
    """Lookahead keyframe for the segment ``[start, start + length)``: absolute frame
    ``start + l`` with ``l ~ U[0, length - 1 + max_distance]``, capped at the video's last
    frame. ``l < length`` lies inside the window, larger ``l`` ahead of it."""
    _check_int("length", length, 1)
    _check_int("max_distance", max_distance, 0)
    _check_int("start", start, 0)
    _check_int("num_frames", num_frames, start + length)
    high = min(length - 1 + max_distance, num_frames - 1 - start)
    return start + _randint(0, high, generator)


def audio_span(first_frame: int, num_frames: int, fps: float,
               sample_rate: int) -> tuple[int, int]:
    """Audio samples ``[start, stop)`` covering video frames ``[first_frame, first_frame +
    num_frames)``; ``stop - start == round(num_frames / fps * sample_rate)`` whatever the start,
    so equal-length segments batch together."""
    _check_int("first_frame", first_frame, 0)
    _check_int("num_frames", num_frames, 1)
    _check_int("sample_rate", sample_rate, 1)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    start = int(round(first_frame / fps * sample_rate))
    return start, start + int(round(num_frames / fps * sample_rate))
