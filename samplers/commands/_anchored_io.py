"""Real-file plumbing of ``train anchored --data`` and ``sample anchored``: square crops, the
video-folder training transform, and conditioners (source image + driving frames -> G, L_t).

A conditioner is ``fn(source uint8 [H, W, 3], driving uint8 [N, H, W, 3], *, global_dim,
control_dim) -> (global [G], control [N, L])``. Built in: ``clip-landmarks`` (CLIP image
embedding of the source, normalised MediaPipe landmarks of the driving frames); any other is
named ``MODULE:FUNCTION``.
"""

from __future__ import annotations

import argparse
import importlib

import torch


def square_crop(frames: torch.Tensor, landmarks: torch.Tensor | None = None):
    """Centre square crop of uint8 [..., H, W, 3] frames; landmarks [..., 478, 3] (normalised to
    the uncropped frame) are re-normalised to the crop."""
    h, w = frames.shape[-3:-1]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    out = frames[..., top:top + s, left:left + s, :]
    if landmarks is None:
        return out, None
    lm = landmarks.clone().float()
    lm[..., 0] = (lm[..., 0] * w - left) / s
    lm[..., 1] = (lm[..., 1] * h - top) / s
    lm[..., 2] = lm[..., 2] * w / s
    return out, lm


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [..., S, S, 3] -> float [..., 3, size, size] in [-1, 1] (antialiased)."""
    from avatar_models.media import to_model_frames

    x = to_model_frames(frames)
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic",
                                            antialias=True, align_corners=False).clamp(-1, 1)
    return x.reshape(*lead, 3, size, size)


def fill_missing(landmarks: torch.Tensor) -> torch.Tensor:
    """NaN frames (no face) take the nearest frame with a face (all NaN: unchanged)."""
    ok = torch.isfinite(landmarks).flatten(1).all(1)
    if bool(ok.all()) or not bool(ok.any()):
        return landmarks
    good = ok.nonzero().flatten()
    near = good[(torch.arange(len(ok))[:, None] - good[None]).abs().argmin(1)]
    return landmarks[near]


class VideoTransform:
    """VideoFolderDataset sample -> training dict (frames, control, global, mask)."""

    def __init__(self, resolution: int, vae=None, clip=None, latent_factor: int = 8):
        self.resolution, self.vae, self.clip, self.factor = resolution, vae, clip, latent_factor

    @torch.no_grad()
    def __call__(self, sample: dict) -> dict:
        from avatar_models.anchored_diffusion import landmark_control
        from avatar_models.conditioning.face_regions import EXPRESSIVE_REGIONS, region_masks

        frames, lm = square_crop(sample["frames"], sample["landmarks"])
        source, _ = square_crop(sample["source"])
        x = resize_frames(frames, self.resolution)                         # [T, 3, R, R]
        size = self.resolution
        if self.vae is not None:
            x = self.vae.encode(x[None].to(self.vae.device, self.vae.dtype))[0].float().cpu()
            size = x.shape[-1]
        glob = self.clip.encode_images(source).float().cpu()[0]
        mask = region_masks(lm, size, EXPRESSIVE_REGIONS).any(dim=-3)      # [T, h, w]
        return {"frames": x, "control": landmark_control(fill_missing(lm)), "global": glob,
                "mask": mask[:, None].float()}


def video_training_dataset(args: argparse.Namespace):
    from avatar_models.conditioning import CLIPEncoder, FrameVAE
    from avatar_models.data import VideoFolderDataset

    if args.clip is None:
        raise SystemExit("--data needs --clip DIR (CLIP embedding of the source frame)")
    over = dict(item.partition("=")[::2] for item in args.set)
    frames = int(over.get("frames", 4))
    vae = None if args.vae is None else FrameVAE.from_pretrained(args.vae)
    clip = CLIPEncoder.from_pretrained(args.clip)
    transform = VideoTransform(args.resolution, vae=vae, clip=clip)
    dataset = VideoFolderDataset(args.data, frames, mode="nonuniform", with_landmarks=True,
                                 transform=transform)
    return dataset, {"conditioner": args.conditioner or "clip-landmarks", "vae": vae is not None,
                     "resolution": args.resolution}


def clip_landmarks_conditioner(clip_dir, device="cpu"):
    from avatar_models.anchored_diffusion import landmark_control
    from avatar_models.conditioning import CLIPEncoder, detect_landmarks

    if clip_dir is None:
        raise SystemExit("this checkpoint's conditioner is clip-landmarks: pass --clip DIR")
    clip = CLIPEncoder.from_pretrained(clip_dir, device=device)

    @torch.no_grad()
    def conditioner(source, driving, *, global_dim, control_dim):
        src, _ = square_crop(source)
        drv, _ = square_crop(driving)
        g = clip.encode_images(src).float().cpu()[0]
        lm = detect_landmarks(drv, video_mode=True, on_missing="nan")
        return g, landmark_control(fill_missing(lm))

    return conditioner


def load_conditioner(spec: str, clip_dir=None, device="cpu"):
    if spec == "clip-landmarks":
        return clip_landmarks_conditioner(clip_dir, device)
    module, sep, name = spec.partition(":")
    if not sep:
        raise SystemExit(f"conditioner must be 'clip-landmarks' or MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), name)
