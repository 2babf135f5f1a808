"""LaVieID (paper 004): identity-preserving text-to-video DiT with a local router and a temporal
autoregressive module (TAM).

Baseline (INFERRED, see docs/lavieid.md: ConsisID on CogVideoX-5B). A text-to-video DiT with full
3D attention over the text tokens and the video tokens of all latent frames together
(``kernels.attention3d``). Video tokens carry 3D RoPE at (t, y, x); text tokens sit at position
(0, 0, 0), where every rotation angle is 0, i.e. they are exactly unrotated (CogVideoX rotates
only the video tokens). The identity path is ConsisID-like: the reference latent is concatenated
on channels (in frame 0, zeros in the other frames) and a global identity vector is added to the
timestep embedding that modulates every adaLN-Zero block.

Local router (Eq. 2, 3), on the video tokens z leaving the first block:
``w_m = softmax_m(W_m LN(l_m) W_l (LN(z) W_z)^T)`` with W_m in R^(1 x L) per part, W_l in
R^(D x D''), W_z in R^(D' x D''); ``z* = z + alpha * sum_m w_m phi(l_m, z)``, phi a cross-attention
(queries z, keys/values l_m) with a zero-initialised output projection. l_m [L, D] come from the
trainable :class:`LocalPartEncoder` over the M part crops of the reference.

TAM (Eq. 4), on the guided final latent, once per sample: the latent frames become DiT-width
tokens, are split into K chunks (:func:`chunk_bounds`), and chunk k is enhanced by
``c*_k = c_k + beta * b_k``, ``b_k = phi(psi([c*_(k-1)[last frame]; c_k]), c_k)``: psi is N
frame-causal layers (``kernels.frame_causal_attention`` with frame-index RoPE, the prepended frame
keeps its own frame index), phi a cross-attention of the router's architecture (queries c_k).
The first chunk has no predecessor: psi runs on its own frames only. The prepended frame is never
output. The bias is read back to the latent by a linear map per token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from avatar_models.layers import DiTBlock, FinalLayer, Mlp, PatchEmbed, TimestepEmbedder, unpatchify
from avatar_models.layers.named_config import NamedConfig
from avatar_models.training.diffusion import DiffusionSchedule

PARTS = ("brows", "eyes", "mouth", "nose", "skin", "hair")


@dataclass(frozen=True)
class LaVieIDConfig(NamedConfig):
    """Architecture. ``from_name``: ``tiny`` (CPU tests), ``toy`` (the shipped demo models)
    and ``cogvideox-5b`` (CogVideoX-5B-like
    shape; the paper's L' = 17750 matches neither 13 x 1350 = 17550 nor 17550 + 226 = 17776)."""

    name: str = "custom"
    depth: int = 2
    hidden: int = 64                # D', DiT width
    heads: int = 4
    patch: int = 2
    in_channels: int = 3            # latent channels (the reference latent doubles the input)
    input_height: int = 8
    input_width: int = 8
    frames: int = 5                 # latent frames
    text_dim: int = 16              # text encoder width (T5-XXL: 4096)
    text_tokens: int = 8            # CogVideoX: 226
    identity_dim: int = 48          # global identity vector (toy: procedural_faces grid colours)
    mlp_ratio: float = 4.0
    parts: int = len(PARTS)         # M
    part_tokens: int = 4            # L (paper: 32)
    local_dim: int = 32             # D (paper: 2048)
    local_heads: int = 4            # heads of the local encoder (width local_dim)
    route_dim: int = 32             # D'' (paper: 2048)
    crop_size: int = 8              # side of a part crop fed to the local encoder
    crop_patch: int = 2
    tam_layers: int = 2             # N (paper: 6)
    tam_chunks: int = 4             # K
    alpha: float = 1.0
    beta: float = 0.2
    router: bool = True             # Table 2 switches
    tam: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self):
        for field in ("depth", "hidden", "heads", "patch", "in_channels", "input_height",
                      "input_width", "frames", "text_dim", "text_tokens", "identity_dim",
                      "parts", "part_tokens", "local_dim", "local_heads", "route_dim", "crop_size",
                      "crop_patch", "tam_layers", "tam_chunks"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.input_height % self.patch or self.input_width % self.patch:
            raise ValueError(f"input_height and input_width must be multiples of patch="
                             f"{self.patch}, got {self.input_height}x{self.input_width}")
        if self.crop_size % self.crop_patch:
            raise ValueError(f"crop_size must be a multiple of crop_patch={self.crop_patch}, "
                             f"got {self.crop_size}")
        for field, heads in (("hidden", self.heads), ("local_dim", self.local_heads)):
            width = getattr(self, field)
            if width % heads or (width // heads) % 8:
                raise ValueError(f"{field} / heads must be a multiple of 8, got "
                                 f"{field}={width}, heads={heads}")
        for field in ("alpha", "beta"):
            if not math.isfinite(getattr(self, field)):
                raise ValueError(f"{field} must be finite, got {getattr(self, field)}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_height // self.patch, self.input_width // self.patch

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.grid
        return gh * gw


NAMED_CONFIGS: dict[str, dict] = {
    "tiny": dict(depth=2, hidden=64, heads=4, patch=2, in_channels=3, input_height=16,
                 input_width=16, frames=5, text_dim=16, text_tokens=8, identity_dim=48,
                 part_tokens=4, local_dim=32, route_dim=32, crop_size=8, crop_patch=2,
                 tam_layers=2, tam_chunks=2),
    # the shipped toy models (make train-lavieid): 32x32 pixel frames of the zoomed face (4x4
    # patches: 8x8 tokens per frame), 16 px part crops so an iris spans a few crop pixels
    "toy": dict(depth=3, hidden=64, heads=4, patch=4, in_channels=3, input_height=32,
                input_width=32, frames=5, text_dim=16, text_tokens=8, identity_dim=48,
                part_tokens=4, local_dim=32, route_dim=32, crop_size=16, crop_patch=4,
                tam_layers=2, tam_chunks=2),
    # CogVideoX-5B: 42 layers, width 3072 (48 heads of 64), 16-channel latents of 480x720 video
    # (60x90, patch 2 -> 30x45 = 1350 tokens per latent frame), 49 frames -> 13 latent frames,
    # T5-XXL text (4096 wide, 226 tokens). Router: L = 32, D = D'' = 2048; TAM: N = 6, K = 4.
    "cogvideox-5b": dict(depth=42, hidden=3072, heads=48, patch=2, in_channels=16,
                         input_height=60, input_width=90, frames=13, text_dim=4096,
                         text_tokens=226, identity_dim=1024, part_tokens=32, local_dim=2048,
                         local_heads=16,
                         route_dim=2048, crop_size=224, crop_patch=14, tam_layers=6,
                         tam_chunks=4),
}

LaVieIDConfig.SYSTEM, LaVieIDConfig.NAMED = "lavieid", NAMED_CONFIGS


def noise_schedule() -> DiffusionSchedule:
    """CogVideoX's training betas (scaled linear 0.00085 -> 0.012, 1000 steps), v-prediction."""
    return DiffusionSchedule(1000, 0.00085, 0.012, "scaled_linear")


