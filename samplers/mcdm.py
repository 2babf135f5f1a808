"""MCDM sampling: clip by clip, any length (paper 002, section 3.5 "Inference").

Bookkeeping, in frames (the model's clip holds f = ``config.clip_frames`` frames):

- clip c covers frames ``[c f, (c + 1) f)``; the last clip may run past the requested length (its
  extra frames are neither written nor archived);
- the archived clip (a frames) starts as the reference repeated a times and, after every clip,
  holds the last a generated frames (:func:`roll_archive`): with a > f it keeps frames of
  several past clips, the reference's copies leaving one clip at a time;
- per clip: F_ac from the reference and the archived clip; the motion tokens from the
  present-clip prior (audio slice, image embedding, and the landmark slice ONLY when landmarks
  are given; then the head tokens are the pose guider's, not sampled); then the video clip;
- the temporal layer's memory restarts at every clip (as in the paper's training); nothing else
  is carried, so memory does not grow with length: the state is the archived clip, one clip of
  latents, and the per-frame audio features (a few floats per frame) held for the whole video.

Audio-to-frame alignment: frame j shows the audio samples ``[j sr / fps, (j + 1) sr / fps)``
(features and the written audio chunks use the same rule).

CHOSEN where the paper is silent: DDIM (eta 0) on SD1.5's training betas, 25 steps for the video
and 25 for the motion prior, no classifier-free guidance (the training drops no condition of the
denoiser; the prior's landmark dropout only makes the landmark-free mode a trained one).

Seams (the "gaps" MTA is said to remove, section 3.4): :func:`seam_metric` compares the jump
across a clip boundary (first new frame vs. the previous clip's last frame) with the mean jump
between consecutive frames inside the new clip; :class:`SeamStats` keeps running sums only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from samplers.schedules import DEFAULT_SCHEDULE, make_scheduler, scheduler_step

ARCHIVED_CLIP_MODES = ("rolling", "reference")


@dataclass(frozen=True)
class MCDMSettings:
    steps: int = 25               # chosen: video DDIM steps
    prior_steps: int = 25         # chosen: motion-prior DDIM steps
    # DDIM's predicted x0 clamped to [-r, r] (None: not clamped, the default). An undertrained
    # epsilon model's x0 estimate at high noise is its epsilon error times sqrt(1 - abar) /
    # sqrt(abar) (~100x at t = 950), which unclamped sampling can carry to the output.
    clip_video: float | None = None
    clip_prior: float | None = None

    def __post_init__(self):
        for name in ("steps", "prior_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("clip_video", "clip_prior"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value}")


def _ddim(steps: int, clip: float | None):
    """The DDIM scheduler of the training betas, x0 clamped to [-clip, clip] when given."""
    sched = make_scheduler("ddim", DEFAULT_SCHEDULE, steps)
    if clip is None:
        return sched
    clipped = type(sched).from_config(sched.config, clip_sample=True, clip_sample_range=clip)
    clipped.set_timesteps(steps)
    clipped.avatar_eta = sched.avatar_eta
    return clipped


def initial_archive(reference: torch.Tensor, archived_frames: int) -> torch.Tensor:
    """The first archived clip: the reference [C, S, S] repeated a times -> [a, C, S, S]."""
    return reference[None].repeat(archived_frames, 1, 1, 1)


def roll_archive(archived: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The last a frames of (archived [a, ...] followed by new [k, ...]) -> [a, ...]."""
    a = archived.shape[0]
    return torch.cat([archived, new])[-a:].clone()


def seam_metric(previous_last: torch.Tensor, clip: torch.Tensor) -> tuple[float, float]:
    """(mean |clip[0] - previous_last|, mean over f of mean |clip[f+1] - clip[f]|): the jump at a
    clip boundary and the typical jump inside the clip (NaN for a one-frame clip)."""
    seam = float((clip[0].float() - previous_last.float()).abs().mean())
    if clip.shape[0] < 2:
        return seam, float("nan")
    inner = float((clip[1:].float() - clip[:-1].float()).abs().mean())
    return seam, inner


@dataclass
class SeamStats:
    """Running seam statistics over clip boundaries (constant memory)."""

    boundaries: int = 0
    seam_sum: float = 0.0
    inner_sum: float = 0.0
    seam_max: float = 0.0
    ratios: list = field(default_factory=list)   # only the first ``keep`` boundaries
    keep: int = 64

    def add(self, seam: float, inner: float) -> None:
        self.boundaries += 1
        self.seam_sum += seam
        self.inner_sum += inner
        self.seam_max = max(self.seam_max, seam)
        if len(self.ratios) < self.keep:
            self.ratios.append(seam / inner if inner > 0 else float("inf"))

    def summary(self) -> dict:
        n = max(1, self.boundaries)
        mean_inner = self.inner_sum / n
        return {"boundaries": self.boundaries, "seam_mean": self.seam_sum / n,
                "inner_mean": mean_inner, "seam_max": self.seam_max,
                "seam_to_inner": (self.seam_sum / n) / mean_inner if mean_inner > 0 else None}


def _slice(rows: torch.Tensor, first: int, count: int, pad: str) -> torch.Tensor:
    """rows[first:first+count], padded past the end with zeros or the last row."""
    part = rows[first:first + count]
    short = count - part.shape[0]
    if short <= 0:
        return part
    fill = (rows.new_zeros(short, *rows.shape[1:]) if pad == "zeros" or rows.shape[0] == 0
            else rows[-1:].expand(short, *rows.shape[1:]))
    return torch.cat([part, fill])


