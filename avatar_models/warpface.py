"""WarpFace (paper 003): dual latent UNet, WarpCA on ``kernels.warp_occlusion``, and MGME.

Everything works in a codec's latent space (patch-PCA on the toy, SD's VAE for real faces):

- **ReferenceNet** (:class:`LatentUNet`, ``role="reference"``) runs once per source at t = 0 on
  the clean source latent z_s and returns, for every transformer of its down and middle blocks,
  the tokens that enter that transformer's self-attention (after its LayerNorm). Its up blocks
  would never feed DenoisingNet, so they are not built (this project's choice).
- **DenoisingNet** (:class:`LatentUNet`, ``role="denoising"``) predicts eps. Its down and middle
  transformers concatenate the matching reference tokens into the self-attention keys and values
  (mutual self-attention); its middle and up transformers hold a WarpCA layer where SD has its
  text cross-attention (the down blocks have none, section 4.1).
- **WarpCA** (:class:`WarpCA`): theta_t = (1 + gamma(t)) theta + delta(t) (Eq. 9, gamma and delta
  zero-initialised linear maps of the timestep embedding, per layer); cross-attention with the
  hidden states H as queries and the motion as keys/values; two MLPs map the attention output to a
  flow F [B, h, w, 2] (pixels of that map) and an occlusion O = sigmoid(.) [B, h, w, 1]; the output
  is ``kernels.warp_occlusion(H, F, O) = H + O * W(H, F)`` (Eq. 10), the warp acting on H.
  DEVIATION (stated, tested): the motion enters as K tokens, one per group (theta_t split into
  K vectors of D_k, plus a learned group embedding). With the paper's single key, softmax over one
  key is 1 at every pixel, the attention output would be the same vector everywhere and F one
  global shift per layer; with K keys the weights depend on each pixel's query, so F varies.
  ``motion_attention="cross"`` replaces WarpCA by plain cross-attention of the same tokens and
  modulation (Table 3 row 2: H + proj(attention), proj zero-initialised);
  ``time_modulation=False`` drops Eq. 9 (Table 3 row 4).
- **MGME** (:class:`MotionEncoder`, Eqs. 3-8): a ViT over the latent (patch ``vit_patch``,
  fixed 2D sin-cos positions, two learned readout tokens whose final states give f1 and f2),
  only the two output projections zero-initialised; f1, f2 split into K groups; group MLPs give
  theta_(s->r,k) in R^(D_k) and alpha_k in R^(N_k); codebooks C_k [D_k, N_k] orthonormalised by
  ``torch.linalg.qr`` in fp32 at every forward; g_k = C_k^orth alpha_k; theta_(r->s) =
  concat(g_k); transfer theta_(s->d) = theta_(r->d) - theta_(r->s) (Eq. 4).

This is an own UNet-lite with SD1.5's block structure (``paper`` config: widths 320/640/1280/1280,
2 layers per block, 8 heads, attention in the first three levels, GEGLU feed-forward), not
diffusers' ``UNet2DConditionModel``; ``avatar_models/warpface_sd15.py`` maps a local SD1.5 UNet's
weights into both UNets (see docs/warpface.md).

Loss (:func:`warpface_loss`, Eqs. 11-13): per-pixel adaptive weight inside the eps-MSE plus
lambda_sym * ||theta_(s->r) + theta_(r->s)||^2 for source and driving. Condition dropout (CFG):
the unconditional branch is theta_(s->d) = 0 (appendix D's null motion, which reproduces the
source); the reference features are kept.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import kernels
from avatar_models.layers import Attention, Mlp, TimestepEmbedder, sincos_2d
from avatar_models.layers.named_config import NamedConfig
from avatar_models.layers.unet_lite import (
    Downsample,
    GegluFeedForward,
    ResBlock,
    Upsample,
    group_norm,
)
from avatar_models.training.diffusion import DiffusionSchedule, GaussianDiffusion

MOTION_ATTENTIONS = ("warpca", "cross")
FEED_FORWARDS = ("gelu", "geglu")


@dataclass(frozen=True)
class WarpFaceConfig(NamedConfig):
    """Architecture. ``from_name``: ``tiny`` (CPU tests, 16x16 patch-PCA latents) and ``paper``
    (256 px through SD's VAE: 4 x 32 x 32 latents, SD1.5 UNet shape, K=4, N_k=128, D_k=256,
    ViT 6 x 256)."""

    name: str = "custom"
    in_channels: int = 8
    latent_size: int = 16
    channels: tuple = (32, 64)              # per UNet level
    attention_levels: tuple = (True, True)  # levels with transformers (SD: last has none)
    layers_per_block: int = 1
    heads: int = 2
    groups: int = 4                         # K
    codebook_size: int = 16                 # N_k
    group_dim: int = 16                     # D_k
    vit_depth: int = 2
    vit_width: int = 64
    vit_heads: int = 4
    vit_patch: int = 2
    group_hidden: int = 64                  # hidden width of the group MLPs
    flow_hidden: int = 32                   # hidden width of the flow / occlusion MLPs
    motion_attention: str = "warpca"        # "warpca" or "cross" (Table 3 row 2)
    time_modulation: bool = True            # Eq. 9 (False: Table 3 row 4)
    occlusion_init_logit: float = -4.0      # O = sigmoid(-4) = 0.018 at init (see docs)
    motion_out_init_std: float = 0.0        # flow MLP's last / plain CA's proj weight: N(0, std)
    feed_forward: str = "gelu"              # transformer MLP: "gelu" (tiny) or SD's "geglu"
    transformer_norm_eps: float = 1e-5      # the transformers' GroupNorm eps (SD: 1e-6)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085             # SD1.5's scaled-linear schedule
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention_levels",
                           tuple(bool(a) for a in self.attention_levels))
        if self.feed_forward not in FEED_FORWARDS:
            raise ValueError(f"feed_forward must be one of {FEED_FORWARDS}, got "
                             f"{self.feed_forward!r}")
        if not self.motion_out_init_std >= 0:
            raise ValueError(f"motion_out_init_std must be >= 0, got {self.motion_out_init_std}")
        if not self.transformer_norm_eps > 0:
            raise ValueError(f"transformer_norm_eps must be > 0, got {self.transformer_norm_eps}")
        if self.motion_attention not in MOTION_ATTENTIONS:
            raise ValueError(f"motion_attention must be one of {MOTION_ATTENTIONS}, got "
                             f"{self.motion_attention!r}")
        for field in ("in_channels", "latent_size", "layers_per_block", "heads", "groups",
                      "codebook_size", "group_dim", "vit_depth", "vit_width", "vit_heads",
                      "vit_patch", "group_hidden", "flow_hidden", "num_train_timesteps"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not self.channels or len(self.attention_levels) != len(self.channels):
            raise ValueError(f"attention_levels must have one entry per level of channels "
                             f"{self.channels}, got {self.attention_levels}")
        if self.codebook_size > self.group_dim:
            raise ValueError(f"codebook_size N_k must be <= group_dim D_k (QR gives at most D_k "
                             f"orthonormal vectors in R^D_k), got N_k={self.codebook_size}, "
                             f"D_k={self.group_dim}")
        if self.vit_width % self.groups:
            raise ValueError(f"vit_width must be divisible by groups K={self.groups} (f1, f2 "
                             f"are split into K groups), got {self.vit_width}")
        if self.latent_size % self.vit_patch:
            raise ValueError(f"latent_size must be a multiple of vit_patch={self.vit_patch}, "
                             f"got {self.latent_size}")
        factor = 2 ** (len(self.channels) - 1)
        if self.latent_size % factor:
            raise ValueError(f"latent_size must be a multiple of 2^(levels-1) = {factor}, got "
                             f"{self.latent_size}")
        for what, width, heads in [*(("UNet width", c, self.heads) for c in self.channels),
                                   ("vit_width", self.vit_width, self.vit_heads)]:
            head_dim = width // heads
            if width % heads or head_dim % 8 or head_dim > 256:
                raise ValueError(f"{what} {width} / {heads} heads must give a head dim that is "
                                 f"a multiple of 8 and <= 256 (kernels.attention3d), got "
                                 f"{width / heads:g}")
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got "
                             f"{self.beta_schedule!r}")

    @property
    def motion_dim(self) -> int:
        """D_m = K * D_k."""
        return self.groups * self.group_dim

    @property
    def temb_dim(self) -> int:
        return 4 * self.channels[0]

    def diffusion_schedule(self) -> DiffusionSchedule:
        return DiffusionSchedule(self.num_train_timesteps, self.beta_start, self.beta_end,
                                 self.beta_schedule)


NAMED_CONFIGS: dict[str, dict] = {
    "tiny": dict(in_channels=8, latent_size=16, channels=(32, 64), attention_levels=(True, True),
                 layers_per_block=1, heads=2, groups=4, codebook_size=16, group_dim=16,
                 vit_depth=2, vit_width=64, vit_heads=4, vit_patch=2, group_hidden=64,
                 flow_hidden=32),
    # SD1.5 UNet on 256 px (32 x 32 x 4 latents), shapes equal to SD1.5's so that
    # avatar_models/warpface_sd15.py loads its weights; MGME as in section 4.1 and appendix C.
    "paper": dict(in_channels=4, latent_size=32, channels=(320, 640, 1280, 1280),
                  attention_levels=(True, True, True, False), layers_per_block=2, heads=8,
                  feed_forward="geglu", transformer_norm_eps=1e-6,
                  groups=4, codebook_size=128, group_dim=256, vit_depth=6, vit_width=256,
                  vit_heads=4, vit_patch=2, group_hidden=256, flow_hidden=128),
}
WarpFaceConfig.SYSTEM, WarpFaceConfig.NAMED = 'warpface', NAMED_CONFIGS


def _heads_attention(q, k, v, heads: int, backend: str | None) -> torch.Tensor:
    """q [B, N, C], k/v [B, M, C] -> [B, N, C] through ``kernels.attention3d``."""
    b, n, c = q.shape
    m = k.shape[1]
    d = c // heads
    o = kernels.attention3d(q.reshape(b, n, heads, d), k.reshape(b, m, heads, d).to(q.dtype),
                            v.reshape(b, m, heads, d).to(q.dtype), backend=backend)  # [B,N,H,D]
    return o.reshape(b, n, c)


# ---------------------------------------------------------------------------------------------
# motion layers


class TimeModulation(nn.Module):
    """Eq. 9: theta_t = (1 + gamma(t)) theta + delta(t); gamma, delta zero-initialised linears of
    SiLU(timestep embedding), so theta_t = theta at init."""

    def __init__(self, temb_dim: int, motion_dim: int):
        super().__init__()
        self.gamma = nn.Linear(temb_dim, motion_dim)
        self.delta = nn.Linear(temb_dim, motion_dim)

    def reset_parameters(self) -> None:
        for layer in (self.gamma, self.delta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def scale_shift(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = nn.functional.silu(temb)
        return self.gamma(e), self.delta(e)                               # [B, Dm] each

    def forward(self, theta: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        gamma, delta = self.scale_shift(temb)
        return (1 + gamma) * theta + delta                                # [B, Dm]


class MotionTokens(nn.Module):
    """theta [B, K*D_k] -> K tokens [B, K, D_k] (+ a learned embedding per group), optionally
    time-modulated first (Eq. 9)."""

    def __init__(self, cfg: WarpFaceConfig):
        super().__init__()
        self.groups, self.group_dim = cfg.groups, cfg.group_dim
        self.modulation = (TimeModulation(cfg.temb_dim, cfg.motion_dim)
                           if cfg.time_modulation else None)
        self.group_embed = nn.Parameter(torch.zeros(cfg.groups, cfg.group_dim))

    def reset_parameters(self) -> None:
        if self.modulation is not None:
            self.modulation.reset_parameters()
        nn.init.normal_(self.group_embed, std=0.02)

    def forward(self, theta: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.modulation is not None:
            theta = self.modulation(theta, temb)                          # [B, Dm]
        tokens = theta.view(theta.shape[0], self.groups, self.group_dim)  # [B, K, Dk]
        return tokens + self.group_embed


class WarpCA(nn.Module):
    """Warping-enhanced cross-attention (Eq. 9-10) on tokens x [B, h*w, C] of an h x w map.

    ``attention="cross"``: plain cross-attention of the same tokens and modulation instead,
    x + proj(attention) with a zero-initialised proj (Table 3's CA arm)."""

    def __init__(self, cfg: WarpFaceConfig, dim: int, *, attention_backend: str | None = None,
                 warp_backend: str | None = None):
        super().__init__()
        self.cfg, self.heads = cfg, cfg.heads
        self.attention_backend, self.warp_backend = attention_backend, warp_backend
        self.motion = MotionTokens(cfg)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(cfg.group_dim, 2 * dim)
        if cfg.motion_attention == "warpca":
            hid = cfg.flow_hidden
            self.flow_mlp = nn.Sequential(nn.Linear(dim, hid), nn.SiLU(), nn.Linear(hid, 2))
            self.occlusion_mlp = nn.Sequential(nn.Linear(dim, hid), nn.SiLU(),
                                               nn.Linear(hid, 1))
            self.proj = None
        else:
            self.flow_mlp = self.occlusion_mlp = None
            self.proj = nn.Linear(dim, dim)
        self.last_flow = self.last_occlusion = None   # [B, h, w, 2] / [B, h, w, 1] diagnostics

    def reset_parameters(self) -> None:
        """xavier q/kv; the flow MLP's last layer zero (F = 0 at init); the occlusion MLP's last
        layer zero weight and bias ``occlusion_init_logit``; plain CA's proj zero.

        ``motion_out_init_std`` > 0 draws the flow MLP's last weight (plain CA: proj's weight)
        from N(0, std) instead: with both it and MGME's output projections at zero, the gradient
        reaching theta is zero at init and the motion path leaves that saddle only at second
        order (docs/warpface.md, toy results); a small non-zero weight gives MGME a first-order
        gradient from step one."""
        self.motion.reset_parameters()
        for layer in (self.q, self.kv):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        std = self.cfg.motion_out_init_std
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=std) if std else nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
            return
        for mlp in (self.flow_mlp, self.occlusion_mlp):
            nn.init.xavier_uniform_(mlp[0].weight)
            nn.init.zeros_(mlp[0].bias)
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
        if std:
            nn.init.normal_(self.flow_mlp[2].weight, std=std)
        nn.init.constant_(self.occlusion_mlp[2].bias, self.cfg.occlusion_init_logit)

    def flow_occlusion(self, attended: torch.Tensor, h: int, w: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output [B, h*w, C] -> F [B, h, w, 2] fp32 and O [B, h, w, 1] in ``dtype``."""
        b = attended.shape[0]
        grid = attended.view(b, h, w, -1)                                  # [B, h, w, C]
        flow = self.flow_mlp(grid).float()                                 # [B, h, w, 2]
        occlusion = torch.sigmoid(self.occlusion_mlp(grid)).to(dtype)      # [B, h, w, 1]
        return flow, occlusion

    def forward(self, x: torch.Tensor, theta: torch.Tensor, temb: torch.Tensor, h: int,
                w: int) -> torch.Tensor:
        b, n, c = x.shape
        tokens = self.motion(theta.to(temb.dtype), temb)                  # [B, K, Dk]
        k, v = self.kv(tokens.to(self.kv.weight.dtype)).chunk(2, dim=-1)  # [B, K, C] each
        q = self.q(self.norm(x))                                          # [B, N, C]
        attended = _heads_attention(q, k, v, self.heads, self.attention_backend)  # [B, N, C]
        if self.proj is not None:
            return x + self.proj(attended)                                # [B, N, C]
        flow, occlusion = self.flow_occlusion(attended, h, w, x.dtype)
        self.last_flow, self.last_occlusion = flow.detach(), occlusion.detach()
        hidden = x.reshape(b, h, w, c).contiguous()                       # [B, h, w, C]
        out = kernels.warp_occlusion(hidden, flow, occlusion,
                                     backend=self.warp_backend)           # [B, h, w, C]
        return out.reshape(b, n, c)


# ---------------------------------------------------------------------------------------------
# UNet-lite with mutual self-attention and WarpCA


class SelfAttention(nn.Module):
    """Self-attention whose keys and values may take extra (reference) tokens."""

    def __init__(self, dim: int, heads: int, backend: str | None = None):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        kv_in = x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1)  # [B, N(+R), C]
        k, v = self.kv(kv_in).chunk(2, dim=-1)
        return self.proj(_heads_attention(self.q(x), k, v, self.heads, self.backend))


class Transformer(nn.Module):
    """SD's Transformer2DModel, one block: GroupNorm + proj_in, self-attention (mutual with the
    reference when given), WarpCA / cross-attention (when ``motion``), MLP, proj_out, residual."""

    def __init__(self, cfg: WarpFaceConfig, dim: int, *, motion: bool,
                 attention_backend: str | None = None, warp_backend: str | None = None):
        super().__init__()
        self.norm = group_norm(dim, eps=cfg.transformer_norm_eps)
        self.proj_in = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, cfg.heads, attention_backend)
        self.motion = (WarpCA(cfg, dim, attention_backend=attention_backend,
                              warp_backend=warp_backend) if motion else None)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = Mlp(dim, 4 * dim) if cfg.feed_forward == "gelu" else GegluFeedForward(dim,
                                                                                      4 * dim)
        self.proj_out = nn.Linear(dim, dim)

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w] -> the tokens entering self-attention [B, h*w, C] (what ReferenceNet
        shares)."""
        return self.norm1(self.proj_in(self.norm(x).flatten(2).transpose(1, 2)))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, *, theta: torch.Tensor | None = None,
                reference: torch.Tensor | None = None, record: list | None = None
                ) -> torch.Tensor:
        b, c, h, w = x.shape
        tok = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))       # [B, N, C]
        normed = self.norm1(tok)                                          # [B, N, C]
        if record is not None:
            record.append(normed)
        tok = tok + self.attn(normed, reference)                          # [B, N, C]
        if self.motion is not None:
            tok = self.motion(tok, theta, temb, h, w)                     # [B, N, C]
        tok = tok + self.ff(self.norm3(tok))                              # [B, N, C]
        out = self.proj_out(tok).transpose(1, 2).reshape(b, c, h, w)      # [B, C, h, w]
        return x + out


