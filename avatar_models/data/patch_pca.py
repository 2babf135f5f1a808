"""A tiny linear autoencoder: per-patch PCA with whitened coefficients.

The demo's stand-in for a VAE (no pretrained weights ship with the project, and a conv VAE would
eat the CPU training budget). Frames ``[N, 3, H, W]`` in [-1, 1] are cut into non-overlapping
``patch x patch`` tiles; each tile (3*patch*patch values) is centred, projected on the top ``k``
principal components of training tiles and divided by each component's standard deviation, giving
latents ``[N, k, H/patch, W/patch]`` with unit variance per channel (what the diffusion noise
schedule expects). Decoding multiplies back and sums the components, so errors in the
low-variance (fine-detail) channels cost little in pixels. The fit is closed-form (an eigen-
decomposition of the tile covariance, seconds on a CPU) and the result is stored as safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class PatchPCA:
    mean: torch.Tensor   # [D], D = 3 * patch * patch
    basis: torch.Tensor  # [D, k] orthonormal columns, by decreasing variance
    std: torch.Tensor    # [k] standard deviation of each coefficient on the training tiles
    patch: int

    @property
    def channels(self) -> int:
        return self.basis.shape[1]

    @classmethod
    def fit(cls, frames: torch.Tensor, components: int, patch: int = 8,
            whiten: bool = True) -> PatchPCA:
        """Principal components of the tiles of ``frames`` [N, 3, H, W] (float64 inside).

        ``whiten``: divide each coefficient by its own standard deviation; otherwise all by one
        constant (their root-mean-square std), which keeps the spectrum's shape."""
        _check_frames(frames, patch)
        dim = 3 * patch * patch
        if not 1 <= components <= dim:
            raise ValueError(f"components: expected 1..{dim}, got {components}")
        tiles = F.unfold(frames.double(), patch, stride=patch).transpose(1, 2).reshape(-1, dim)
        mean = tiles.mean(0)
        centred = tiles - mean
        evals, evecs = torch.linalg.eigh(centred.T @ centred / tiles.shape[0])
        evals, evecs = evals.flip(0)[:components], evecs.flip(1)[:, :components]
        # fix each component's sign (largest-magnitude entry positive): deterministic output
        sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True))).squeeze(0)
        std = evals.clamp_min(1e-8).sqrt()
        if not whiten:
            std = std.pow(2).mean().sqrt().expand(components).clone()
        return cls(mean.float(), (evecs * sign).float(), std.float(), patch)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """[..., 3, H, W] in [-1, 1] -> latents [..., k, H/patch, W/patch]."""
        _check_frames(frames.reshape(-1, *frames.shape[-3:]), self.patch)
        lead, (h, w) = frames.shape[:-3], frames.shape[-2:]
        x = frames.reshape(-1, 3, h, w).to(self.basis.dtype)
        tiles = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)     # [N, L, D]
        z = (tiles - self.mean.to(x.device)) @ self.basis.to(x.device) / self.std.to(x.device)
        z = z.transpose(1, 2).reshape(-1, self.channels, h // self.patch, w // self.patch)
        return z.reshape(*lead, *z.shape[1:])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [..., k, h, w] -> frames [..., 3, h*patch, w*patch] (not clamped)."""
        if latents.shape[-3] != self.channels:
            raise ValueError(f"latents: expected {self.channels} channels [..., k, h, w], got "
                             f"shape {tuple(latents.shape)}")
        lead, (h, w) = latents.shape[:-3], latents.shape[-2:]
        z = latents.reshape(-1, self.channels, h * w).transpose(1, 2).to(self.basis.dtype)
        dev = z.device
        tiles = (z * self.std.to(dev)) @ self.basis.to(dev).T + self.mean.to(dev)  # [N, L, D]
        x = F.fold(tiles.transpose(1, 2), (h * self.patch, w * self.patch), self.patch,
                   stride=self.patch)
        return x.reshape(*lead, *x.shape[1:])

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mean": self.mean.contiguous(), "basis": self.basis.contiguous(),
                   "std": self.std.contiguous()}, str(path),
                  metadata={"format": "avatar-kernels/patch-pca-1",
                            "config": json.dumps({"patch": self.patch})})
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatchPCA:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"patch-PCA autoencoder not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "avatar-kernels/patch-pca-1":
                raise ValueError(f"{path} is not a patch-PCA file (format {meta.get('format')!r})")
            t = {k: f.get_tensor(k) for k in ("mean", "basis", "std")}
        return cls(t["mean"], t["basis"], t["std"], int(json.loads(meta["config"])["patch"]))


def _check_frames(frames: torch.Tensor, patch: int) -> None:
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames: expected shape [N, 3, H, W], got {tuple(frames.shape)}")
    if frames.shape[-1] % patch or frames.shape[-2] % patch:
        raise ValueError(f"frames: H and W must be multiples of patch={patch}, got "
                         f"{tuple(frames.shape[-2:])}")
