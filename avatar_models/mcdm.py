"""MCDM, the motion-priors conditional diffusion model (paper 002, sections 3.1 to 3.5, B.1 to B.3).

Four parts, one module each, held together by :class:`MCDM`:

- :class:`ArchivedClipPrior` (section 3.2, Eq. 1, 2, B.1): latents of the reference frame and of
  the a archived frames (the frozen VAE / codec runs outside the model), two learnable patchify
  layers (conv + flatten, m tokens each), frame-aligned attention with n learnable queries: the
  keys come from the reference tokens for EVERY archived frame (one attention map shared by all
  frames), the values from each archived frame's own tokens, scale sqrt(d). Output
  F_ac [B, a, n, d]. (The paper's "alpha = 16" in section 4.1 is a typo for a = 16.)
- :class:`PresentClipPrior` (section 3.3, B.2): an epsilon diffusion model over per-frame motion
  tokens. Token order within a frame (the order in which the multimodal causal block is causal,
  THIS PROJECT'S INTERPRETATION of "causal"):

      [audio-image FiLM tokens (k_a)] [timestep token (1)] [head (k_h)] [lip (k_l)] [expr (k_e)]

  Without landmarks the head, lip and expression slots hold noisy target tokens; with landmarks
  the head slots hold the clean landmark tokens of the frozen pose guider (a condition) and only
  lip and expression are denoised. L layers, each a multimodal causal transformer block (frames
  folded into the batch, token-causal through ``kernels.frame_causal_attention`` with one "frame
  id" per token) then a temporal interaction block (tokens folded into the batch, full attention
  over the clip's frames).
- :class:`MotionEncoder` x 2 (lip, expression; 4-layer transformers, B.2) and
  :class:`MotionDecoder`, pre-trained in stage 0 on paired clips; :class:`PoseGuider`, a small
  frozen conv encoder of rasterised landmarks (CHOSEN stand-in for AnimateAnyone's guider).
- :class:`Denoiser` (section 3.1): a UNet resembling SD1.5 (diffusers ResnetBlock2D /
  Downsample2D / Upsample2D) whose transformer blocks have four attention layers: spatial
  self-attention, two PARALLEL spatial cross-attentions (archived-clip reference attention to
  all a*n F_ac tokens, present-clip reference attention to the frame's own F_pc tokens) and the
  memory-efficient temporal attention :class:`MemoryTemporalAttention` (Eq. 4, 5).

Identity at init: layers a stage freezes at random init add nothing to the residual stream: the
archived-clip attention's and the temporal layer's output projections start at zero; the
present-clip attention reaches the stream only through the temporal layer.

Noise schedule: SD1.5's DDPM betas as in :class:`avatar_models.training.diffusion.DiffusionSchedule`
(linear 1e-4..0.02, 1000 steps), epsilon prediction, for both the denoiser and the prior.

Training stages (:data:`STAGE_TABLE`, :func:`mcdm_system`): 0 motion encoders, 1 archived-clip
prior (+ denoiser base, chosen), 2 present-clip prior, 3 present-clip attention + temporal layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from avatar_models.layers import Attention, Mlp, TimestepEmbedder, temporal_sincos
from avatar_models.layers.init import vit_init
from avatar_models.layers.named_config import NamedConfig
from avatar_models.layers.unet_lite import GegluFeedForward
from avatar_models.training.diffusion import DiffusionSchedule

TEMPORAL_KINDS = ("performer", "softmax")
UNET_LAYOUTS = ("lite", "sd15")
STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class MCDMConfig(NamedConfig):
    """Architecture. ``from_name``: ``tiny`` (CPU tests) and ``paper`` (512 px, 16-frame clips,
    SD1.5-like widths, a = 16, m = 256, n = 16, L = 8, alpha = 0.1)."""

    name: str = "custom"
    # denoiser (UNet on codec latents [C, S, S])
    in_channels: int = 3
    latent_size: int = 16
    clip_frames: int = 4                 # f, frames per clip
    channels: tuple[int, ...] = (32, 64)
    layers_per_level: int = 1
    heads: int = 2
    groups: int = 8
    # "lite" (the toys): transformer = x + GroupNorm(x) + attentions + MLP, no proj_in / proj_out,
    # a 256-d timestep sinusoid. "sd15": SD1.5's Transformer2DModel (GroupNorm eps 1e-6, 1x1
    # proj_in / proj_out, GEGLU feed-forward), resnet eps 1e-5 and a channels[0]-d sinusoid, so
    # that SD1.5's UNet weights load (avatar_models/mcdm_sd15.py)
    unet_layout: str = "lite"
    attention_levels: tuple[bool, ...] = ()  # levels with transformers; () = all (SD1.5: the
    #                                          last has none; the middle block always has one)
    # memory-efficient temporal attention
    temporal: str = "performer"          # "performer" (MTA) or "softmax" (Table 7 "Vanilla")
    memory: bool = True                  # False: w/o-MTA ablation (Table 4)
    memory_alpha: float = 0.1            # alpha of Eq. 5
    performer_features: int = 16         # M random features
    # archived-clip motion prior
    archived_frames: int = 4             # a
    prior_patch: int = 4                 # m = (latent_size / prior_patch)^2
    prior_dim: int = 32                  # d
    prior_queries: int = 4               # n
    # present-clip motion prior and motion encoders
    motion_dim: int = 32                 # width of a motion token
    head_tokens: int = 2
    lip_tokens: int = 2
    expression_tokens: int = 2
    audio_tokens: int = 2
    audio_dim: int = 4                   # per-frame audio feature (Wav2Vec2 or the toy's)
    image_dim: int = 48                  # image embedding (CLIP or the toy's colour layout)
    landmark_points: int = 20
    landmark_size: int = 16              # raster size of the pose guider's input
    prior_hidden: int = 32
    prior_layers: int = 2                # L
    prior_heads: int = 2
    encoder_layers: int = 4
    encoder_patch: int = 4
    motion_out: int = 5                  # motion decoder output (the toy's expression params)

    def __post_init__(self):
        if self.unet_layout not in UNET_LAYOUTS:
            raise ValueError(f"unet_layout must be one of {UNET_LAYOUTS}, got "
                             f"{self.unet_layout!r}")
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if self.attention_levels and (len(self.attention_levels) != len(self.channels) or any(
                not isinstance(a, bool) for a in self.attention_levels)):
            raise ValueError(f"attention_levels must be empty (every level) or one bool per level "
                             f"of channels {tuple(self.channels)}, got {self.attention_levels}")
        if self.temporal not in TEMPORAL_KINDS:
            raise ValueError(f"temporal must be one of {TEMPORAL_KINDS}, got {self.temporal!r}")
        if not 0.0 <= self.memory_alpha <= 1.0:
            raise ValueError(f"memory_alpha must be in [0, 1], got {self.memory_alpha}")
        for field in ("in_channels", "latent_size", "clip_frames", "layers_per_level", "heads",
                      "groups", "performer_features", "archived_frames", "prior_patch",
                      "prior_dim", "prior_queries", "motion_dim", "head_tokens", "lip_tokens",
                      "expression_tokens", "audio_tokens", "audio_dim", "image_dim",
                      "landmark_points", "landmark_size", "prior_hidden", "prior_layers",
                      "prior_heads", "encoder_layers", "encoder_patch", "motion_out"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive ints, got {self.channels}")
        down = 2 ** (len(self.channels) - 1)
        if self.latent_size % down:
            raise ValueError(f"latent_size must be divisible by 2^(levels-1) = {down}, got "
                             f"{self.latent_size}")
        for what, size, patch in (("prior_patch", self.latent_size, self.prior_patch),
                                  ("encoder_patch", self.latent_size, self.encoder_patch)):
            if size % patch:
                raise ValueError(f"{what} must divide latent_size={size}, got {patch}")
        for c in self.channels:
            if c % self.heads or (c // self.heads) % 8 or c % self.groups:
                raise ValueError(f"every width in channels must split into heads={self.heads} "
                                 f"of a multiple of 8 and into groups={self.groups}, got {c}")
        for what, width, heads in (("motion_dim", self.motion_dim, self.prior_heads),
                                   ("prior_hidden", self.prior_hidden, self.prior_heads)):
            if width % heads or (width // heads) % 8:
                raise ValueError(f"{what}={width} must split into prior_heads={heads} heads "
                                 f"whose width is a multiple of 8")

    @property
    def levels_with_attention(self) -> tuple[bool, ...]:
        """Per level of ``channels``: whether its (resnet, transformer) pairs have the
        transformer."""
        return self.attention_levels or (True,) * len(self.channels)

    @property
    def archived_tokens(self) -> int:
        """m, tokens per archived frame."""
        return (self.latent_size // self.prior_patch) ** 2

    @property
    def motion_tokens(self) -> int:
        """K = k_h + k_l + k_e motion tokens per frame."""
        return self.head_tokens + self.lip_tokens + self.expression_tokens


NAMED_CONFIGS: dict[str, dict] = {
    "tiny": dict(in_channels=3, latent_size=16, clip_frames=4, channels=(32, 64), heads=2,
                 groups=8, archived_frames=4, prior_patch=4, prior_dim=32, prior_queries=4,
                 prior_layers=2),
    # 512 px frames -> SD VAE latents 4 x 64 x 64; SD1.5's UNet layout: widths (320, 640, 1280,
    # 1280), two resnet+transformer pairs per level and none at the last (where SD1.5 has no
    # attention), head dim 40/80/160 (SD1.5: 8 heads); a = 16,
    # m = (64/4)^2 = 256, n = 16, L = 8, alpha = 0.1 (section 4.1); d = 768 and the token counts
    # are CHOSEN (the paper does not give them); Wav2Vec2-base audio (768), CLIP ViT-L image
    # embedding (768), 68 landmarks rasterised at 64 px (chosen).
    "paper": dict(in_channels=4, latent_size=64, clip_frames=16, channels=(320, 640, 1280, 1280),
                  layers_per_level=2, heads=8, groups=32, unet_layout="sd15",
                  attention_levels=(True, True, True, False), performer_features=148,
                  archived_frames=16, prior_patch=4, prior_dim=768, prior_queries=16,
                  motion_dim=768, head_tokens=4, lip_tokens=4, expression_tokens=4,
                  audio_tokens=4, audio_dim=768, image_dim=768, landmark_points=68,
                  landmark_size=64, prior_hidden=768, prior_layers=8, prior_heads=12,
                  encoder_patch=8, motion_out=136),
}
MCDMConfig.SYSTEM, MCDMConfig.NAMED = 'mcdm', NAMED_CONFIGS


def noise_levels(device=None) -> torch.Tensor:
    """alpha_bar_t [1000] of SD1.5's linear DDPM schedule (float32)."""
    betas = DiffusionSchedule().betas()
    return torch.cumprod(1.0 - betas, 0).float().to(device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t [B] integer steps."""
    abar = noise_levels(x0.device)[t].view(-1, *[1] * (x0.dim() - 1))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


# ---------------------------------------------------------------------------------------------
# memory-efficient temporal attention (Eq. 4, 5)


def memory_update(features: torch.Tensor, alpha: float,
                  initial: torch.Tensor | None = None) -> torch.Tensor:
    """M_f for every frame of a clip: features F_ac^ref [B, F, ...] -> M [B, F, ...].

    M_1 = F_ac^ref_1 (Eq. 4) and M_f = alpha M_(f-1) + (1 - alpha) F_ac^ref_f (Eq. 5). The memory
    restarts at every clip (the paper's training; the default at inference too). ``initial``
    (an EXTENSION, not used by the sampler): a memory M_0 carried in, so that M_1 = alpha M_0 +
    (1 - alpha) F_1."""
    out = []
    mem = initial
    for f in range(features.shape[1]):
        cur = features[:, f]
        mem = cur if mem is None else alpha * mem + (1 - alpha) * cur
        out.append(mem)
    return torch.stack(out, dim=1)


class MemoryTemporalAttention(nn.Module):
    """The fourth attention layer: temporal attention over [M_1..M_F ; F_pc^ref_1..F_pc^ref_F].

    Spatial positions are folded into the batch; the sequence is the memory of the clip's f
    frames followed by the present-clip features (sinusoidal temporal positions 0..2f-1) and the
    LOWER half of the output (the present-clip positions) is kept: the paper's "concatenate
    F_pc^ref with M_f ... lower half" read so that the kept half is the present clip (an
    INTERPRETATION). Non-causal (chosen: the paper does not say). Residual: the block adds the
    zero-initialised output projection of the kept half, so the untrained layer is the identity.

    ``temporal="softmax"`` swaps only the attention (``kernels.attention3d``) for the Performer
    (``kernels.performer_attention``; Table 7's "Vanilla"). ``memory=False`` (w/o MTA, Table 4):
    the sequence is F_ac^ref + F_pc^ref over the f frames, no memory, nothing dropped.
    """

    def __init__(self, dim: int, heads: int, *, alpha: float, temporal: str, memory: bool,
                 features: int, seed: int = 0, backend: str | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.alpha, self.temporal, self.memory, self.backend = alpha, temporal, memory, backend
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        gen = torch.Generator().manual_seed(seed)
        # fixed random features, saved with the weights so sampling uses the trained draw
        self.register_buffer("features", kernels.orthogonal_features(features, self.head_dim,
                                                                     generator=gen))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def attend(self, q, k, v):
        """q, k, v [B', T, H, D] -> [B', T, H, D] through the configured kernel."""
        if self.temporal == "performer":
            return kernels.performer_attention(q, k, v, self.features.to(q.dtype), causal=False,
                                               backend=self.backend)
        return kernels.attention3d(q, k, v, backend=self.backend)

    def forward(self, ac: torch.Tensor, pc: torch.Tensor) -> torch.Tensor:
        """ac = F_ac^ref, pc = F_pc^ref [B, F, S, C] -> the residual update [B, F, S, C]."""
        b, f, s, c = pc.shape
        if self.memory:
            seq = torch.cat([memory_update(ac, self.alpha), pc], dim=1)  # [B, 2F, S, C]
        else:
            seq = ac + pc                                                 # [B, F, S, C]
        t = seq.shape[1]
        h = self.norm(seq) + temporal_sincos(t, c).to(seq)[None, :, None]
        h = h.permute(0, 2, 1, 3).reshape(b * s, t, c)                    # [B*S, T, C]
        q, k, v = self.qkv(h).view(b * s, t, 3, self.heads, self.head_dim).unbind(2)
        o = self.attend(q, k, v).reshape(b * s, t, c)                     # [B*S, T, C]
        o = o[:, t - f:]                                                  # present half [B*S, F, C]
        return self.proj(o).view(b, s, f, c).permute(0, 2, 1, 3)          # [B, F, S, C]


# ---------------------------------------------------------------------------------------------
# transformer pieces


class CrossAttention(nn.Module):
    """proj(attention3d(q(LN(x)), k(cond), v(cond))): x [B, N, C], cond [B, M, Cc] -> [B, N, C]."""

    def __init__(self, dim: int, heads: int, cond_dim: int, *, zero_out: bool,
                 backend: str | None = None):
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, dim // heads, backend
        self.zero_out = zero_out
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(cond_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        for layer in (self.q, self.kv, self.proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.zero_out:
            nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = cond.shape[1]
        q = self.q(self.norm(x)).view(b, n, self.heads, self.head_dim)          # [B, N, H, D]
        k, v = self.kv(cond).view(b, m, 2, self.heads, self.head_dim).unbind(2)  # [B, M, H, D]
        o = kernels.attention3d(q, k.to(q.dtype), v.to(q.dtype), backend=self.backend)
        return self.proj(o.reshape(b, n, -1))                                   # [B, N, C]


class TokenBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN x), then x + MLP(LN x). ``causal``: token i sees
    tokens j <= i (``kernels.frame_causal_attention`` with frame id = token index)."""

    def __init__(self, dim: int, heads: int, *, causal: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.causal, self.heads, self.backend = causal, heads, backend
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def reset_parameters(self) -> None:
        vit_init(self)

    def _causal_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        a = self.attn
        q, k, v = a.qkv(x).view(b, n, 3, a.heads, a.head_dim).unbind(2)         # [B, N, H, D]
        ids = torch.arange(n, device=x.device)
        o = kernels.frame_causal_attention(q, k, v, frame_ids=ids, backend=self.backend)
        return a.proj(o.reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + (self._causal_attention(h) if self.causal else self.attn(h))     # [B, N, C]
        return x + self.mlp(self.norm2(x))                                      # [B, N, C]


class MCDMTransformer(nn.Module):
    """The denoiser's transformer block: spatial self-attention, archived-clip and present-clip
    reference attentions (parallel), memory-efficient temporal attention, feed-forward.

    ``unet_layout="sd15"``: SD1.5's Transformer2DModel around them (GroupNorm eps 1e-6, 1x1
    proj_in / proj_out as linears, GEGLU feed-forward), the self-attention and feed-forward in
    SD1.5's places (norm1 / attn1, norm3 / ff) and the two reference attentions where SD1.5's
    text cross-attention was; ``"lite"`` (the toys): no proj_in / proj_out, a GELU MLP."""

    def __init__(self, cfg: MCDMConfig, dim: int, seed: int, backend: str | None = None):
        super().__init__()
        sd15 = cfg.unet_layout == "sd15"
        self.norm_in = nn.GroupNorm(cfg.groups, dim, eps=1e-6 if sd15 else 1e-5)
        self.proj_in = nn.Linear(dim, dim) if sd15 else nn.Identity()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, cfg.heads, backend=backend)
        # archived-clip attention adds to the stream directly (zero-init: identity until stage 1)
        self.archived_attn = CrossAttention(dim, cfg.heads, cfg.prior_dim, zero_out=True,
                                            backend=backend)
        # present-clip attention reaches the stream only through the temporal layer
        self.present_attn = CrossAttention(dim, cfg.heads, cfg.motion_dim, zero_out=False,
                                           backend=backend)
        self.temporal = MemoryTemporalAttention(
            dim, cfg.heads, alpha=cfg.memory_alpha, temporal=cfg.temporal, memory=cfg.memory,
            features=cfg.performer_features, seed=seed, backend=backend)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = GegluFeedForward(dim, 4 * dim) if sd15 else Mlp(dim, 4 * dim)
        self.proj_out = nn.Linear(dim, dim) if sd15 else nn.Identity()

    def reset_parameters(self) -> None:
        for m in (self.norm_in, self.norm_self, self.norm_ff):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        for layer in (self.self_attn.qkv, self.self_attn.proj, *self.ff.children(),
                      self.proj_in, self.proj_out):
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.archived_attn.reset_parameters()
        self.present_attn.reset_parameters()
        self.temporal.reset_parameters()

    def forward(self, x: torch.Tensor, frames: int, f_ac: torch.Tensor,
                f_pc: torch.Tensor) -> torch.Tensor:
        """x [B*F, C, H, W]; f_ac [B, a*n, d]; f_pc [B, F, K, dm] -> [B*F, C, H, W]."""
        bf, c, hh, ww = x.shape
        b = bf // frames
        tok = self.proj_in(self.norm_in(x).flatten(2).transpose(1, 2))       # [B*F, S, C]
        tok = tok + self.self_attn(self.norm_self(tok))
        ac_cond = f_ac.repeat_interleave(frames, dim=0)                      # [B*F, a*n, d]
        ac = self.archived_attn(tok, ac_cond)                                # F_ac^ref [B*F, S, C]
        pc = self.present_attn(tok, f_pc.flatten(0, 1))                      # F_pc^ref [B*F, S, C]
        tok = tok + ac
        s = tok.shape[1]
        upd = self.temporal(ac.view(b, frames, s, c), pc.view(b, frames, s, c))  # [B, F, S, C]
        tok = tok + upd.reshape(bf, s, c)
        tok = self.proj_out(tok + self.ff(self.norm_ff(tok)))
        return x + tok.transpose(1, 2).reshape(bf, c, hh, ww)                # [B*F, C, H, W]


# ---------------------------------------------------------------------------------------------
# denoiser (UNet resembling SD1.5)


class Denoiser(nn.Module):
    """eps(z_t [B, F, C, S, S], t [B], F_ac [B, a, n, d], F_pc [B, F, K, dm]) -> [B, F, C, S, S].

    SD1.5's layout: conv_in; per level ``layers_per_level`` (ResnetBlock2D, MCDMTransformer)
    pairs, the transformer only at ``levels_with_attention`` (SD1.5's lowest level has none),
    and a Downsample2D (not after the last level); a middle (resnet, transformer, resnet); the
    mirrored up path with skip connections and Upsample2D; GroupNorm, SiLU, conv_out (PyTorch's
    default init, as SD's; a zero conv_out would stop every gradient of the first step). SD1.5's
    text cross-attention does not exist here (audio enters only through the present-clip prior).
    With ``unet_layout="sd15"`` the module names and shapes are those that SD1.5's UNet weights
    map onto (:mod:`avatar_models.mcdm_sd15`)."""

    def __init__(self, cfg: MCDMConfig, backend: str | None = None):
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

        super().__init__()
        self.config = cfg
        ch = cfg.channels
        temb = 4 * ch[0]
        sd15 = cfg.unet_layout == "sd15"
        # SD1.5's sinusoid has channels[0] frequencies; the lite toys were trained with 256
        self.t_embed = TimestepEmbedder(temb, freq_dim=ch[0] if sd15 else 256)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        seed = iter(range(10_000))
        # SD1.5's resnets: eps 1e-5 (its norm_eps); lite keeps ResnetBlock2D's default 1e-6
        res_eps = 1e-5 if sd15 else 1e-6

        def res(i, o):
            return ResnetBlock2D(in_channels=i, out_channels=o, temb_channels=temb,
                                 groups=cfg.groups, eps=res_eps)

        def attn(c):
            return MCDMTransformer(cfg, c, next(seed), backend)

        self.down = nn.ModuleList()
        skips = [ch[0]]
        prev = ch[0]
        attend = cfg.levels_with_attention
        for level, c in enumerate(ch):
            pairs = nn.ModuleList()
            for _ in range(cfg.layers_per_level):
                pairs.append(nn.ModuleList([res(prev, c), attn(c)] if attend[level]
                                           else [res(prev, c)]))
                prev = c
                skips.append(c)
            last = level == len(ch) - 1
            sample = nn.Identity() if last else Downsample2D(c, use_conv=True, out_channels=c,
                                                                 name="op")
            if not last:
                skips.append(c)
            self.down.append(nn.ModuleList([pairs, sample]))
        self.mid = nn.ModuleList([res(prev, prev), attn(prev), res(prev, prev)])
        self.up = nn.ModuleList()
        for level, c in reversed(list(enumerate(ch))):
            pairs = nn.ModuleList()
            for _ in range(cfg.layers_per_level + 1):
                r = res(prev + skips.pop(), c)
                pairs.append(nn.ModuleList([r, attn(c)] if attend[level] else [r]))
                prev = c
            sample = nn.Identity() if level == 0 else Upsample2D(c, use_conv=True, out_channels=c)
            self.up.append(nn.ModuleList([pairs, sample]))
        self.norm_out = nn.GroupNorm(cfg.groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def transformers(self) -> Iterator[MCDMTransformer]:
        return (m for m in self.modules() if isinstance(m, MCDMTransformer))

    def reset_parameters(self) -> None:
        self.t_embed.reset_parameters()
        for block in self.transformers():
            block.reset_parameters()

    def forward(self, z: torch.Tensor, t: torch.Tensor, f_ac: torch.Tensor,
                f_pc: torch.Tensor) -> torch.Tensor:
        b, f = z.shape[:2]
        temb = self.t_embed(t.float()).repeat_interleave(f, dim=0)           # [B*F, E]
        ac = f_ac.flatten(1, 2)                                              # [B, a*n, d]
        h = self.conv_in(z.flatten(0, 1))                                    # [B*F, C0, S, S]
        skips = [h]

        def pair(layer: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            h = layer[0](h, temb)                                            # resnet
            return layer[1](h, f, ac, f_pc) if len(layer) > 1 else h         # transformer

        for pairs, sample in self.down:
            for layer in pairs:
                h = pair(layer, h)
                skips.append(h)
            if not isinstance(sample, nn.Identity):
                h = sample(h)
                skips.append(h)
        h = self.mid[0](h, temb)
        h = self.mid[2](self.mid[1](h, f, ac, f_pc), temb)
        for pairs, sample in self.up:
            for layer in pairs:
                h = pair(layer, torch.cat([h, skips.pop()], dim=1))
            if not isinstance(sample, nn.Identity):
                h = sample(h)
        out = self.conv_out(F.silu(self.norm_out(h)))                        # [B*F, C, S, S]
        return out.unflatten(0, (b, f))                                      # [B, F, C, S, S]


# ---------------------------------------------------------------------------------------------
# archived-clip motion prior (Eq. 1, 2)


class ArchivedClipPrior(nn.Module):
    """F_ac [B, a, n, d] from the reference latent [B, C, S, S] and the archived latents
    [B, a, C, S, S] (see the module docstring)."""

    def __init__(self, cfg: MCDMConfig):
        super().__init__()
        d, p = cfg.prior_dim, cfg.prior_patch
        self.dim = d
        self.patchify_ref = nn.Conv2d(cfg.in_channels, d, p, stride=p)      # conv + flatten
        self.patchify_arch = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        self.queries = nn.Parameter(torch.zeros(cfg.prior_queries, d))       # Q [n, d]
        self.w_k = nn.Linear(d, d, bias=False)
        self.w_v = nn.Linear(d, d, bias=False)

    def reset_parameters(self) -> None:
        for conv in (self.patchify_ref, self.patchify_arch):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.queries, std=0.02)
        nn.init.xavier_uniform_(self.w_k.weight)
        nn.init.xavier_uniform_(self.w_v.weight)

    def attention_map(self, reference: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) [B, n, m] with K = F_x W_K: one map for every archived frame.

        Plain torch, not ``kernels.attention3d``: Eq. 2 is single-head with d = 768 in the paper
        config (the kernel takes head dims <= 256), and the map is computed once and reused for
        all a frames, so the a attentions cost one [n, m] softmax plus a batched matmul."""
        f_x = self.patchify_ref(reference).flatten(2).transpose(1, 2)        # F_x [B, m, d]
        k = self.w_k(f_x)                                                    # [B, m, d]
        return torch.softmax(self.queries @ k.transpose(1, 2) / math.sqrt(self.dim), dim=-1)

    def forward(self, reference: torch.Tensor, archived: torch.Tensor) -> torch.Tensor:
        b, a = archived.shape[:2]
        attn = self.attention_map(reference)                                 # [B, n, m]
        f_a = self.patchify_arch(archived.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*a, m, d]
        v = self.w_v(f_a).unflatten(0, (b, a))                               # V_i [B, a, m, d]
        return attn[:, None] @ v                                             # F_ac [B, a, n, d]


# ---------------------------------------------------------------------------------------------
# motion encoders, decoder, pose guider, present-clip prior


class MotionEncoder(nn.Module):
    """Lip or expression encoder: frames [B, F, C, S, S] -> k tokens [B, F, k, dm] per frame
    (patchify, k learned query tokens prepended, ``encoder_layers`` transformer blocks, the query
    tokens read out)."""

    def __init__(self, cfg: MCDMConfig, tokens: int, backend: str | None = None):
        super().__init__()
        d = cfg.motion_dim
        grid = cfg.latent_size // cfg.encoder_patch
        self.patch = nn.Conv2d(cfg.in_channels, d, cfg.encoder_patch, stride=cfg.encoder_patch)
        self.queries = nn.Parameter(torch.zeros(tokens, d))
        self.pos = nn.Parameter(torch.zeros(tokens + grid * grid, d))
        self.blocks = nn.ModuleList(TokenBlock(d, cfg.prior_heads, backend=backend)
                                    for _ in range(cfg.encoder_layers))
        self.norm = nn.LayerNorm(d)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        nn.init.normal_(self.queries, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        for block in self.blocks:
            block.reset_parameters()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, f = frames.shape[:2]
        k = self.queries.shape[0]
        tok = self.patch(frames.flatten(0, 1)).flatten(2).transpose(1, 2)   # [B*F, P, dm]
        tok = torch.cat([self.queries.expand(b * f, -1, -1), tok], dim=1) + self.pos
        for block in self.blocks:
            tok = block(tok)
        return self.norm(tok[:, :k]).unflatten(0, (b, f))                    # [B, F, k, dm]


class MotionDecoder(nn.Module):
    """Lip and expression tokens [B, F, k_l, dm], [B, F, k_e, dm] -> facial motion [B, F, out]."""

    def __init__(self, cfg: MCDMConfig):
        super().__init__()
        width = (cfg.lip_tokens + cfg.expression_tokens) * cfg.motion_dim
        self.net = nn.Sequential(nn.Linear(width, 2 * cfg.motion_dim), nn.SiLU(),
                                 nn.Linear(2 * cfg.motion_dim, cfg.motion_out))

    def reset_parameters(self) -> None:
        for layer in (self.net[0], self.net[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, lip: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([lip, expression], dim=2).flatten(2))


def rasterise_landmarks(points: torch.Tensor, size: int, sigma: float = 1.0) -> torch.Tensor:
    """Landmarks [N, P*2] (x, y in [-1, 1]) -> Gaussian heat maps [N, 1, size, size]."""
    n = points.shape[0]
    xy = points.view(n, -1, 2)
    grid = (torch.arange(size, device=points.device, dtype=points.dtype) + 0.5) / size * 2 - 1
    dx = grid.view(1, 1, size) - xy[..., 0:1]                                # [N, P, size]
    dy = grid.view(1, 1, size) - xy[..., 1:2]
    s = (2.0 * sigma / size) ** 2
    heat = torch.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / (2 * s))  # [N, P, S, S]
    return heat.amax(1, keepdim=True)                                        # [N, 1, S, S]


class PoseGuider(nn.Module):
    """CHOSEN stand-in for AnimateAnyone's landmark guider, frozen in every stage: landmarks
    [B, F, P*2] -> rasterised maps -> 3 strided convs -> k_h head tokens [B, F, k_h, dm]."""

    def __init__(self, cfg: MCDMConfig):
        super().__init__()
        self.size, self.tokens, self.dim = cfg.landmark_size, cfg.head_tokens, cfg.motion_dim
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1),
                                 nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(256, cfg.head_tokens * cfg.motion_dim))

    def reset_parameters(self) -> None:
        for m in self.net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)

    def forward(self, landmarks: torch.Tensor) -> torch.Tensor:
        b, f = landmarks.shape[:2]
        maps = rasterise_landmarks(landmarks.flatten(0, 1).float(), self.size)  # [B*F, 1, S, S]
        out = self.net(maps.to(self.net[0].weight.dtype))                   # [B*F, k_h*dm]
        return out.view(b, f, self.tokens, self.dim)


class PresentClipPrior(nn.Module):
    """eps(z_t [B, F, K, dm], t [B], audio [B, F, A], image [B, I], head [B, F, k_h, dm] | None)
    -> [B, F, K, dm]. Token order per frame: [FiLM audio-image (k_a), timestep (1), head, lip,
    expression]; see the module docstring. With ``head`` given, the head slots hold it (a clean
    condition, marked by a learned embedding) and the output's head part is not used."""

    def __init__(self, cfg: MCDMConfig, backend: str | None = None):
        super().__init__()
        h = cfg.prior_hidden
        self.cfg = cfg
        self.audio_in = nn.Linear(cfg.audio_dim, cfg.audio_tokens * h)
        self.film = nn.Linear(cfg.image_dim, 2 * h)                          # gamma, beta
        self.t_embed = TimestepEmbedder(h)
        self.motion_in = nn.Linear(cfg.motion_dim, h)
        self.condition_mark = nn.Parameter(torch.zeros(h))
        self.slot_embed = nn.Parameter(torch.zeros(cfg.audio_tokens + 1 + cfg.motion_tokens, h))
        self.causal_blocks = nn.ModuleList(TokenBlock(h, cfg.prior_heads, causal=True,
                                                      backend=backend)
                                           for _ in range(cfg.prior_layers))
        self.temporal_blocks = nn.ModuleList(TokenBlock(h, cfg.prior_heads, backend=backend)
                                             for _ in range(cfg.prior_layers))
        self.norm_out = nn.LayerNorm(h)
        self.out = nn.Linear(h, cfg.motion_dim)

    def reset_parameters(self) -> None:
        for layer in (self.audio_in, self.motion_in):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.film.weight)          # FiLM starts as the identity
        nn.init.zeros_(self.film.bias)
        self.t_embed.reset_parameters()
        nn.init.normal_(self.condition_mark, std=0.02)
        nn.init.normal_(self.slot_embed, std=0.02)
        for block in (*self.causal_blocks, *self.temporal_blocks):
            block.reset_parameters()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def tokens(self, z_t, t, audio, image, head=None, head_given=None) -> torch.Tensor:
        """The input sequence [B, F, N, h], N = k_a + 1 + K, in the causal order.
        ``head_given`` [B] bool: per sample, whether ``head`` is used (default: all)."""
        cfg = self.cfg
        b, f = z_t.shape[:2]
        hid = self.slot_embed.shape[1]
        av = self.audio_in(audio.float()).view(b, f, cfg.audio_tokens, hid)  # [B, F, k_a, h]
        gamma, beta = self.film(image.float()).view(b, 1, 1, 2, hid).unbind(3)
        av = av * (1 + gamma) + beta                                         # FiLM
        tt = self.t_embed(t.float()).view(b, 1, 1, hid).expand(b, f, 1, hid)  # [B, F, 1, h]
        motion = z_t
        if head is not None:
            given = (torch.ones(b, dtype=torch.bool, device=z_t.device) if head_given is None
                     else head_given.to(z_t.device).bool()).view(b, 1, 1, 1)
            z_head = z_t[:, :, : cfg.head_tokens]
            motion = torch.cat([torch.where(given, head.to(z_t), z_head),
                                z_t[:, :, cfg.head_tokens:]], dim=2)
        m = self.motion_in(motion)                                           # [B, F, K, h]
        if head is not None:
            mark = torch.zeros(cfg.motion_tokens, hid, device=m.device, dtype=m.dtype)
            mark[: cfg.head_tokens] = self.condition_mark
            m = m + mark * given.to(m.dtype)
        return torch.cat([av, tt, m], dim=2) + self.slot_embed               # [B, F, N, h]

    def forward(self, z_t, t, audio, image, head=None, head_given=None) -> torch.Tensor:
        x = self.tokens(z_t, t, audio, image, head, head_given)
        b, f, n, h = x.shape
        pos = temporal_sincos(f, h).to(x)                                    # [F, h]
        for causal, temporal in zip(self.causal_blocks, self.temporal_blocks):
            x = causal(x.reshape(b * f, n, h)).view(b, f, n, h)              # frames in batch
            y = (x + pos[None, :, None]).permute(0, 2, 1, 3).reshape(b * n, f, h)
            x = temporal(y).view(b, n, f, h).permute(0, 2, 1, 3)             # tokens in batch
        k = self.cfg.motion_tokens
        return self.out(self.norm_out(x[:, :, n - k:]))                     # [B, F, K, dm]


# ---------------------------------------------------------------------------------------------
# the whole model, the stage table and the losses


# module -> per stage 0..3: (trained, source). "paper": stated in section 3.5 / B.2 / 3.3;
# "chosen": this project's decision where the paper is silent (docs/mcdm.md says why).
STAGE_TABLE: dict[str, tuple[tuple[bool, str], ...]] = {
    "motion_encoders": ((True, "paper"), (False, "chosen"), (False, "chosen"), (False, "chosen")),
    "motion_decoder": ((True, "paper"), (False, "chosen"), (False, "chosen"), (False, "chosen")),
    "pose_guider": ((False, "paper"), (False, "paper"), (False, "paper"), (False, "paper")),
    "archived_prior": ((False, "chosen"), (True, "paper"), (False, "chosen"), (False, "paper")),
    "denoiser.base": ((False, "chosen"), (True, "chosen"), (False, "chosen"), (False, "paper")),
    "denoiser.archived_attention": ((False, "chosen"), (True, "chosen"), (False, "chosen"),
                                    (False, "paper")),
    "denoiser.present_attention": ((False, "chosen"), (False, "paper"), (False, "chosen"),
                                   (True, "paper")),
    "denoiser.temporal": ((False, "chosen"), (False, "paper"), (False, "chosen"),
                          (True, "paper")),
    "present_prior": ((False, "chosen"), (False, "chosen"), (True, "paper"), (False, "paper")),
}


def table_entry(param_name: str) -> str:
    """The :data:`STAGE_TABLE` row a parameter of :class:`MCDM` belongs to."""
    if param_name.startswith(("lip_encoder.", "expression_encoder.")):
        return "motion_encoders"
    for prefix in ("motion_decoder", "pose_guider", "archived_prior", "present_prior"):
        if param_name.startswith(prefix + "."):
            return prefix
    if param_name.startswith("denoiser."):
        if ".archived_attn." in param_name:
            return "denoiser.archived_attention"
        if ".present_attn." in param_name:
            return "denoiser.present_attention"
        if ".temporal." in param_name:
            return "denoiser.temporal"
        return "denoiser.base"
    raise ValueError(f"parameter {param_name!r} belongs to no STAGE_TABLE row")


def stage_table_markdown() -> str:
    """:data:`STAGE_TABLE` as the markdown table docs/mcdm.md shows."""
    lines = ["| module | stage 0 | stage 1 | stage 2 | stage 3 |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in STAGE_TABLE.items():
        cells = [f"{'trained' if on else 'frozen'} ({src})" for on, src in row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_DENOISER_KEYS = ("clip", "reference", "archived", "landmarks")
# batch keys each stage's loss reads (MCDMFaces provides all of them)
STAGE_KEYS: dict[int, tuple[str, ...]] = {
    0: ("clip", "same_expression", "same_lips", "motion", "motion_same_expression",
        "motion_same_lips"),
    1: _DENOISER_KEYS,
    2: (*_DENOISER_KEYS, "audio", "image"),
    3: _DENOISER_KEYS,
}


class MCDM(nn.Module):
    """All of MCDM's trainable parts (the codec, the audio and image encoders run outside).

    ``forward(batch, stage=s, generator=g)`` is the stage's loss (so DDP/FSDP wrap one call);
    sampling calls the parts directly (:mod:`samplers.mcdm`)."""

    def __init__(self, config: MCDMConfig, *, attention_backend: str | None = None):
        super().__init__()
        self.config = cfg = config
        self.denoiser = Denoiser(cfg, attention_backend)
        self.archived_prior = ArchivedClipPrior(cfg)
        self.present_prior = PresentClipPrior(cfg, attention_backend)
        self.lip_encoder = MotionEncoder(cfg, cfg.lip_tokens, attention_backend)
        self.expression_encoder = MotionEncoder(cfg, cfg.expression_tokens, attention_backend)
        self.motion_decoder = MotionDecoder(cfg)
        self.pose_guider = PoseGuider(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for part in (self.denoiser, self.archived_prior, self.present_prior, self.lip_encoder,
                     self.expression_encoder, self.motion_decoder, self.pose_guider):
            part.reset_parameters()

    def set_stage(self, stage: int) -> list[str]:
        """requires_grad per :data:`STAGE_TABLE`; returns the trained parameters' names."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        trained = []
        for name, p in self.named_parameters():
            on = STAGE_TABLE[table_entry(name)][stage][0]
            p.requires_grad_(on)
            if on:
                trained.append(name)
        return trained

    def motion_tokens(self, frames: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Target motion tokens [B, F, K, dm] = [head (pose guider), lip, expression]."""
        return torch.cat([self.pose_guider(landmarks), self.lip_encoder(frames),
                          self.expression_encoder(frames)], dim=2)

    def check_batch(self, batch: dict, stage: int) -> None:
        """ValueError naming the key when a batch does not fit the stage and the config."""
        cfg = self.config
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        need = STAGE_KEYS[stage]
        missing = [k for k in need if k not in batch]
        if missing:
            raise ValueError(f"batch for stage {stage} lacks {missing}; it needs {list(need)}")
        clip = (cfg.clip_frames, cfg.in_channels, cfg.latent_size, cfg.latent_size)
        shapes = {"clip": clip, "same_expression": clip, "same_lips": clip,
                  "reference": clip[1:],
                  "archived": (cfg.archived_frames, *clip[1:]),
                  "landmarks": (cfg.clip_frames, 2 * cfg.landmark_points),
                  "audio": (cfg.clip_frames, cfg.audio_dim), "image": (cfg.image_dim,)}
        for key in need:
            want = shapes.get(key)
            if want is not None and tuple(batch[key].shape[1:]) != want:
                raise ValueError(f"batch[{key!r}] must be [B, {', '.join(map(str, want))}], "
                                 f"got {list(batch[key].shape)}")

    def forward(self, batch: dict, *, stage: int, generator: torch.Generator | None = None,
                landmark_drop: float = 0.5) -> dict[str, torch.Tensor]:
        self.check_batch(batch, stage)
        if stage == 0:
            return self.encoder_losses(batch)
        if stage == 2:
            out = self.prior_loss(batch, generator, landmark_drop)
            with torch.no_grad():    # nothing stage 2 trains reaches the denoiser's output
                out["denoiser_mse"] = self.denoiser_loss(batch, generator)["loss"]
            return out
        return self.denoiser_loss(batch, generator)

    def encoder_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Stage 0 on paired clips: ``clip`` x, ``same_expression`` (x's expression, other lips),
        ``same_lips`` (x's lips, other expression), each [B, F, C, S, S], and their motion
        targets ``motion``, ``motion_same_expression``, ``motion_same_lips`` [B, F, out]."""
        x, xe, xl = batch["clip"], batch["same_expression"], batch["same_lips"]
        lip = {k: self.lip_encoder(v) for k, v in (("x", x), ("e", xe), ("l", xl))}
        exp = {k: self.expression_encoder(v) for k, v in (("x", x), ("e", xe), ("l", xl))}
        target = {"x": batch["motion"], "e": batch["motion_same_expression"],
                  "l": batch["motion_same_lips"]}
        dec = self.motion_decoder
        self_rec = sum(F.mse_loss(dec(lip[k], exp[k]), target[k]) for k in "xel") / 3
        cross = (F.mse_loss(dec(lip["x"], exp["e"]), target["x"])       # expression swapped in
                 + F.mse_loss(dec(lip["l"], exp["x"]), target["x"])) / 2  # lips swapped in
        consistency = (F.mse_loss(exp["x"], exp["e"]) + F.mse_loss(lip["x"], lip["l"])) / 2
        loss = self_rec + cross + consistency
        return {"loss": loss, "self_reconstruction": self_rec.detach(),
                "cross_reconstruction": cross.detach(), "consistency": consistency.detach()}

    def denoiser_loss(self, batch: dict, generator) -> dict[str, torch.Tensor]:
        """SD's epsilon MSE on the clip; F_pc from the target's own motion tokens (CHOSEN:
        teacher forcing with the frozen encoders, so stages 1 and 3 do not sample the prior)."""
        z0 = batch["clip"].float()                                           # [B, F, C, S, S]
        b = z0.shape[0]
        f_ac = self.archived_prior(batch["reference"].float(), batch["archived"].float())
        with torch.no_grad():
            f_pc = self.motion_tokens(z0, batch["landmarks"])
        t = torch.randint(0, 1000, (b,), generator=generator).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        pred = self.denoiser(add_noise(z0, noise, t), t, f_ac, f_pc)
        return {"loss": F.mse_loss(pred.float(), noise)}

    def prior_loss(self, batch: dict, generator, landmark_drop: float) -> dict[str, torch.Tensor]:
        """Eq. 3 on the motion tokens; the landmark clip is dropped with ``landmark_drop`` per
        sample (then the head tokens are targets too)."""
        cfg = self.config
        z0 = batch["clip"].float()
        with torch.no_grad():
            target = self.motion_tokens(z0, batch["landmarks"])              # [B, F, K, dm]
        b = target.shape[0]
        keep = (torch.rand(b, generator=generator) >= landmark_drop).to(z0.device)
        t = torch.randint(0, 1000, (b,), generator=generator).to(z0.device)
        noise = torch.randn(target.shape, generator=generator).to(z0.device)
        zt = add_noise(target, noise, t)
        head = target[:, :, : cfg.head_tokens]
        out = self.present_prior(zt, t, batch["audio"], batch["image"], head, keep)
        # with landmarks the head slots are conditions: no loss there
        weight = torch.ones(b, 1, cfg.motion_tokens, 1, device=z0.device)
        weight[:, :, : cfg.head_tokens] = (~keep).float().view(b, 1, 1, 1)
        err = (out.float() - noise) ** 2 * weight
        loss = err.sum() / (weight.sum() * cfg.clip_frames * cfg.motion_dim)
        return {"loss": loss, "landmarks_kept": keep.float().mean()}


# ---------------------------------------------------------------------------------------------
# toy data and the training system


EXPRESSION_PARAMS = ("eye_left", "eye_right", "mouth_open", "smile", "brow")
LIP_PARAMS = ("mouth_open",)


class MCDMFaces(torch.utils.data.IterableDataset):
    """Endless toy clips from :mod:`avatar_models.data.procedural_faces` (pixels as latents).

    Item: ``reference`` [3, S, S] (the video's frame 0), ``archived`` [a, 3, S, S] (the a frames
    before the clip, the reference where the video has none), ``clip`` [F, 3, S, S],
    ``landmarks`` [F, 40], ``audio`` [F, bands] (energy features of a speech-like waveform whose
    loudness is the ground-truth mouth opening), ``image`` [48] (the colour-layout stand-in for
    CLIP), ``motion`` [F, 5] (``EXPRESSION_PARAMS``) and the stage-0 pairs rendered exactly:
    ``same_expression`` (other lips) and ``same_lips`` (other expression, same head motion) with
    their ``motion_*`` targets. Pixels in [-1, 1] at S = ``size``; with ``codec`` (an object
    with ``encode(frames [..., 3, H, W]) -> latents [..., C, H/p, W/p]``: the patch-PCA stand-in
    for the VAE, or :class:`avatar_models.conditioning.VAECodec`), the frame entries
    (:data:`FRAME_KEYS`) are its latents of the frames rendered at ``size`` px.
    ``audio_features(waveform [S], sample_rate, fps, frames) -> [frames, A]`` replaces the energy
    features (e.g. :class:`avatar_models.conditioning.AudioEncoder`'s Wav2Vec2 features) and
    ``image_embedding(frame [3, 64, 64] in [0, 1]) -> [I]`` the colour layout (e.g. CLIP's image
    embedding)."""

    FRAME_KEYS = ("reference", "archived", "clip", "same_expression", "same_lips")

    def __init__(self, frames: int = 4, archived: int = 4, size: int = 16, fps: float = 25.0,
                 bands: int = 4, seed: int = 0, max_start: int | None = None,
                 sample_rate: int = 16000, codec=None, audio_features=None,
                 image_embedding=None):
        from avatar_models.data import procedural_faces as pf

        super().__init__()
        if frames < 1 or archived < 1:
            raise ValueError(f"frames and archived must be >= 1, got {frames}, {archived}")
        if pf.SIZE % size and size % pf.SIZE:
            raise ValueError(f"size must divide {pf.SIZE} or be a multiple of it, got {size}")
        self.frames, self.archived, self.size, self.fps = frames, archived, size, fps
        self.bands, self.seed, self.sample_rate = bands, seed, sample_rate
        self.codec = codec
        self.audio_features, self.image_embedding = audio_features, image_embedding
        self.max_start = 2 * archived if max_start is None else max_start

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.sample(gen)

    def _render(self, ident, params) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames [T, 3, S, S] in [-1, 1], full-size frames [T, 3, 64, 64] in [0, 1])."""
        from avatar_models.data import procedural_faces as pf

        video, _ = pf.render(ident, params)
        small = F.interpolate(video, size=(self.size, self.size), mode="area")
        return small * 2 - 1, video

    def sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        from avatar_models.data import procedural_faces as pf
        from avatar_models.data.speech import energy_features, speech_waveform

        seeds = torch.randint(0, 2 ** 31 - 1, (3,), generator=gen).tolist()
        start = int(torch.randint(0, self.max_start + 1, (1,), generator=gen))
        ident = pf.sample_identity(seeds[0] % pf.HELD_OUT_SEED_BASE)
        params = pf.sample_motion(seeds[1], start + self.frames)
        video, full = self._render(ident, params)                            # [start+F, ...]
        reference = video[0]
        before = video[max(0, start - self.archived):start]
        pad = reference[None].expand(self.archived - before.shape[0], -1, -1, -1)
        clip_params = params[start:]
        other = pf.sample_motion(seeds[2], self.frames)
        cols = [pf.PARAM_NAMES.index(n) for n in EXPRESSION_PARAMS]
        lip_cols = [pf.PARAM_NAMES.index(n) for n in LIP_PARAMS]
        same_expression = clip_params.clone()
        same_expression[:, lip_cols] = other[:, lip_cols]                    # other lips
        same_lips = other.clone()
        same_lips[:, :3] = clip_params[:, :3]                                # same head motion
        same_lips[:, lip_cols] = clip_params[:, lip_cols]                    # same lips
        mouth = clip_params[:, lip_cols[0]]
        wave = speech_waveform(mouth, self.fps, self.sample_rate, seed=seeds[1])
        features = self.audio_features or partial(energy_features, bands=self.bands)
        audio = features(wave, self.sample_rate, self.fps, self.frames)
        embed = self.image_embedding or pf.identity_embedding
        item = {
            "reference": reference, "archived": torch.cat([pad, before]),
            "clip": video[start:], "landmarks": pf.landmarks(clip_params),
            "audio": audio, "image": embed(full[0]),
            "motion": clip_params[:, cols],
            "same_expression": self._render(ident, same_expression)[0],
            "motion_same_expression": same_expression[:, cols],
            "same_lips": self._render(ident, same_lips)[0],
            "motion_same_lips": same_lips[:, cols],
        }
        if self.codec is not None:
            with torch.no_grad():
                item.update({k: self.codec.encode(item[k]) for k in self.FRAME_KEYS})
        return item


@dataclass(frozen=True)
class MCDMTrainConfig:
    """A stage's own hyperparameters (defaults chosen for the toy, see docs/mcdm.md)."""

    stage: int = 1
    landmark_drop: float = 0.5        # stage 2: probability of dropping the landmark clip

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not 0.0 <= self.landmark_drop <= 1.0:
            raise ValueError(f"landmark_drop must be in [0, 1], got {self.landmark_drop}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mcdm_system(model: MCDM, dataset, train: MCDMTrainConfig, lr: float,
                extra: dict | None = None):
    """The engine's view of one stage: the model with requires_grad per :data:`STAGE_TABLE`,
    the stage's loss, one parameter group holding exactly the trained parameters."""
    from avatar_models.training.engine import TrainingSystem

    trained = set(model.set_stage(train.stage))

    def loss(wrapped, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return wrapped(batch, stage=train.stage, generator=generator,
                       landmark_drop=train.landmark_drop)

    def groups(module: nn.Module) -> list[dict]:
        params = [p for n, p in module.named_parameters() if n in trained]
        return [{"params": params, "lr": lr, "name": f"stage{train.stage}"}]

    meta = {"train": train.to_dict(), **(extra or {})}
    return TrainingSystem("mcdm", model, loss, dataset, param_groups=groups,
                          config=model.config.to_dict(), metadata=meta, blocks=training_blocks,
                          unused_parameters=True)


def training_blocks(model: MCDM) -> list[nn.Module]:
    """The units of FSDP2 sharding and activation checkpointing: the denoiser's transformer
    blocks and the present-clip prior's blocks."""
    prior = model.present_prior
    return [*model.denoiser.transformers(), *prior.causal_blocks, *prior.temporal_blocks]