class LatentUNet(nn.Module):
    """SD-structured UNet-lite. ``role="reference"``: down + middle blocks only, returns the
    self-attention inputs of their transformers; ``role="denoising"``: the full UNet, mutual
    self-attention in down + middle, WarpCA in middle + up, returns eps."""

    def __init__(self, cfg: WarpFaceConfig, role: str, *, attention_backend: str | None = None,
                 warp_backend: str | None = None):
        super().__init__()
        if role not in ("reference", "denoising"):
            raise ValueError(f"role must be 'reference' or 'denoising', got {role!r}")
        self.cfg, self.role = cfg, role
        denoise = role == "denoising"
        kw = dict(attention_backend=attention_backend, warp_backend=warp_backend)
        ch, temb = cfg.channels, cfg.temb_dim
        self.t_embed = TimestepEmbedder(temb, freq_dim=ch[0])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, cur = [ch[0]], ch[0]
        for level, (width, attn) in enumerate(zip(ch, cfg.attention_levels)):
            layers = nn.ModuleList()
            for _ in range(cfg.layers_per_block):
                layers.append(nn.ModuleList([
                    ResBlock(cur, width, temb),
                    Transformer(cfg, width, motion=False, **kw) if attn else nn.Identity()]))
                cur = width
                skips.append(cur)
            stage = nn.ModuleDict({"layers": layers})
            if level < len(ch) - 1:
                stage["down"] = Downsample(cur)
                skips.append(cur)
            self.down.append(stage)
        self.mid_res1 = ResBlock(cur, cur, temb)
        self.mid_attn = Transformer(cfg, cur, motion=denoise, **kw)
        self.mid_res2 = ResBlock(cur, cur, temb) if denoise else None
        self.up = nn.ModuleList()
        if denoise:
            for level in reversed(range(len(ch))):
                width, attn = ch[level], cfg.attention_levels[level]
                layers = nn.ModuleList()
                for _ in range(cfg.layers_per_block + 1):
                    layers.append(nn.ModuleList([
                        ResBlock(cur + skips.pop(), width, temb),
                        Transformer(cfg, width, motion=True, **kw) if attn else nn.Identity()]))
                    cur = width
                stage = nn.ModuleDict({"layers": layers})
                if level > 0:
                    stage["up"] = Upsample(cur)
                self.up.append(stage)
            self.norm_out = group_norm(cur)
            self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)

    def reset_parameters(self) -> None:
        """Default torch init everywhere, then the zero / special inits of the new parts and
        SD's zero-initialised output convolution of the denoiser."""
        self.t_embed.reset_parameters()
        for module in self.modules():
            if isinstance(module, WarpCA):
                module.reset_parameters()
        if self.role == "denoising":
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def transformers(self, where: str) -> list[Transformer]:
        """The transformers of the ``down``, ``mid`` or ``up`` blocks, in forward order."""
        if where == "mid":
            return [self.mid_attn]
        stages = self.down if where == "down" else self.up
        return [attn for stage in stages for _, attn in stage["layers"]
                if isinstance(attn, Transformer)]

    def forward(self, z: torch.Tensor, t: torch.Tensor, theta: torch.Tensor | None = None,
                reference: list[torch.Tensor] | None = None):
        temb = self.t_embed(t.float())                                    # [B, T]
        x = self.conv_in(z)                                               # [B, C0, H, W]
        record = [] if self.role == "reference" else None
        refs = iter(reference) if reference is not None else None

        def attend(attn, x, **kwargs):     # down and middle transformers: mutual attention
            if not isinstance(attn, Transformer):
                return x
            ref = next(refs) if refs is not None else None
            return attn(x, temb, reference=ref, record=record, **kwargs)

        skips = [x]
        for stage in self.down:
            for res, attn in stage["layers"]:
                x = attend(attn, res(x, temb))                            # [B, Cl, Hl, Wl]
                skips.append(x)
            if "down" in stage:
                x = stage["down"](x)                                      # [B, Cl, Hl/2, Wl/2]
                skips.append(x)
        x = self.mid_res1(x, temb)
        if self.role == "reference":          # nothing after this input reaches DenoisingNet
            return record + [self.mid_attn.attention_input(x)]
        x = attend(self.mid_attn, x, theta=theta)                         # [B, Cm, Hm, Wm]
        x = self.mid_res2(x, temb)
        for stage in self.up:
            for res, attn in stage["layers"]:
                x = res(torch.cat([x, skips.pop()], dim=1), temb)         # [B, Cl, Hl, Wl]
                if isinstance(attn, Transformer):
                    x = attn(x, temb, theta=theta)
            if "up" in stage:
                x = stage["up"](x)                                        # [B, Cl, 2Hl, 2Wl]
        return self.conv_out(nn.functional.silu(self.norm_out(x)))       # [B, Cin, H, W]


