"""Frame-wise image VAE (diffusers ``AutoencoderKL``) for video latents.

Conventions: pixels are float ``[B, T, 3, H, W]`` in ``[-1, 1]`` (``x / 127.5 - 1`` from uint8,
see :func:`avatar_models.media.to_model_frames`); latents are ``[B, T, C, H/f, W/f]`` already
multiplied by the VAE's ``scaling_factor`` (and shifted by ``shift_factor`` when the config has
one), i.e. ready for the diffusion model. For Stable Diffusion's VAE, ``C = 4``, ``f = 8`` and
``scaling_factor = 0.18215``. Frames are processed in chunks of ``frames_per_chunk`` so memory
stays bounded for long videos.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL

from avatar_models.conditioning._checks import (
    FrozenModelWrapper,
    check_dim,
    check_dtype,
    check_positive,
    check_rank,
    resolve_model_dir,
)

EXPECTED = ("a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors),"
            " e.g. stabilityai/sd-vae-ft-mse saved with save_pretrained")


class FrameVAE(FrozenModelWrapper):
    """Wraps a frozen ``AutoencoderKL`` (eval mode, no parameter gradients).

    Gradients still flow from ``decode``'s output to its input latents when those require grad.
    """

    def __init__(self, model: AutoencoderKL):
        if not isinstance(model, AutoencoderKL):
            raise TypeError(f"model must be a diffusers AutoencoderKL, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.scaling_factor = float(cfg.scaling_factor)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = 0.0 if shift is None else float(shift)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None, *, subfolder: str | None = None,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> FrameVAE:
        """Load from a local folder (or ``path/subfolder``, e.g. ``subfolder="vae"`` for a full
        Stable Diffusion folder). ``path=None`` reads ``$AVATAR_MODELS_HOME/vae``.

        Raises FileNotFoundError naming the folder when it or its files are missing.
        """
        folder = resolve_model_dir(path, "vae", EXPECTED, subfolder=subfolder)
        model = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                              low_cpu_mem_usage=False, torch_dtype=dtype)
        return cls(model.to(device))

    def _check_video(self, name: str, x: torch.Tensor, channels: int, layout: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        check_rank(name, x, 5, layout)
        check_dim(name, x, 2, channels, layout)
        check_dtype(name, x)

    def encode(self, frames: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None, frames_per_chunk: int = 8,
               output_device: str | torch.device | None = None) -> torch.Tensor:
        """Pixels -> scaled latents.

        Args:
            frames: float ``[B, T, 3, H, W]`` in ``[-1, 1]``; H and W multiples of
                ``downsample_factor``.
            sample: draw from the posterior (``mean + std * eps``) instead of taking its mean.
                The noise is drawn once for the whole tensor, so chunking does not change it.
            generator: for ``sample=True``.
            frames_per_chunk: frames (over B*T) through the encoder at once.
            output_device: where the latents go (default: the VAE's device).

        Returns:
            ``[B, T, C, H/f, W/f]`` in the VAE's dtype.
        """
        layout = "[B, T, 3, H, W]"
        self._check_video("frames", frames, 3, layout)
        check_positive("frames_per_chunk", frames_per_chunk, integer=True)
        b, t, _, h, w = frames.shape
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"frames height and width must be multiples of {f}, got H={h}, W={w}")
        flat = frames.reshape(b * t, 3, h, w)
        out_device = torch.device(output_device) if output_device is not None else self.device
        means, stds = [], []
        for s in range(0, b * t, frames_per_chunk):
            chunk = flat[s:s + frames_per_chunk].to(self.device, self.dtype)
            dist = self.model.encode(chunk).latent_dist
            means.append(dist.mean.to(out_device))
            if sample:
                stds.append(dist.std.to(out_device))
        z = torch.cat(means)
        if sample:
            gen_device = generator.device if generator is not None else out_device
            eps = torch.randn(z.shape, generator=generator, device=gen_device, dtype=z.dtype)
            z = z + torch.cat(stds) * eps.to(out_device)
        z = (z - self.shift_factor) * self.scaling_factor
        return z.reshape(b, t, *z.shape[1:])

    def decode(self, latents: torch.Tensor, *, frames_per_chunk: int = 8, clamp: bool = True,
               output_device: str | torch.device | None = None) -> torch.Tensor:
        """Scaled latents ``[B, T, C, h, w]`` -> pixels float ``[B, T, 3, h*f, w*f]`` in
        ``[-1, 1]`` (clamped unless ``clamp=False``)."""
        layout = f"[B, T, {self.latent_channels}, h, w]"
        self._check_video("latents", latents, self.latent_channels, layout)
        check_positive("frames_per_chunk", frames_per_chunk, integer=True)
        b, t = latents.shape[:2]
        flat = latents.reshape(b * t, *latents.shape[2:])
        out_device = torch.device(output_device) if output_device is not None else self.device
        outs = []
        for s in range(0, b * t, frames_per_chunk):
            z = flat[s:s + frames_per_chunk].to(self.device, self.dtype)
            z = z / self.scaling_factor + self.shift_factor
            x = self.model.decode(z).sample
            outs.append((x.clamp(-1, 1) if clamp else x).to(out_device))
        x = torch.cat(outs)
        return x.reshape(b, t, *x.shape[1:])


class VAECodec:
    """A :class:`FrameVAE` with the patch-PCA codec's interface (what WarpFace's and MCDM's toy
    data take as ``codec``):
    ``encode`` frames [..., 3, H, W] in [-1, 1] -> latents [..., C, H/f, W/f] (posterior mean,
    scaled), ``decode`` back; ``patch`` is the downsampling factor f, ``channels`` C."""

    def __init__(self, vae):
        self.vae = vae
        self.patch, self.channels = vae.downsample_factor, vae.latent_channels

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        lead = frames.shape[:-3]
        z = self.vae.encode(frames.reshape(1, -1, *frames.shape[-3:]), output_device="cpu")
        return z[0].float().reshape(*lead, *z.shape[2:])                 # [..., C, h, w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        lead = latents.shape[:-3]
        x = self.vae.decode(latents.reshape(1, -1, *latents.shape[-3:]), output_device="cpu")
        return x[0].float().reshape(*lead, *x.shape[2:])                 # [..., 3, H, W]