def chunk_bounds(frames: int, chunks: int) -> list[tuple[int, int]]:
    """[start, end) of K chunks over ``frames`` latent frames: as equal as possible, the first
    ``frames % K`` chunks one frame longer (13, 4 -> 4, 3, 3, 3); K > frames gives one frame per
    chunk."""
    if frames < 1 or chunks < 1:
        raise ValueError(f"frames and chunks must be >= 1, got frames={frames}, chunks={chunks}")
    k = min(chunks, frames)
    sizes = [frames // k + (1 if i < frames % k else 0) for i in range(k)]
    starts = [sum(sizes[:i]) for i in range(k)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


# ---------------------------------------------------------------------------------------------
# layers


class PartCrossAttention(nn.Module):
    """phi: queries LN(x) [B, N, C], keys/values cond [B, Lc, Cc] through ``attention3d`` without
    positions; zero-initialised output projection. Returns the un-projected heads output
    [B, N, C] (``project`` applies W_o), so a weighted sum over parts needs one projection."""

    def __init__(self, dim: int, heads: int, cond_dim: int, *, backend: str | None = None):
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, dim // heads, backend
        self.norm = nn.LayerNorm(dim)
        self.cond_norm = nn.LayerNorm(cond_dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(cond_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        for layer in (self.q, self.kv):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        for norm in (self.norm, self.cond_norm):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def attend(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = cond.shape[1]
        q = self.q(self.norm(x)).view(b, n, self.heads, self.head_dim)           # [B, N, H, d]
        k, v = self.kv(self.cond_norm(cond)).view(b, m, 2, self.heads,
                                                  self.head_dim).unbind(2)       # [B, Lc, H, d]
        o = kernels.attention3d(q, k.to(q.dtype), v.to(q.dtype), backend=self.backend)
        return o.reshape(b, n, -1)                                              # [B, N, C]

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(x, cond))                                  # [B, N, C]


class LocalPartEncoder(nn.Module):
    """Trainable local encoder: part crops [B, M, 3, S, S] -> part tokens l [B, M, L, D].

    Each crop is patchified (plus a learned part embedding); L learned queries (one set per part)
    attend to its patches (one attention + MLP, Perceiver-style, like ConsisID's local extractor
    reading ViT features)."""

    def __init__(self, cfg: LaVieIDConfig, backend: str | None = None):
        super().__init__()
        d = cfg.local_dim
        self.patch = PatchEmbed(3, d, cfg.crop_patch)
        self.part_embed = nn.Parameter(torch.zeros(cfg.parts, d))
        self.queries = nn.Parameter(torch.zeros(cfg.parts, cfg.part_tokens, d))
        self.attn = PartCrossAttention(d, cfg.local_heads, d, backend=backend)
        self.norm = nn.LayerNorm(d)
        self.mlp = Mlp(d, 4 * d)

    def reset_parameters(self) -> None:
        self.patch.reset_parameters()
        nn.init.normal_(self.part_embed, std=0.02)
        nn.init.normal_(self.queries, std=0.02)
        self.attn.reset_parameters()
        nn.init.xavier_uniform_(self.attn.proj.weight)  # the encoder's own attention must learn
        for layer in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        b, m = crops.shape[:2]
        feats = self.patch(crops.flatten(0, 1)).unflatten(0, (b, m))             # [B, M, P, D]
        feats = feats + self.part_embed[None, :, None]
        q = self.queries.expand(b, -1, -1, -1)                                   # [B, M, L, D]
        x = q.flatten(0, 1) + self.attn(q.flatten(0, 1), feats.flatten(0, 1))    # [B*M, L, D]
        x = x + self.mlp(self.norm(x))
        return x.unflatten(0, (b, m))                                            # [B, M, L, D]


class LocalRouter(nn.Module):
    """Eq. 2, 3: routing logits [B, N, M] and z* = z + alpha * sum_m w_m phi(l_m, z)."""

    def __init__(self, cfg: LaVieIDConfig, backend: str | None = None):
        super().__init__()
        self.part_norm = nn.LayerNorm(cfg.local_dim)
        self.token_norm = nn.LayerNorm(cfg.hidden)
        self.w_part = nn.Parameter(torch.zeros(cfg.parts, cfg.part_tokens))     # W_m, [1, L] each
        self.w_l = nn.Linear(cfg.local_dim, cfg.route_dim, bias=False)          # W_l
        self.w_z = nn.Linear(cfg.hidden, cfg.route_dim, bias=False)             # W_z
        self.phi = PartCrossAttention(cfg.hidden, cfg.heads, cfg.local_dim, backend=backend)
        self.scale = cfg.route_dim ** -0.5

    def reset_parameters(self) -> None:
        for norm in (self.part_norm, self.token_norm):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        nn.init.normal_(self.w_part, std=self.w_part.shape[1] ** -0.5)
        nn.init.xavier_uniform_(self.w_l.weight)
        nn.init.xavier_uniform_(self.w_z.weight)
        self.phi.reset_parameters()

    def logits(self, z: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """z [B, N, D'], parts [B, M, L, D] -> bilinear scores [B, N, M]. The 1/sqrt(D'') scale
        keeps the initial softmax soft (the paper writes no scale)."""
        key = torch.einsum("ml,bmld->bmd", self.w_part, self.w_l(self.part_norm(parts)))
        return torch.einsum("bnd,bmd->bnm", self.w_z(self.token_norm(z)), key) * self.scale

    def forward(self, z: torch.Tensor, parts: torch.Tensor,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(z, parts)                                           # [B, N, M]
        w = logits.float().softmax(-1).to(z.dtype)                               # [B, N, M]
        mixed = sum(w[..., m, None] * self.phi.attend(z, parts[:, m])
                    for m in range(parts.shape[1]))                              # [B, N, D']
        # the projection is linear and sum_m w_m = 1, so it runs once on the weighted sum
        return z + alpha * self.phi.proj(mixed), logits


class FrameCausalLayer(nn.Module):
    """Pre-LN transformer layer on ``kernels.frame_causal_attention`` with frame-index RoPE."""

    def __init__(self, dim: int, heads: int, rope_theta: float, backend: str | None = None):
        super().__init__()
        self.heads, self.head_dim, self.theta, self.backend = heads, dim // heads, rope_theta, \
            backend
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, 4 * dim)

    def reset_parameters(self) -> None:
        for layer in (self.qkv, self.proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        for norm in (self.norm1, self.norm2):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)

    def forward(self, x: torch.Tensor, frame_ids: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        o = kernels.frame_causal_attention(q, k, v, frame_ids=frame_ids, rope_theta=self.theta,
                                           backend=self.backend)                # [B, N, H, d]
        x = x + self.proj(o.reshape(b, n, -1))
        return x + self.mlp(self.norm2(x))                                        # [B, N, D']


class TemporalAutoregressiveModule(nn.Module):
    """Eq. 4 on a latent video [B, F, C, H, W] -> same shape (see the module docstring)."""

    def __init__(self, cfg: LaVieIDConfig, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = PatchEmbed(cfg.in_channels, cfg.hidden, cfg.patch)
        self.psi = nn.ModuleList(FrameCausalLayer(cfg.hidden, cfg.heads, cfg.rope_theta, backend)
                                 for _ in range(cfg.tam_layers))
        self.psi_norm = nn.LayerNorm(cfg.hidden)
        self.phi = PartCrossAttention(cfg.hidden, cfg.heads, cfg.hidden, backend=backend)
        self.readout = nn.Linear(cfg.hidden, cfg.patch * cfg.patch * cfg.in_channels)

    def reset_parameters(self) -> None:
        self.embed.reset_parameters()
        for layer in self.psi:
            layer.reset_parameters()
        nn.init.ones_(self.psi_norm.weight)
        nn.init.zeros_(self.psi_norm.bias)
        self.phi.reset_parameters()
        # phi's output projection is zero (the paper's init); the readout is not, or neither
        # would ever receive a gradient
        nn.init.xavier_uniform_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    def chunk_frame_ids(self, bounds: list[tuple[int, int]], k: int,
                        device=None) -> torch.Tensor:
        """Frame index of every frame psi sees for chunk k: [start_k - 1, start_k .. end_k - 1]
        (the prepended teacher-forcing frame keeps the previous chunk's last index); chunk 0:
        its own frames only."""
        start, end = bounds[k]
        first = start - 1 if k > 0 else start
        return torch.arange(first, end, device=device)

    def forward(self, z: torch.Tensor, beta: float, chunks: int | None = None) -> torch.Tensor:
        cfg = self.cfg
        b, f = z.shape[:2]
        p = cfg.tokens_per_frame
        c = self.embed(z.flatten(0, 1)).reshape(b, f, p, cfg.hidden)              # [B, F, P, D']
        bounds = chunk_bounds(f, chunks or cfg.tam_chunks)
        out, prev_last = [], None                       # prev_last: [B, 1, P, D'] after chunk 0
        for k, (s, e) in enumerate(bounds):
            ck = c[:, s:e]                                                       # [B, Fk, P, D']
            seq = ck if prev_last is None else torch.cat([prev_last, ck], dim=1)  # [B, Fk+1, P, D']
            ids = self.chunk_frame_ids(bounds, k, z.device).repeat_interleave(p)  # [Fk(+1)*P]
            h = seq.flatten(1, 2)                                                # [B, Nk, D']
            for layer in self.psi:
                h = layer(h, ids)
            h = self.psi_norm(h)
            bias = self.phi(ck.flatten(1, 2), h).view_as(ck)                     # b_k, like ck
            enhanced = ck + beta * bias                                          # c*_k
            prev_last = enhanced[:, -1:]
            out.append(bias)
        bias = torch.cat(out, dim=1)                                             # [B, F, P, D']
        gh, gw = cfg.grid
        delta = unpatchify(self.readout(bias).flatten(0, 1), cfg.in_channels, cfg.patch, gh, gw)
        return z + beta * delta.view_as(z)                                       # [B, F, C, H, W]


# ---------------------------------------------------------------------------------------------
# the model


class LaVieIDDiT(nn.Module):
    """Text-to-video DiT with the identity path, the local router and the TAM."""

    def __init__(self, config: LaVieIDConfig, *, attention_backend: str | None = None):
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden
        self.x_embed = PatchEmbed(2 * cfg.in_channels, d, cfg.patch)   # noisy + reference latent
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.null_text = nn.Parameter(torch.zeros(cfg.text_tokens, cfg.text_dim))
        self.t_embed = TimestepEmbedder(d)
        self.identity_embed = nn.Sequential(nn.Linear(cfg.identity_dim, d), nn.SiLU(),
                                            nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio,
                                             attention_backend=attention_backend)
                                    for _ in range(cfg.depth))
        self.final = FinalLayer(d, cfg.patch, cfg.in_channels)
        self.local_encoder = LocalPartEncoder(cfg, attention_backend)
        self.router = LocalRouter(cfg, attention_backend)
        self.tam = TemporalAutoregressiveModule(cfg, attention_backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.x_embed.reset_parameters()
        for layer in (self.text_proj, self.identity_embed[0], self.identity_embed[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.null_text, std=0.02)
        self.t_embed.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        self.final.reset_parameters()
        self.local_encoder.reset_parameters()
        self.router.reset_parameters()
        self.tam.reset_parameters()

    def baseline_parameters(self) -> Iterator[nn.Parameter]:
        """The identity-preserving baseline (frozen when the modules are fine-tuned)."""
        added = {id(p) for mod in (self.local_encoder, self.router, self.tam)
                 for p in mod.parameters()}
        return (p for p in self.parameters() if id(p) not in added)

    def token_positions(self, frames: int, device) -> torch.Tensor:
        """(t, y, x) of [text ; video] tokens [Lt + F*P, 3]; text rows stay at (0, 0, 0), where
        RoPE is the identity."""
        gh, gw = self.config.grid
        t = torch.arange(frames, device=device).repeat_interleave(gh * gw)
        y = torch.arange(gh, device=device).repeat_interleave(gw).repeat(frames)
        x = torch.arange(gw, device=device).repeat(gh * frames)
        video = torch.stack([t, y, x], dim=-1).float()                           # [F*P, 3]
        text = torch.zeros(self.config.text_tokens, 3, device=device)
        return torch.cat([text, video])

    def part_tokens(self, crops: torch.Tensor) -> torch.Tensor:
        """Part crops [B, M, 3, S, S] -> l [B, M, L, D]; once per sample at inference."""
        return self.local_encoder(crops)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                reference: torch.Tensor, identity: torch.Tensor,
                parts: torch.Tensor | None = None, *, text_null: torch.Tensor | None = None,
                crops: torch.Tensor | None = None, return_route_logits: bool = False,
                tam_alpha_sigma: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B, F, C, H, W] noisy latent; t [B] model time; text [B, Lt, Ct]; reference
        [B, C, H, W] latent; identity [B, Ci]; parts [B, M, L, D] (:meth:`part_tokens`; or
        ``crops`` [B, M, 3, S, S] encoded here, as training does so every trained parameter is
        used inside the (DDP-wrapped) forward); text_null [B] bool (the null text embedding).

        Returns the v prediction [B, F, C, H, W]; with ``return_route_logits`` the tuple (v,
        router logits [B, F*P, M] or None); with ``tam_alpha_sigma`` = (alpha_t, sigma_t) (each
        broadcastable to x) also the TAM applied to the detached x0-hat = alpha x - sigma v
        (None when the TAM is off): (v, logits, tam_x0)."""
        cfg = self.config
        b, f = x.shape[:2]
        expect = (cfg.in_channels, cfg.input_height, cfg.input_width)
        if x.dim() != 5 or tuple(x.shape[2:]) != expect:
            raise ValueError(f"x must be [B, F, {', '.join(map(str, expect))}], got "
                             f"{list(x.shape)}")
        if tuple(text.shape[1:]) != (cfg.text_tokens, cfg.text_dim):
            raise ValueError(f"text must be [B, {cfg.text_tokens}, {cfg.text_dim}], got "
                             f"{list(text.shape)}")
        checks = (("reference", reference, (b, *expect)), ("identity", identity,
                                                           (b, cfg.identity_dim)))
        for name, value, shape in checks:
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)}, got {list(value.shape)}")
        if crops is not None and tuple(crops.shape) != (b, cfg.parts, 3, cfg.crop_size,
                                                          cfg.crop_size):
            raise ValueError(f"crops must be [{b}, {cfg.parts}, 3, {cfg.crop_size}, "
                             f"{cfg.crop_size}], got {list(crops.shape)}")
        use_router = cfg.router
        if use_router and parts is None:
            if crops is None:
                raise ValueError("parts or crops must be given when the router is on "
                                 "(config.router=True)")
            parts = self.local_encoder(crops)                                    # [B, M, L, D]
        if text_null is not None:
            text = torch.where(text_null.view(b, 1, 1).bool(), self.null_text.to(text.dtype), text)
        ref = torch.zeros_like(x)
        ref[:, 0] = reference                        # ConsisID: reference latent in frame 0 only
        tok = self.x_embed(torch.cat([x, ref], dim=2).flatten(0, 1))             # [B*F, P, D']
        video = tok.reshape(b, -1, cfg.hidden)                                     # [B, F*P, D']
        lt = cfg.text_tokens
        hid = torch.cat([self.text_proj(text.to(video.dtype)), video], dim=1)    # [B, Lt+F*P, D']
        cvec = self.t_embed(t.float()) + self.identity_embed(identity.float())   # [B, D']
        positions = self.token_positions(f, x.device)                            # [Lt+F*P, 3]
        logits = None
        for i, block in enumerate(self.blocks):
            hid = block(hid, cvec, positions=positions)                          # [B, Lt+F*P, D']
            if i == 0 and use_router:
                z, logits = self.router(hid[:, lt:], parts, cfg.alpha)           # [B, F*P, D']
                hid = torch.cat([hid[:, :lt], z], dim=1)
        out = self.final(hid[:, lt:], cvec)                                      # [B, F*P, p*p*C]
        gh, gw = cfg.grid
        out = unpatchify(out.reshape(b * f, cfg.tokens_per_frame, -1), cfg.in_channels,
                         cfg.patch, gh, gw).view(b, f, *expect)                  # [B, F, C, H, W]
        if tam_alpha_sigma is not None:
            a, s = tam_alpha_sigma
            tam_x0 = self.tam((a * x - s * out.float()).detach(), cfg.beta) if cfg.tam else None
            return out, logits, tam_x0
        return (out, logits) if return_route_logits else out

    def enhance(self, z: torch.Tensor) -> torch.Tensor:
        """The TAM on a final latent [B, F, C, H, W] (identity when config.tam is off)."""
        if not self.config.tam:
            return z
        return self.tam(z, self.config.beta)


# ---------------------------------------------------------------------------------------------
# losses and the training system


def route_loss(logits: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """L_route: cross-entropy between router logits [B, N, M] and soft part targets [B, N, M]
    (each token's area fraction per part; the unlabelled remainder, background, counts for
    nothing). Normalised by the labelled area, so a token without labels contributes zero."""
    if logits.shape != fractions.shape:
        raise ValueError(f"fractions must match logits {list(logits.shape)}, got "
                         f"{list(fractions.shape)}")
    logp = F.log_softmax(logits.float(), dim=-1)
    mass = fractions.float().sum().clamp_min(1e-6)
    return -(fractions.float() * logp).sum() / mass


def token_fractions(labels: torch.Tensor, patch_pixels: int) -> torch.Tensor:
    """Per-pixel soft part labels [B, F, M, Hp, Wp] -> token area fractions [B, F*P, M] (the
    average over each token's ``patch_pixels x patch_pixels`` pixels, row-major tokens)."""
    b, f, m = labels.shape[:3]
    pooled = F.avg_pool2d(labels.flatten(0, 1).float(), patch_pixels)            # [B*F, M, gh, gw]
    return pooled.flatten(2).transpose(1, 2).reshape(b, -1, m)                   # [B, F*P, M]


@dataclass(frozen=True)
class LaVieIDTrainConfig:
    """What a training run decides besides the engine (docs/lavieid.md)."""

    stage: str = "modules"          # "base": train the baseline; "modules": freeze it, train
    #                                 the local encoder, router and TAM (the paper's budget)
    lambda_diff: float = 1.0
    lambda_route: float = 1.0
    lambda_tam: float = 1.0         # ASSUMPTION: Eq. 6 has no TAM term
    text_drop: float = 0.1

    def __post_init__(self):
        if self.stage not in ("base", "modules"):
            raise ValueError(f"stage must be 'base' or 'modules', got {self.stage!r}")
        if not 0.0 <= self.text_drop <= 1.0:
            raise ValueError(f"text_drop must be in [0, 1], got {self.text_drop}")
        for name in ("lambda_diff", "lambda_route", "lambda_tam"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _alpha_sigma(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acp = torch.cumprod(1.0 - noise_schedule().betas(), 0).to(t.device)[t]
    view = (-1, *[1] * (like.dim() - 1))
    return acp.sqrt().float().view(view), (1.0 - acp).sqrt().float().view(view)


def lavieid_loss(model, cfg: LaVieIDConfig, train: LaVieIDTrainConfig, batch: dict,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """lambda_diff L_diff + lambda_route L_route (+ lambda_tam L_tam, the assumed TAM signal:
    the TAM on x0-hat (detached) at the training timestep, regressed to the clean z0).

    batch: ``frames`` [B, F, C, H, W] (clean latent), ``text`` [B, Lt, Ct], ``reference``
    [B, C, H, W], ``identity`` [B, Ci], ``crops`` [B, M, 3, S, S], ``labels`` [B, F, M, H', W']
    (per-pixel soft part labels of the target frames, H' = H * label_scale)."""
    z0 = batch["frames"].float()
    b = z0.shape[0]
    device = z0.device
    t = torch.randint(0, noise_schedule().num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator).to(device)
    a, s = _alpha_sigma(t.to(device), z0)
    zt = a * z0 + s * noise
    null = (torch.rand(b, generator=generator) < train.text_drop).to(device)
    crops = batch["crops"].float() if cfg.router else None
    v, logits, tam_x0 = model(zt, t.to(device).float(), batch["text"].float(),
                              batch["reference"].float(), batch["identity"].float(),
                              text_null=null, crops=crops, tam_alpha_sigma=(a, s))
    target = a * noise - s * z0
    terms = {"diff": (v.float() - target).square().mean()}
    loss = train.lambda_diff * terms["diff"]
    if logits is not None:
        labels = batch["labels"].float()                                   # [B, F, M, H', W']
        scale = labels.shape[-1] // cfg.input_width
        if labels.shape[-2:] != (cfg.input_height * scale, cfg.input_width * scale) or not scale:
            raise ValueError(f"batch['labels'] must be [B, F, M, H', W'] with H', W' an integer "
                             f"multiple of the latent {cfg.input_height}x{cfg.input_width}, got "
                             f"{list(labels.shape)}")
        terms["route"] = route_loss(logits, token_fractions(labels, cfg.patch * scale))
        loss = loss + train.lambda_route * terms["route"]
    if tam_x0 is not None:
        terms["tam"] = (tam_x0.float() - z0).square().mean()
        loss = loss + train.lambda_tam * terms["tam"]
    return {"loss": loss, **terms}


def lavieid_system(model: LaVieIDDiT, dataset, train: LaVieIDTrainConfig, lr: float,
                   extra: dict | None = None):
    """The engine's view; stage "modules" freezes the baseline (requires_grad False) and trains
    only the local encoder, router and TAM."""
    from avatar_models.training.engine import TrainingSystem

    cfg = model.config
    if train.stage == "modules":
        for p in model.baseline_parameters():
            p.requires_grad_(False)

    def loss(wrapped, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return lavieid_loss(wrapped, cfg, train, batch, generator)

    def groups(module) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr,
                 "name": train.stage}]

    meta = {"train": train.to_dict(), **(extra or {})}
    return TrainingSystem("lavieid", model, loss, dataset, param_groups=groups,
                          config=cfg.to_dict(), metadata=meta, unused_parameters=True)


# ---------------------------------------------------------------------------------------------
# text encoders: the toy's weight-free one and CogVideoX's T5 from a local folder


class ToyTextEncoder:
    """Weight-free text encoder for the toy and the tests: each lower-case word gets a fixed
    random vector (seeded by its bytes), one token per word, zero-padded (or cut) to ``tokens``.
    ``__call__(prompts) -> [B, tokens, dim]``."""

    def __init__(self, dim: int, tokens: int, seed: int = 0):
        if dim < 1 or tokens < 1:
            raise ValueError(f"dim and tokens must be >= 1, got dim={dim}, tokens={tokens}")
        self.dim, self.tokens, self.seed = dim, tokens, seed

    def word(self, word: str) -> torch.Tensor:
        key = int.from_bytes(word.encode()[:7].ljust(7, b"\0"), "little") ^ len(word) << 56
        gen = torch.Generator().manual_seed((key + self.seed) % (2 ** 63))
        return torch.randn(self.dim, generator=gen) / math.sqrt(self.dim) * 4.0

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.tokens, self.dim)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
            words = prompt.lower().replace(",", " ").split()[:self.tokens]
            for j, w in enumerate(words):
                out[i, j] = self.word(w)
        return out


class T5TextEncoder:
    """CogVideoX's text encoder: a T5 encoder and tokenizer from a LOCAL folder (transformers
    ``from_pretrained``; nothing downloads), padded / truncated to ``tokens`` (226)."""

    def __init__(self, folder, tokens: int = 226, device="cpu", dtype=torch.float32):
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(folder, local_files_only=True,
                                                    torch_dtype=dtype).to(device).eval()
        self.tokens, self.device = tokens, device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokens,
                             truncation=True, return_tensors="pt").input_ids
        return self.model(ids.to(self.device)).last_hidden_state.float()    # [B, Lt, Ct]
