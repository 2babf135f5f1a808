"""A procedural dataset in the training sample format, for tests and smoke runs (no files).

Each sample is a short clip of Gaussian blobs ("eyes" and a "mouth") on a per-identity
background colour: the blobs move and the mouth opens over time; ``control`` holds the blob
parameters of each frame (the stand-in for landmarks), ``global`` the identity colour code, and
``mask`` marks the blob regions (the stand-in for the expressive landmark regions).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class BlobSequences(Dataset):
    def __init__(self, n: int = 64, *, frames: int = 3, channels: int = 4, size: int = 8,
                 control_dim: int = 12, global_dim: int = 16, seed: int = 0):
        if control_dim < 6:
            raise ValueError(f"control_dim must be >= 6, got {control_dim}")
        self.n, self.frames, self.channels, self.size = n, frames, channels, size
        self.control_dim, self.global_dim, self.seed = control_dim, global_dim, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        t = torch.sort(torch.rand(self.frames, generator=g)).values          # [T] times
        colour = torch.rand(self.channels, generator=g) * 2 - 1               # identity
        phase = torch.rand(2, generator=g) * 6.28
        cx = 0.5 + 0.15 * torch.sin(6.28 * t + phase[0])                      # [T]
        cy = 0.5 + 0.1 * torch.cos(6.28 * t + phase[1])
        mouth = 0.05 + 0.05 * (1 + torch.sin(12.0 * t))                       # opening
        ys, xs = torch.meshgrid(torch.linspace(0, 1, self.size), torch.linspace(0, 1, self.size),
                                indexing="ij")

        def blob(x0, y0, sx, sy):  # [T] params -> [T, H, W]
            return torch.exp(-((xs - x0[:, None, None]) ** 2 / (2 * sx ** 2)
                               + (ys - y0[:, None, None]) ** 2 / (2 * sy[:, None, None] ** 2)))

        eye = torch.full_like(t, 0.06)
        eyes = blob(cx - 0.15, cy - 0.1, 0.06, eye) + blob(cx + 0.15, cy - 0.1, 0.06, eye)
        mouth_map = blob(cx, cy + 0.15, 0.12, mouth)
        face = (eyes + mouth_map).clamp(max=1.0)                              # [T, H, W]
        frames = colour[None, :, None, None] * (1 - face[:, None]) - face[:, None] * 0.8
        control = torch.zeros(self.frames, self.control_dim)
        control[:, :6] = torch.stack([cx, cy, mouth, cx - 0.15, cx + 0.15, cy + 0.15], dim=1)
        glob = torch.zeros(self.global_dim)
        glob[: min(self.channels, self.global_dim)] = colour[: self.global_dim]
        return {"frames": frames.clamp(-1, 1), "control": control * 2 - 1, "global": glob,
                "mask": (face > 0.3).float()[:, None]}


def stats_conditioner(source: torch.Tensor, driving: torch.Tensor, *, global_dim: int,
                      control_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A file-free conditioner for smoke runs: G = the source's mean colour, L_t = a coarse
    luminance grid of each driving frame (padded / truncated to the model's sizes).

    source uint8 [H, W, 3], driving uint8 [N, H, W, 3] -> (G [global_dim], L [N, control_dim]).
    """
    src = source.float().div(127.5).sub(1)                                  # [H, W, 3]
    g = torch.zeros(global_dim)
    g[: min(3, global_dim)] = src.mean(dim=(0, 1))[:global_dim]
    lum = driving.float().div(127.5).sub(1).mean(-1)                         # [N, H, W]
    grid = torch.nn.functional.adaptive_avg_pool2d(lum[:, None], (2, 3)).flatten(1)  # [N, 6]
    ctrl = torch.zeros(driving.shape[0], control_dim)
    k = min(6, control_dim)
    ctrl[:, :k] = grid[:, :k]
    return g, ctrl