# ---------------------------------------------------------------------------------------------
# MGME


@dataclass
class MotionCode:
    """MGME's output for a batch of images."""

    theta_sr: torch.Tensor    # [B, Dm] theta_(s->r), predicted directly
    theta_rs: torch.Tensor    # [B, Dm] theta_(r->s) = concat(g_k)
    alpha: torch.Tensor       # [B, K, N_k]
    groups: torch.Tensor      # [B, K, D_k] g_k


class GroupedMLP(nn.Module):
    """K independent 2-layer SiLU MLPs applied to x [B, K, in] -> [B, K, out]."""

    def __init__(self, groups: int, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(groups, dim_in, hidden))
        self.b1 = nn.Parameter(torch.zeros(groups, hidden))
        self.w2 = nn.Parameter(torch.empty(groups, hidden, dim_out))
        self.b2 = nn.Parameter(torch.zeros(groups, dim_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2):
            bound = (6.0 / (w.shape[1] + w.shape[2])) ** 0.5
            nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(torch.einsum("bki,kih->bkh", x, self.w1) + self.b1)  # [B, K, hid]
        return torch.einsum("bkh,kho->bko", h, self.w2) + self.b2                    # [B, K, out]


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))                                  # [B, N, D]
        return x + self.mlp(self.norm2(x))                                # [B, N, D]