def mcdm_sample(model, *, reference: torch.Tensor, image: torch.Tensor, audio: torch.Tensor,
                total_frames: int, landmarks: torch.Tensor | None = None,
                settings: MCDMSettings = MCDMSettings(),
                decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                writer: Callable[[torch.Tensor, int], None] | None = None,
                generator: torch.Generator | None = None, device="cpu", progress: bool = True,
                callback: Callable[[int, dict], None] | None = None,
                archived_clip: str = "rolling") -> dict:
    """Generate ``total_frames`` frames clip by clip; returns {"frames", "clips", "seams"}.

    Args:
        model: an :class:`avatar_models.mcdm.MCDM` (its parts are called directly).
        reference: [C, S, S] reference latent. image: [I] image embedding of the reference.
        audio: [T, A] per-frame audio features (shorter: zero-padded).
        landmarks: [T, P*2] per-frame landmarks, or None (the paper's default).
        decode: latents [k, C, S, S] -> what ``writer`` takes (default: identity).
        writer: ``writer(decoded new frames, first frame index)`` after every clip.
        callback: ``callback(clip_index, {"archived", "f_ac", "motion", "clip"})`` per clip.
        archived_clip: ``"rolling"`` (the paper: the last a generated frames) or ``"reference"``
            (Table 4's w/o F_a and Fig. 5's "without the archived clip" at inference: the
            archived clip stays the repeated reference, so no history reaches the model).
    """
    from tqdm.auto import tqdm

    cfg = model.config
    f, a = cfg.clip_frames, cfg.archived_frames
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if archived_clip not in ARCHIVED_CLIP_MODES:
        raise ValueError(f"archived_clip must be one of {ARCHIVED_CLIP_MODES}, got "
                         f"{archived_clip!r}")
    if reference.shape != (cfg.in_channels, cfg.latent_size, cfg.latent_size):
        raise ValueError(f"reference must be [{cfg.in_channels}, {cfg.latent_size}, "
                         f"{cfg.latent_size}], got {list(reference.shape)}")
    if image.shape != (cfg.image_dim,):
        raise ValueError(f"image must be [{cfg.image_dim}], got {list(image.shape)}")
    if audio.dim() != 2 or audio.shape[1] != cfg.audio_dim:
        raise ValueError(f"audio must be [T, {cfg.audio_dim}], got {list(audio.shape)}")
    if landmarks is not None and (landmarks.dim() != 2 or
                                  landmarks.shape[1] != 2 * cfg.landmark_points):
        raise ValueError(f"landmarks must be [T, {2 * cfg.landmark_points}], got "
                         f"{list(landmarks.shape)}")
    ref = reference.to(device, torch.float32)
    img = image.to(device, torch.float32)[None]                               # [1, I]
    archived = initial_archive(ref, a)                                        # [a, C, S, S]
    video_sched = _ddim(settings.steps, settings.clip_video)
    prior_sched = _ddim(settings.prior_steps, settings.clip_prior)
    clips = -(-total_frames // f)
    seams = SeamStats()
    previous_last = None
    written = 0
    for c in tqdm(range(clips), desc="clips", disable=not progress):
        first = c * f
        aud = _slice(audio.float(), first, f, "zeros")[None].to(device)     # [1, F, A]
        with torch.no_grad():
            f_ac = model.archived_prior(ref[None], archived[None])            # [1, a, n, d]
            head = None
            if landmarks is not None:
                lm = _slice(landmarks.float(), first, f, "last")[None].to(device)
                head = model.pose_guider(lm)                                  # [1, F, k_h, dm]
            z = torch.randn((1, f, cfg.motion_tokens, cfg.motion_dim),
                            generator=generator).to(device)
            for t in prior_sched.timesteps:
                tt = torch.full((1,), int(t), device=device)
                eps = model.present_prior(z, tt, aud, img, head)
                z = scheduler_step(prior_sched, eps, t, z, generator)
            if head is not None:
                z = torch.cat([head, z[:, :, cfg.head_tokens:]], dim=2)       # [1, F, K, dm]
            x = torch.randn((1, f, cfg.in_channels, cfg.latent_size, cfg.latent_size),
                            generator=generator).to(device)
            for t in video_sched.timesteps:
                tt = torch.full((1,), int(t), device=device)
                eps = model.denoiser(x, tt, f_ac, z)
                x = scheduler_step(video_sched, eps, t, x, generator)
        clip = x[0]                                                           # [F, C, S, S]
        keep = min(f, total_frames - first)
        if previous_last is not None:
            seams.add(*seam_metric(previous_last, clip[:keep]))
        if callback is not None:
            callback(c, {"archived": archived, "f_ac": f_ac, "motion": z, "clip": clip})
        if writer is not None:
            with torch.no_grad():
                writer(clip[:keep] if decode is None else decode(clip[:keep]), first)
        written += keep
        previous_last = clip[keep - 1].clone()
        if archived_clip == "rolling":
            archived = roll_archive(archived, clip[:keep])
        del x, z, f_ac, clip
    return {"frames": written, "clips": clips, "seams": seams.summary()}
