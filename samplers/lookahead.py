"""Lookahead Anchoring sampling: segment-wise autoregressive video of any length (paper 001).

Bookkeeping, in latent frames (video frame j belongs to latent frame j // r):

- a window holds n latent frames at temporal indices 0..n-1. With ``start_mode="replace"`` its
  first s slots are the previous segment's last s frames, so segment i covers
  ``[i (n - s), i (n - s) + n)`` and adds n - s new frames; with ``"concat"`` the s starting
  frames are extra tokens before the window (indices -s..-1), segment i covers ``[i n, (i+1) n)``
  and adds n frames. Either way no frame is skipped or generated twice (:func:`segment_plan`);
- segment 0 has no previous frames: it runs without starting frames (all n slots noisy),
  conditioned on the audio and the keyframe alone (the training drops the starting frames in a
  share of batches so this case is trained);
- the audio slice covers the window's video frames (features past the end of the audio are 0);
- the keyframe sits D video frames past the window's last frame: temporal index n - 1 + d with
  d = floor(D / r). Self-keyframing (the reference is the keyframe) is the default; a narrative
  schedule ``[(time_s, image)]`` is looked up at the anchor's time (Eq. 5), the time of the video
  frame D frames past the window, so a switch starts to pull D frames before its time.

Audio classifier-free guidance: the unconditional branch replaces the audio by the model's
learned null feature and keeps everything else, the keyframe tokens (same latent, same temporal
index) and the starting frames included, so the guidance isolates the audio's effect.

Streaming: every finished segment's new frames are decoded and handed to ``writer(frames,
first_frame)`` before the next segment starts; only the last s latent frames are carried over,
so memory does not grow with the video's length (the per-frame audio features, a few floats per
frame, are the one thing held for the whole video). :class:`StreamingMp4` writes a fragmented
MP4 with its audio, playable after an interrupt.

The model callable is ``model(x [B, n, C, H, W], t [B], audio [B, La, A], keyframe [B, C, H, W],
keyframe_time [B], *, start [B, s, C, H, W] | None, audio_null [B] | None) -> [B, n, C, H, W]``,
e.g. :class:`avatar_models.lookahead.LookaheadDiT`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from avatar_models.lookahead import NoiseSchedule, check_distance, latent_distance


@dataclass(frozen=True)
class Segment:
    index: int
    first: int        # first latent frame of the window (concat: of the new frames)
    new_first: int    # first latent frame this segment adds to the video
    new_count: int    # frames it adds
    starting: int     # starting frames it takes from the previous segment (0 for segment 0)


def segment_plan(total: int, frames: int, starting: int, start_mode: str = "replace"
                 ) -> list[Segment]:
    """Segments covering ``total`` latent frames with windows of n = ``frames`` and s =
    ``starting`` starting frames (see the module docstring); the last segment may run past
    ``total`` (its extra frames are dropped by the caller)."""
    if total < 1 or frames < 1:
        raise ValueError(f"total and frames must be >= 1, got total={total}, frames={frames}")
    if start_mode not in ("replace", "concat"):
        raise ValueError(f"start_mode must be 'replace' or 'concat', got {start_mode!r}")
    if not 0 <= starting < frames and start_mode == "replace":
        raise ValueError(f"starting frames s must be in [0, n) = [0, {frames}) with token "
                         f"replacement, got {starting}")
    if starting < 0:
        raise ValueError(f"starting frames s must be >= 0, got {starting}")
    plan, made = [], 0
    while made < total:
        i = len(plan)
        s = starting if i else 0
        if start_mode == "replace":
            first = made - s
            plan.append(Segment(i, first, made, frames - s, s))
            made += frames - s
        else:
            plan.append(Segment(i, made, made, frames, s))
            made += frames
    return plan


def keyframe_at(schedule: Sequence[tuple[float, object]], time_s: float):
    """The image of a narrative schedule ``[(time_s, image)]`` in force at ``time_s``: the last
    entry whose time is <= ``time_s`` (the first entry before its own time)."""
    if not schedule:
        raise ValueError("keyframe schedule must hold at least one (time_s, image) entry")
    times = [float(t) for t, _ in schedule]
    if times != sorted(times):
        raise ValueError(f"keyframe schedule times must be increasing, got {times}")
    chosen = schedule[0][1]
    for t, image in schedule:
        if t <= time_s:
            chosen = image
    return chosen


class StreamingMp4:
    """H.264 + AAC mp4 written segment by segment. Use as a context manager: it closes (flushes
    and writes the index) on any exception, Ctrl-C included, so an interrupted run leaves a
    playable file of the segments written so far.

    ``fragmented=True`` writes a fragmented MP4 (``frag_keyframe+empty_moov``, an I-frame at
    every segment start), playable even after a hard kill (it then holds the segments flushed
    so far: all but the last one or two, as the muxer interleaves audio); its audio carries the AAC
    encoder's priming samples (no edit list in fragments: up to about 0.1 s too long),
    which is why the default is the plain MP4 with its exact audio duration.

    ``write(frames uint8 [T, H, W, 3], audio float [S] | None)``: frames and, optionally, the
    audio samples that cover them.
    """

    def __init__(self, path: str | Path, fps: float, *, sample_rate: int | None = None,
                 crf: int = 18, fragmented: bool = False):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.sample_rate, self.crf = fps, sample_rate, crf
        self._av = av
        # fragmented: every I-frame closes a fragment and packets are flushed to the file
        # at once, so a hard kill leaves all segments up to the previous one on disk
        options = {"movflags": "frag_keyframe+empty_moov", "flush_packets": "1"} \
            if fragmented else {}
        self.fragmented = fragmented
        self._container = av.open(str(self.path), mode="w", options=options)
        self._video = self._audio = None
        self._frames = self._samples = 0

    def _open(self, h: int, w: int) -> None:
        vs = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": str(self.crf)}
        if self.fragmented:      # no encoder look-ahead: a segment's packets leave at once
            vs.options = {**vs.options, "tune": "zerolatency"}
        self._video = vs
        if self.sample_rate:
            self._audio = self._container.add_stream("aac", rate=int(self.sample_rate))
            self._audio.layout = "mono"

    def write(self, frames: torch.Tensor, audio: torch.Tensor | None = None) -> None:
        av = self._av
        from av.video.frame import PictureType

        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        if self._video is None:
            self._open(frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2)
        arr = frames[:, : self._video.height, : self._video.width].numpy()
        for i in range(arr.shape[0]):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr[i]), format="rgb24")
            frame.pts = self._frames
            # an I-frame at every segment start closes a fragment there (playable on interrupt)
            frame.pict_type = PictureType.I if i == 0 else PictureType.NONE
            self._frames += 1
            self._container.mux(self._video.encode(frame))
        if audio is not None and self._audio is not None:
            wave = np.ascontiguousarray(audio.detach().float().clamp(-1, 1).numpy()[None])
            frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = int(self.sample_rate), self._samples
            self._samples += wave.shape[1]
            self._container.mux(self._audio.encode(frame))

    def close(self) -> None:
        if self._container is None:
            return
        try:
            if self._video is not None:
                self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> StreamingMp4:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class LookaheadSettings:
    distance: int = 12            # D, video frames past the window's last frame
    starting_frames: int = 1      # s (latent frames)
    steps: int = 20
    guidance: float = 1.0         # audio CFG scale (1: off)
    mode: str = "lookahead"       # "lookahead" (index n-1+d), "reference" (0), "past" (-d)
    d_max: int | None = None      # trained range; warn when d exceeds it


def lookahead_sample(model: Callable, schedule: NoiseSchedule, *, total_frames: int,
                     window: int, latent_shape: tuple[int, int, int], audio: torch.Tensor,
                     keyframes: Sequence[tuple[float, torch.Tensor]], fps: float,
                     settings: LookaheadSettings = LookaheadSettings(), ratio: int = 1,
                     start_mode: str = "replace",
                     decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     writer: Callable[[torch.Tensor, int], None] | None = None,
                     generator: torch.Generator | None = None, device="cpu",
                     progress: bool = True,
                     callback: Callable[[Segment, int, dict], None] | None = None) -> int:
    """Generate ``total_frames`` latent frames segment by segment; returns the number written.

    Args:
        model: the model callable (module docstring). schedule: the model's objective.
        window: n latent frames per window. latent_shape: (C, H, W).
        audio: [total_frames * ratio, A] features per video frame (shorter is zero-padded).
        keyframes: narrative schedule ``[(time_s, latent [C, H, W])]``; self-keyframing is
            ``[(0.0, reference_latent)]``.
        decode: latents [F, C, H, W] -> whatever ``writer`` takes (default: identity).
        writer: ``writer(decoded new frames, first latent frame)`` after every segment.
        callback: ``callback(segment, step, {"x", "start", "keyframe", "keyframe_time"})`` after
            every denoising step (tests and diagnostics).
    """
    from tqdm.auto import tqdm

    s_cfg = settings
    if s_cfg.mode not in ("lookahead", "reference", "past"):
        raise ValueError(f"mode must be 'lookahead', 'reference' or 'past', got {s_cfg.mode!r}")
    d = latent_distance(s_cfg.distance, ratio)
    if s_cfg.mode == "lookahead":
        if s_cfg.distance < ratio:
            warnings.warn(f"D={s_cfg.distance} < r={ratio}: d = floor(D/r) = 0 puts the keyframe "
                          f"on the window's last frame, a hard boundary (the paper needs D > 0 "
                          f"latent frames ahead)", stacklevel=2)
        if s_cfg.d_max is not None:
            check_distance(d, s_cfg.d_max, "sampling")
    kf_index = {"lookahead": window - 1 + d, "reference": 0, "past": -max(d, 1)}[s_cfg.mode]
    plan = segment_plan(total_frames, window, s_cfg.starting_frames, start_mode)
    need = (plan[-1].first + window) * ratio
    feats = audio.float()
    if feats.shape[0] < need:
        feats = torch.cat([feats, feats.new_zeros(need - feats.shape[0], feats.shape[1])])
    grid = torch.linspace(1.0, 0.0, s_cfg.steps + 1)
    cfg_on = s_cfg.guidance != 1.0
    tail = None                                     # [1, s, C, H, W]: all that is carried over
    written = 0
    for seg in tqdm(plan, desc="segments", disable=not progress):
        if s_cfg.mode == "lookahead":      # Eq. 5: the image in force at the anchor's time
            anchor_frame = (seg.first + window) * ratio - 1 + s_cfg.distance
        elif s_cfg.mode == "past":
            anchor_frame = seg.first * ratio - s_cfg.distance
        else:
            anchor_frame = seg.first * ratio
        image = keyframe_at(keyframes, anchor_frame / fps)
        keyframe = image.to(device, torch.float32)[None]                       # [1, C, H, W]
        kf_time = torch.full((1,), kf_index, device=device)
        start = tail if seg.starting else None
        a0 = seg.first * ratio
        aud = feats[a0:a0 + window * ratio][None].to(device)                  # [1, La, A]
        x = torch.randn((1, window, *latent_shape), generator=generator).to(device)
        if start is not None and start_mode == "replace":
            x[:, : seg.starting] = start
        for k in tqdm(range(s_cfg.steps), desc=f"segment {seg.index}", leave=False,
                      disable=not progress):
            u = grid[k].expand(1).to(device)
            with torch.no_grad():
                if cfg_on:
                    two = lambda v: None if v is None else torch.cat([v, v])  # noqa: E731
                    out = model(two(x), schedule.model_time(u).repeat(2), two(aud),
                                two(keyframe), kf_time.repeat(2), start=two(start),
                                audio_null=torch.tensor([False, True], device=device))
                    cond, uncond = out.chunk(2)
                    out = uncond + s_cfg.guidance * (cond - uncond)
                else:
                    out = model(x, schedule.model_time(u), aud, keyframe, kf_time, start=start,
                                audio_null=None)
            x0, eps = schedule.x0_eps(x, out.float(), u)
            a_next, s_next = schedule.alpha_sigma(grid[k + 1].expand(1).to(device))
            x = a_next.view(-1, 1, 1, 1, 1) * x0 + s_next.view(-1, 1, 1, 1, 1) * eps
            if start is not None and start_mode == "replace":
                x[:, : seg.starting] = start
            if callback is not None:
                callback(seg, k, {"x": x, "start": start, "keyframe": keyframe,
                                  "keyframe_time": kf_time})
        new = x[0, window - seg.new_count:]                                   # [new, C, H, W]
        new = new[: max(0, total_frames - seg.new_first)]
        if s_cfg.starting_frames:
            tail = x[:, window - s_cfg.starting_frames:].clone()
        if writer is not None and new.shape[0]:
            with torch.no_grad():
                writer(new if decode is None else decode(new), seg.new_first)
        written += new.shape[0]
        del x, out, x0, eps
    return written


def frames_for_audio(seconds: float, fps: float, ratio: int = 1) -> int:
    """Latent frames that cover ``seconds`` of audio at ``fps`` (rounded up)."""
    return max(1, math.ceil(seconds * fps / ratio))


def distance_pilot(model: Callable, schedule: NoiseSchedule, clean: torch.Tensor,
                   audio: torch.Tensor, distances: Sequence[int], *, steps: int = 20,
                   generator_seed: int = 0, device="cpu") -> dict[int, torch.Tensor]:
    """The Fig. 3 pilot: a two-frame generation, one noisy frame at temporal index 0 and the
    clean frame ``clean`` [C, H, W] (passed as the keyframe tokens) at index k, for every k in
    ``distances``; the same noise for every k. ``audio`` [r, A] covers the noisy frame.
    Returns {k: generated frame [C, H, W]}; the motion size is its distance to ``clean``."""
    out = {}
    for k in distances:
        x = torch.randn((1, 1, *clean.shape),
                        generator=torch.Generator().manual_seed(generator_seed)).to(device)
        grid = torch.linspace(1.0, 0.0, steps + 1)
        kf, aud = clean[None].to(device, torch.float32), audio[None].to(device, torch.float32)
        for i in range(steps):
            u = grid[i].expand(1).to(device)
            with torch.no_grad():
                pred = model(x, schedule.model_time(u), aud, kf, torch.full((1,), int(k)),
                             start=None, audio_null=None)
            x0, eps = schedule.x0_eps(x, pred.float(), u)
            a, s = schedule.alpha_sigma(grid[i + 1].expand(1).to(device))
            x = a.view(-1, 1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1, 1) * eps
        out[int(k)] = x[0, 0].cpu()
    return out