class MotionEncoder(nn.Module):
    """MGME (Eqs. 5-8): latent [B, C, H, W] -> :class:`MotionCode`."""

    def __init__(self, cfg: WarpFaceConfig, *, attention_backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.vit_width, cfg.vit_patch
        self.patch = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        grid = cfg.latent_size // p
        self.register_buffer("pos", sincos_2d(grid, grid, d).float()[None], persistent=False)
        self.readout = nn.Parameter(torch.zeros(1, 2, d))                 # [f1], [f2] tokens
        self.blocks = nn.ModuleList(ViTBlock(d, cfg.vit_heads, attention_backend)
                                    for _ in range(cfg.vit_depth))
        self.norm = nn.LayerNorm(d)
        self.out1 = nn.Linear(d, d)
        self.out2 = nn.Linear(d, d)
        gf = d // cfg.groups
        self.mlp_theta = GroupedMLP(cfg.groups, gf, cfg.group_hidden, cfg.group_dim)
        self.mlp_alpha = GroupedMLP(cfg.groups, gf, cfg.group_hidden, cfg.codebook_size)
        self.codebooks = nn.Parameter(torch.empty(cfg.groups, cfg.group_dim, cfg.codebook_size))

    def reset_parameters(self) -> None:
        """Default init, readout tokens N(0, 0.02), codebooks N(0, 1); only the two output
        projections zero (an all-zero ViT would get no gradient)."""
        nn.init.normal_(self.readout, std=0.02)
        nn.init.normal_(self.codebooks)
        for layer in (self.out1, self.out2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def orthonormal_codebooks(self) -> torch.Tensor:
        """C_k^orth = Q of QR(C_k), [K, D_k, N_k], fp32 (bf16 QR does not exist on CPU)."""
        k, dk, nk = self.codebooks.shape
        if nk > dk:
            raise ValueError(f"codebooks must have N_k <= D_k, got N_k={nk}, D_k={dk}")
        with torch.autocast(self.codebooks.device.type, enabled=False):
            q, _ = torch.linalg.qr(self.codebooks.float())                # [K, Dk, Nk]
        return q

    def features(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f1, f2 [B, K, d/K]: the final states of the two readout tokens, projected."""
        b = z.shape[0]
        x = self.patch(z).flatten(2).transpose(1, 2) + self.pos.to(z.dtype)  # [B, P, d]
        x = torch.cat([self.readout.expand(b, -1, -1).to(x.dtype), x], dim=1)  # [B, 2+P, d]
        for block in self.blocks:
            x = block(x)                                                  # [B, 2+P, d]
        x = self.norm(x)
        k = self.cfg.groups
        f1 = self.out1(x[:, 0]).view(b, k, -1)                            # [B, K, d/K]
        f2 = self.out2(x[:, 1]).view(b, k, -1)                            # [B, K, d/K]
        return f1, f2

    def forward(self, z: torch.Tensor) -> MotionCode:
        cfg = self.cfg
        if z.dim() != 4 or tuple(z.shape[1:]) != (cfg.in_channels, cfg.latent_size,
                                                  cfg.latent_size):
            raise ValueError(f"z must be [B, {cfg.in_channels}, {cfg.latent_size}, "
                             f"{cfg.latent_size}], got {list(z.shape)}")
        f1, f2 = self.features(z)
        theta_sr = self.mlp_theta(f1).float().flatten(1)                  # [B, Dm]
        alpha = self.mlp_alpha(f2).float()                                # [B, K, Nk]
        groups = torch.einsum("kdn,bkn->bkd", self.orthonormal_codebooks(), alpha)  # [B, K, Dk]
        # own storage, not views: FSDP2 warns that in-place ops on a view a wrapped module
        # returns would skip its pre-backward hook (a few hundred floats per image to copy)
        groups = groups.clone(memory_format=torch.contiguous_format)
        return MotionCode(theta_sr.clone(), groups.flatten(1).clone(), alpha, groups)


def transfer(theta_rd: torch.Tensor, theta_rs: torch.Tensor) -> torch.Tensor:
    """Eq. 4: theta_(s->d) = theta_(r->d) - theta_(r->s)."""
    return theta_rd - theta_rs


# ---------------------------------------------------------------------------------------------
# the whole model


class WarpFace(nn.Module):
    """ReferenceNet + DenoisingNet + MGME (see the module docstring)."""

    def __init__(self, config: WarpFaceConfig, *, attention_backend: str | None = None,
                 warp_backend: str | None = None):
        super().__init__()
        self.config = config
        kw = dict(attention_backend=attention_backend, warp_backend=warp_backend)
        self.reference_net = LatentUNet(config, "reference", **kw)
        self.denoising_net = LatentUNet(config, "denoising", **kw)
        self.mgme = MotionEncoder(config, attention_backend=attention_backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reference_net.reset_parameters()
        self.denoising_net.reset_parameters()
        self.mgme.reset_parameters()

    def reference_features(self, source: torch.Tensor) -> list[torch.Tensor]:
        """ReferenceNet at t = 0 on clean source latents [B, C, H, W] -> one token tensor
        [B, N_l, C_l] per down / middle transformer (cache it across steps and frames)."""
        t = torch.zeros(source.shape[0], device=source.device)
        return self.reference_net(source, t)

    def motion(self, z: torch.Tensor) -> MotionCode:
        return self.mgme(z)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, theta: torch.Tensor | None = None,
                reference: list[torch.Tensor] | None = None, *, pair: dict | None = None):
        """eps prediction: z_t [B, C, H, W], t [B], theta_(s->d) [B, Dm], reference features
        (:meth:`reference_features`, batch B or 1) -> [B, C, H, W].

        Training (``pair`` given, theta and reference None): the whole pass in this one call, so
        DDP / FSDP2 wrappers see every parameter used. ``pair``: ``source`` (clean latents, for
        ReferenceNet), ``source_motion`` and ``driving_motion`` (MGME's inputs), ``drop`` [B]
        bool (theta_(s->d) = 0 there). Returns (eps, source MotionCode, driving MotionCode)."""
        if pair is not None:
            code_s = self.motion(pair["source_motion"])
            code_d = self.motion(pair["driving_motion"])
            theta = transfer(code_d.theta_rs, code_s.theta_rs)           # [B, Dm]
            theta = torch.where(pair["drop"][:, None], torch.zeros_like(theta), theta)
            eps = self(z_t, t, theta, self.reference_features(pair["source"]))
            return eps, code_s, code_d
        b = z_t.shape[0]
        if theta is None or reference is None:
            raise ValueError("forward needs theta and reference (sampling) or pair (training)")
        if theta.shape != (b, self.config.motion_dim):
            raise ValueError(f"theta must be [{b}, {self.config.motion_dim}], got "
                             f"{list(theta.shape)}")
        expected = len(self.denoising_net.transformers("down")) + 1
        if len(reference) != expected:
            raise ValueError(f"reference must hold {expected} token tensors (one per down and "
                             f"middle transformer, from reference_features), got "
                             f"{len(reference)}")
        refs = [r.expand(b, -1, -1) if r.shape[0] == 1 else r for r in reference]
        return self.denoising_net(z_t, t, theta, refs)                   # [B, C, H, W]


# ---------------------------------------------------------------------------------------------
# loss


def adaptive_weight(z_source: torch.Tensor, z_driving: torch.Tensor, tau: float = 0.5,
                    epsilon: float = 2.0) -> torch.Tensor:
    """Eq. 12 per pixel [B, 1, H, W] from clean latents [B, C, H, W] (no gradient).

    delta = ||z_s - z_d|| over channels; mean = its mean over the pair's pixels; weight tau where
    delta <= mean, tau (1 + epsilon delta / mean) elsewhere. mean = 0 (identical latents) gives
    tau everywhere (every delta is 0 <= mean)."""
    with torch.no_grad():
        delta = (z_source.float() - z_driving.float()).norm(dim=1, keepdim=True)  # [B,1,H,W]
        mean = delta.mean(dim=(1, 2, 3), keepdim=True)                   # [B, 1, 1, 1]
        boost = tau * (1 + epsilon * delta / mean.clamp_min(torch.finfo(delta.dtype).tiny))
        return torch.where(delta <= mean, torch.full_like(delta, tau), boost)


def symmetry_loss(code: MotionCode) -> torch.Tensor:
    """Eq. 13: ||theta_(s->r) + theta_(r->s)||^2 per image, averaged over the batch."""
    return (code.theta_sr + code.theta_rs).square().sum(dim=1).mean()


@dataclass(frozen=True)
class WarpFaceTrainConfig:
    """The loss and data choices of a training run (paper values where it gives them)."""

    lambda_sym: float = 0.1
    tau: float = 0.5
    epsilon: float = 2.0
    condition_drop: float = 0.1     # theta_(s->d) = 0 (the CFG unconditional branch)
    min_gap: int = 6                # frames; > 0.2 s at 25 fps
    clip_frames: int = 50           # toy clip length (2 s at 25 fps) pairs are drawn from
    jitter: float = 0.15            # appearance jitter strength of MGME's inputs (0: off)

    def __post_init__(self):
        for name in ("lambda_sym", "tau", "epsilon", "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.condition_drop <= 1:
            raise ValueError(f"condition_drop must be in [0, 1], got {self.condition_drop}")
        if self.min_gap < 1 or self.clip_frames <= self.min_gap:
            raise ValueError(f"need 1 <= min_gap < clip_frames, got min_gap={self.min_gap}, "
                             f"clip_frames={self.clip_frames}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def condition_mask(batch: int, rate: float, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """[batch] bool: the pairs trained unconditionally (theta_(s->d) = 0), each with
    probability ``rate``."""
    return torch.rand(batch, generator=generator) < rate


def warpface_loss(model: WarpFace, train: WarpFaceTrainConfig, batch: dict,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Eq. 11 on a batch of pairs (:class:`WarpFacePairs` layout): ``source``, ``driving``
    [B, C, H, W] clean latents; ``source_motion``, ``driving_motion`` MGME's (jittered) inputs."""
    cfg = getattr(model, "module", model).config
    z_s, z_d = batch["source"].float(), batch["driving"].float()
    b = z_s.shape[0]
    device = z_s.device
    drop = condition_mask(b, train.condition_drop, generator).to(device)
    diffusion = GaussianDiffusion(cfg.diffusion_schedule())
    t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=generator).to(device)
    noise = torch.randn(z_d.shape, generator=generator).to(device)
    z_t = diffusion.q_sample(z_d, t, noise)                               # [B, C, H, W]
    pair = {"source": z_s, "source_motion": batch["source_motion"].float(),
            "driving_motion": batch["driving_motion"].float(), "drop": drop}
    eps, code_s, code_d = model(z_t, t, pair=pair)                        # eps [B, C, H, W]
    weight = adaptive_weight(z_s, z_d, train.tau, train.epsilon)          # [B, 1, H, W]
    ldm = (weight * (eps.float() - noise).square()).mean()
    sym = symmetry_loss(code_s) + symmetry_loss(code_d)
    return {"loss": ldm + train.lambda_sym * sym, "ldm": ldm.detach(), "sym": sym.detach(),
            "dropped": drop.float().mean()}


# ---------------------------------------------------------------------------------------------
# toy data


def appearance_jitter(frames: torch.Tensor, strength: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """PC-AVS-like colour jitter of frames [N, 3, H, W] in [-1, 1], independent per frame:
    brightness shift, contrast and saturation scale, per-channel gain, each up to ``strength``."""
    if strength == 0:
        return frames
    n = frames.shape[0]

    def draw(*shape):
        return (torch.rand(n, *shape, generator=generator) * 2 - 1) * strength

    x = frames
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (1 + draw(1, 1, 1)) * (x - grey)                           # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (1 + draw(1, 1, 1)) * (x - mean)                           # contrast
    x = (x + 1) * (1 + 0.5 * draw(3, 1, 1)) - 1                           # channel gains
    return (x + draw(1, 1, 1)).clamp(-1, 1)                               # brightness


class WarpFacePairs(torch.utils.data.IterableDataset):
    """Endless same-identity (source, driving) pairs from the procedural faces, at least
    ``min_gap`` frames apart in one clip, rendered at 64 px and resized to ``size``.

    Items: ``source``, ``driving``, ``source_motion``, ``driving_motion`` (MGME's inputs:
    independently jittered copies) as codec latents [C, h, w] (pixels [3, size, size] without a
    codec), ``source_params``, ``driving_params`` [8] ground truth and ``identity`` (the
    seed)."""

    def __init__(self, codec=None, *, size: int = 64, min_gap: int = 6, clip_frames: int = 50,
                 jitter: float = 0.15, seed: int = 0, identities: int | None = None):
        from avatar_models.data import procedural_faces as pf

        super().__init__()
        if pf.SIZE % size and size % pf.SIZE:
            raise ValueError(f"size must divide {pf.SIZE} or be a multiple of it, got {size}")
        if not 1 <= min_gap < clip_frames:
            raise ValueError(f"need 1 <= min_gap < clip_frames, got {min_gap}, {clip_frames}")
        self.codec, self.size, self.min_gap, self.clip_frames = codec, size, min_gap, clip_frames
        self.jitter, self.seed = jitter, seed
        self.identities = identities or pf.HELD_OUT_SEED_BASE

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.sample(gen)

    def pair_indices(self, gen: torch.Generator) -> tuple[int, int]:
        """Two frame indices of one clip at least ``min_gap`` apart, uniformly over such pairs."""
        n, g = self.clip_frames, self.min_gap
        pairs = [(i, j) for i in range(n) for j in range(n) if abs(i - j) >= g]
        return pairs[int(torch.randint(len(pairs), (1,), generator=gen))]

    def sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        from avatar_models.data import procedural_faces as pf

        ident_seed, motion_seed = torch.randint(0, 2 ** 31 - 1, (2,), generator=gen).tolist()
        ident_seed %= self.identities
        params = pf.sample_motion(motion_seed, self.clip_frames)
        i, j = self.pair_indices(gen)
        frames, _ = pf.render(pf.sample_identity(ident_seed), params[[i, j]])
        frames = frames * 2 - 1                                           # [2, 3, 64, 64]
        if self.size < pf.SIZE:
            frames = nn.functional.interpolate(frames, size=(self.size, self.size), mode="area")
        elif self.size > pf.SIZE:            # for a VAE codec (f = 8: 128 px -> 16 x 16)
            frames = nn.functional.interpolate(frames, size=(self.size, self.size),
                                               mode="bicubic", align_corners=False).clamp(-1, 1)
        motion = appearance_jitter(frames, self.jitter, gen)              # [2, 3, S, S]
        both = torch.cat([frames, motion])
        if self.codec is not None:
            both = self.codec.encode(both)                                # [4, C, h, w]
        return {"source": both[0], "driving": both[1], "source_motion": both[2],
                "driving_motion": both[3], "source_params": params[i],
                "driving_params": params[j], "identity": torch.tensor(ident_seed)}


def warpface_system(model: WarpFace, dataset, train: WarpFaceTrainConfig,
                    extra: dict | None = None):
    """The engine's view: the model, :func:`warpface_loss`, one parameter group, the data."""
    from avatar_models.training.engine import TrainingSystem

    def loss(wrapped, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return warpface_loss(wrapped, train, batch, generator)

    meta = {"train": train.to_dict(), **(extra or {})}
    # ReferenceNet's middle transformer only supplies its self-attention input: its attention,
    # MLP and output projection are never run and get no gradient
    return TrainingSystem("warpface", model, loss, dataset, config=model.config.to_dict(),
                          metadata=meta, blocks=warpface_blocks, unused_parameters=True)


def warpface_blocks(model: WarpFace) -> list[nn.Module]:
    """The engine's units of activation checkpointing and FSDP2 sharding: every ResBlock, and
    DenoisingNet's transformers (ReferenceNet's record their inputs, so they are not
    recomputed)."""
    net = model.denoising_net
    transformers = net.transformers("down") + net.transformers("mid") + net.transformers("up")
    return [m for m in model.modules() if isinstance(m, ResBlock)] + transformers


def modulation_trends(model: WarpFace, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Appendix D: the mean over layers and dimensions of gamma(t) and delta(t) at each of
    ``timesteps`` [T] -> {"gamma": [T], "delta": [T]} (empty without time modulation)."""
    layers = [m for m in model.denoising_net.modules() if isinstance(m, TimeModulation)]
    if not layers:
        return {}
    with torch.no_grad():
        temb = model.denoising_net.t_embed(timesteps.float())            # [T, temb]
        pairs = [layer.scale_shift(temb) for layer in layers]             # [T, Dm] each
    return {"gamma": torch.stack([g.mean(1) for g, _ in pairs]).mean(0),
            "delta": torch.stack([d.mean(1) for _, d in pairs]).mean(0)}


def motion_json(code: MotionCode, index: int = 0) -> dict:
    """theta_(s->r), theta_(r->s) and alpha per group of image ``index``, as JSON lists."""
    return {"theta_s_to_r": code.theta_sr[index].tolist(),
            "theta_r_to_s": code.theta_rs[index].tolist(),
            "alpha": code.alpha[index].tolist()}


def write_motion_json(code: MotionCode, path: str | Path, index: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(motion_json(code, index)))
    return path
