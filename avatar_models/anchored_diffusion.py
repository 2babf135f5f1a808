"""Anchored Diffusion (paper 000): the sequence DiT (sDiT) and its mapping network.

sDiT denoises a clip of T frames ``x [B, T, C, H, W]`` (VAE latents or pixels; ``in_channels``
decides). Every frame is patchified; tokens get the 2D sin-cos spatial embedding plus a sinusoidal
temporal encoding TPE_t of the frame's index in its sequence; full 3D attention runs over all T*P
tokens of a sequence (``kernels.attention3d``); adaLN-Zero blocks are modulated per frame by the
mapping network's output C_t = Mapping(G, L_t, t), where G is a global embedding (CLIP of the
source image) and L_t a per-frame control vector (normalised MediaPipe landmarks, 478x3). The
output has 2C channels (epsilon and the learned-range variance interpolation, as in DiT).

Anchored inference (Eq. 3): ``model(x, t, cond, anchor=kernels.Anchor(starts, P, source))`` makes
the anchor frame's tokens of every sequence equal to the source sequence's in every layer. The
default ``anchor_mode="packed"`` computes the anchor frame once per step (see
:mod:`avatar_models.layers.packing`): patch embedding, mapping network, projections, MLPs and
the final layer run on B*T - (B-1) frames, never on the anchor rows of b != source; attention sees
the full sequences through a gather and ``attention3d``'s anchor redirection. ``anchor_mode=
"override"`` is the reference: the plain batched model with the anchor rows of the input, of the
conditions and of the hidden states after the embedding and after every block overwritten by the
source's. Both give the same output (tested). Anchor-parallel sampling shards the B sequences over
ranks and runs the override path with the source rows broadcast from the rank that holds the
source (:class:`SharedAnchor`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from avatar_models.layers import (
    AnchorPacking,
    DiTBlock,
    FinalLayer,
    PatchEmbed,
    TimestepEmbedder,
    sincos_2d,
    temporal_sincos,
    unpatchify,
)

LANDMARK_DIM = 478 * 3  # MediaPipe face mesh with refined iris landmarks, (x, y, z) each


def landmark_control(landmarks: torch.Tensor) -> torch.Tensor:
    """MediaPipe landmarks [..., 478, 3] (x, y in [0, 1], z relative depth) -> the per-frame
    control vector [..., 1434]: x, y mapped to [-1, 1], z scaled by 2 (same scale as x), NaN
    (no face) -> 0."""
    if landmarks.shape[-2:] != (478, 3):
        raise ValueError(f"landmarks must be [..., 478, 3], got {list(landmarks.shape)}")
    lm = landmarks.float()
    scaled = torch.stack([lm[..., 0] * 2 - 1, lm[..., 1] * 2 - 1, lm[..., 2] * 2], dim=-1)
    return torch.nan_to_num(scaled, nan=0.0).flatten(-2)


@dataclass(frozen=True)
class SDiTConfig:
    """Architecture of an sDiT + mapping network. ``from_name`` gives the paper's sizes."""

    name: str = "custom"
    depth: int = 28
    hidden: int = 1152
    heads: int = 16
    patch: int = 2
    in_channels: int = 4         # 4 for SD-VAE latents, 3 for pixel-space RGB
    input_size: int = 32         # frame height = width (latent or pixel resolution)
    frames: int = 4              # T, frames per sequence (TPE table size; any T <= this works)
    mlp_ratio: float = 4.0
    learn_sigma: bool = True     # output 2*in_channels (epsilon, variance interpolation)
    global_dim: int = 768        # G: CLIP image embedding size
    control_dim: int = LANDMARK_DIM  # L_t: flattened normalised landmarks
    mapping_blocks: int = 4

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def tokens_per_frame(self) -> int:
        return (self.input_size // self.patch) ** 2

    @classmethod
    def from_name(cls, name: str, **overrides) -> SDiTConfig:
        """``sdit-xl/2``, ``sdit-l/2``, ``sdit-b/2``, ``sdit-b/4``, ``sdit-s/2`` or ``tiny``; any
        field can be overridden (``frames=8``, ``in_channels=3, input_size=64`` ...)."""
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown sDiT config {name!r}; expected one of "
                             f"{sorted(NAMED_CONFIGS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown SDiTConfig field(s) {bad}; expected some of "
                             f"{sorted(fields)}")
        return cls(**{**NAMED_CONFIGS[name], "name": name, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SDiTConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


NAMED_CONFIGS: dict[str, dict] = {
    "sdit-xl/2": dict(depth=28, hidden=1152, heads=16, patch=2),
    "sdit-l/2": dict(depth=24, hidden=1024, heads=16, patch=2),
    "sdit-b/2": dict(depth=12, hidden=768, heads=12, patch=2),
    "sdit-b/4": dict(depth=12, hidden=768, heads=12, patch=4),
    "sdit-s/2": dict(depth=12, hidden=384, heads=6, patch=2),
    "tiny": dict(depth=2, hidden=64, heads=4, patch=2, input_size=8, frames=3, global_dim=16,
                 control_dim=12),
}


@dataclass
class Conditions:
    """Guidance signals of a batch of sequences.

    global_embed: [B, G] (CLIP embedding of the source image, of a text, or a mix).
    control: [B, T, L] per-frame signals (normalised landmarks, flattened).
    null: optional [B] bool; True replaces both by the learned null embeddings (classifier-free
        guidance: dropped in training, the unconditional branch at sampling).
    """

    global_embed: torch.Tensor
    control: torch.Tensor
    null: torch.Tensor | None = None

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Conditions:
        null = None if self.null is None else self.null.to(device)
        return Conditions(self.global_embed.to(device, dtype), self.control.to(device, dtype), null)


class MappingResBlock(nn.Module):
    """h + Linear(SiLU(Linear(LayerNorm(h))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h))))


class MappingNetwork(nn.Module):
    """Mixes G, L_t and the timestep embedding into the per-frame condition C_t.

    ``C_t = ResBlocks(W_g G + W_l L_t + emb(t))`` with ``blocks`` residual blocks (4 in the paper).
    Works row-wise: any number R of (sequence, frame) rows.
    """

    def __init__(self, global_dim: int, control_dim: int, dim: int, blocks: int = 4):
        super().__init__()
        self.global_proj = nn.Linear(global_dim, dim)
        self.control_proj = nn.Linear(control_dim, dim)
        self.null_global = nn.Parameter(torch.zeros(global_dim))
        self.null_control = nn.Parameter(torch.zeros(control_dim))
        self.blocks = nn.ModuleList(MappingResBlock(dim) for _ in range(blocks))

    def forward(self, g: torch.Tensor, ctrl: torch.Tensor, temb: torch.Tensor,
                null: torch.Tensor | None = None) -> torch.Tensor:
        """g [R, G], ctrl [R, L], temb [R, D], null [R] bool or None -> C [R, D]."""
        if null is not None:
            g = torch.where(null[:, None], self.null_global.to(g.dtype), g)              # [R, G]
            ctrl = torch.where(null[:, None], self.null_control.to(ctrl.dtype), ctrl)  # [R, L]
        h = self.global_proj(g) + self.control_proj(ctrl) + temb                   # [R, D]
        for block in self.blocks:
            h = block(h)                                                       # [R, D]
        return h

    def reset_parameters(self) -> None:
        """ViT init: xavier-uniform linears, zero biases, unit LayerNorms; small null vectors."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.null_global, std=0.02)
        nn.init.normal_(self.null_control, std=0.02)


def frame_anchor(anchor_frames: torch.Tensor | list[int], tokens_per_frame: int,
                 source: int = 0):
    """``kernels.Anchor`` for anchor frame indices [B] of sequences of P-token frames."""
    frames = torch.as_tensor(anchor_frames).tolist()
    return kernels.Anchor([int(f) * tokens_per_frame for f in frames], tokens_per_frame,
                          source=source)


@dataclass(frozen=True)
class SharedAnchor:
    """Anchor-parallel sampling: this rank holds some of the B anchored sequences.

    ``anchor_frames``: the anchor frame index of each local sequence. The rank ``source_rank``
    (of ``group``, None: the default group) holds the source sequence at local index
    ``source_local``; in every layer it broadcasts the source's anchor-frame rows
    (``torch.distributed.broadcast``) and every rank overwrites its other sequences' anchor
    frames with them, exactly as ``anchor_mode="override"`` does on one process. Every rank of
    the group must call the model together (one broadcast per layer, plus three for the input,
    the conditions and the embedding).
    """

    anchor_frames: tuple[int, ...]
    source_rank: int = 0
    source_local: int = 0
    group: object = None


class SDiT(nn.Module):
    """Sequence DiT with the mapping network (see the module docstring)."""

    def __init__(self, config: SDiTConfig, *, attention_backend: str | None = None):
        super().__init__()
        self.config = config
        d = config.hidden
        self.x_embed = PatchEmbed(config.in_channels, d, config.patch)
        self.t_embed = TimestepEmbedder(d)
        self.mapping = MappingNetwork(config.global_dim, config.control_dim, d,
                                      config.mapping_blocks)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.heads, config.mlp_ratio, attention_backend=attention_backend)
            for _ in range(config.depth))
        self.final = FinalLayer(d, config.patch, config.out_channels)
        grid = config.input_size // config.patch
        self.register_buffer("pos_spatial", sincos_2d(grid, grid, d), persistent=False)  # [P, D]
        self.register_buffer("pos_temporal", temporal_sincos(config.frames, d),
                             persistent=False)                                          # [T, D]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: xavier linears, zero adaLN modulation and zero final layer (adaLN-Zero)."""
        self.x_embed.reset_parameters()
        self.t_embed.reset_parameters()
        self.mapping.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        self.final.reset_parameters()

    def make_anchor(self, anchor_frames: torch.Tensor | list[int], source: int = 0,
                    frame_size: tuple[int, int] | None = None):
        """``kernels.Anchor`` (token units) for anchor frame indices [B]."""
        h, w = frame_size or (self.config.input_size, self.config.input_size)
        p = self.config.patch
        return frame_anchor(anchor_frames, (h // p) * (w // p), source)

    def _positions(self, gh: int, gw: int, device: torch.device) -> torch.Tensor:
        if gh * gw == self.pos_spatial.shape[0] and gh == gw:
            return self.pos_spatial
        return sincos_2d(gh, gw, self.config.hidden).to(device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions, *, anchor=None,
                anchor_mode: str = "packed") -> torch.Tensor:
        """Predict noise and variance interpolation.

        Args:
            x: [B, T, C, H, W] noisy frames (C = in_channels, H, W multiples of the patch).
            t: [B] diffusion timesteps (int or float).
            cond: :class:`Conditions` with global_embed [B, G] and control [B, T, L].
            anchor: optional ``kernels.Anchor`` in token units over the T*P tokens of a
                sequence: ``starts[b] = anchor_frame[b] * P``, ``length = P`` (see
                :meth:`make_anchor`), or a :class:`SharedAnchor` (anchor-parallel sampling over
                ranks; always the override path, ``anchor_mode`` is not used).
            anchor_mode: "packed" (efficient, default) or "override" (reference path).

        Returns:
            [B, T, out_channels, H, W]; with ``anchor``, the anchor frame of every sequence equals
            the source's.
        """
        cfg = self.config
        b, frames, c, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x must have {cfg.in_channels} channels ([B, T, C, H, W]), got "
                             f"shape {list(x.shape)}")
        if frames > cfg.frames:
            raise ValueError(f"x has T={frames} frames, more than the config's {cfg.frames}")
        if tuple(cond.control.shape) != (b, frames, cfg.control_dim):
            raise ValueError(f"cond.control must be [B, T, L] = [{b}, {frames}, "
                             f"{cfg.control_dim}], got {list(cond.control.shape)}")
        gh, gw = h // cfg.patch, w // cfg.patch
        tokens = gh * gw
        packing = None
        if isinstance(anchor, SharedAnchor):
            return self._forward_shared(x, t, cond, anchor, gh, gw)
        if anchor is not None:
            packing = self._packing(anchor, b, frames, tokens, x.device)
            if anchor_mode == "override":
                return self._forward_override(x, t, cond, packing, gh, gw)
            if anchor_mode != "packed":
                raise ValueError(f"anchor_mode must be 'packed' or 'override', got {anchor_mode!r}")
        temb = self.t_embed(t)                                             # [B, D]
        rows = _frame_rows(cond, temb, frames)          # per (b, t): g, l, temb, null, index t
        if packing is not None:
            x_f = packing.pack_frames(x)                                   # [F, C, H, W]
            rows = {k: None if v is None else packing.pack_frames(v) for k, v in rows.items()}
        else:
            x_f = x.flatten(0, 1)                                          # [B*T, C, H, W]
            rows = {k: None if v is None else v.flatten(0, 1) for k, v in rows.items()}
        cvec = self.mapping(rows["g"], rows["l"], rows["temb"], rows["null"])  # [F, D]
        tok = self.x_embed(x_f) + self._positions(gh, gw, x.device)        # [F, P, D]
        tok = tok + self.pos_temporal[rows["tpos"]][:, None]               # [F, P, D]
        seqs = 1 if packing is not None else b
        hid = tok.reshape(seqs, -1, cfg.hidden)                            # [B|1, N|M, D]
        cvec = cvec.reshape(seqs, -1, cfg.hidden)                          # [B|1, T|F, D]
        for block in self.blocks:
            hid = block(hid, cvec, packing=packing)                        # [B|1, N|M, D]
        out = self.final(hid, cvec)                                        # [B|1, N|M, p*p*Co]
        out = unpatchify(out.reshape(-1, tokens, out.shape[-1]), cfg.out_channels, cfg.patch,
                         gh, gw)                                           # [F, Co, H, W]
        if packing is not None:
            return packing.unpack_frames(out)                              # [B, T, Co, H, W]
        return out.unflatten(0, (b, frames))

    def _packing(self, anchor, batch: int, frames: int, tokens: int,
                 device: torch.device) -> AnchorPacking:
        if not isinstance(anchor, kernels.Anchor):
            raise TypeError(f"anchor must be a kernels.Anchor or None, got "
                            f"{type(anchor).__name__}")
        starts = torch.as_tensor(anchor.starts).tolist()
        if anchor.length != tokens or any(s % tokens for s in starts) or len(starts) != batch:
            raise ValueError(f"anchor must cover one whole frame per sequence: length P={tokens} "
                             f"and B={batch} starts that are multiples of P, got length="
                             f"{anchor.length}, starts={starts}")
        return AnchorPacking.build([s // tokens for s in starts], frames, tokens,
                                   source=anchor.source, device=device)

    def _forward_override(self, x, t, cond, packing: AnchorPacking, gh: int, gw: int):
        """Reference path: plain batched model, explicit anchor override at every layer."""
        src = packing.source
        tokens = gh * gw
        anchor_frames = [start // tokens for start in packing.anchor_starts]
        a_src = anchor_frames[src]
        return self._forward_with_override(x, t, cond, anchor_frames, lambda v: v[src, a_src],
                                           src, gh, gw)

    def _forward_shared(self, x, t, cond, anchor: SharedAnchor, gh: int, gw: int):
        """Anchor-parallel path: the override rows come from the rank holding the source."""
        import torch.distributed as dist

        frames = list(anchor.anchor_frames)
        if len(frames) != x.shape[0]:
            raise ValueError(f"anchor.anchor_frames must have one entry per local sequence "
                             f"(B={x.shape[0]}), got {frames}")
        is_source = dist.get_rank(anchor.group) == anchor.source_rank
        skip = anchor.source_local if is_source else None

        def source_rows(v: torch.Tensor) -> torch.Tensor:  # [b, T, ...] -> the source's [...]
            if is_source:
                row = v[anchor.source_local, frames[anchor.source_local]].contiguous()
            else:
                row = torch.empty(v.shape[2:], dtype=v.dtype, device=v.device)
            src = dist.get_global_rank(anchor.group, anchor.source_rank) \
                if anchor.group is not None else anchor.source_rank
            dist.broadcast(row, src=src, group=anchor.group)
            return row

        return self._forward_with_override(x, t, cond, frames, source_rows, skip, gh, gw)

    def _forward_with_override(self, x, t, cond, anchor_frames: list[int], source_rows,
                               skip: int | None, gh: int, gw: int):
        """The plain batched model with the anchor frame of every sequence (but ``skip``, the
        source) overwritten by ``source_rows(v)`` in the input, the conditions, after the
        embedding and after every block."""
        cfg = self.config
        b, frames = x.shape[:2]
        tokens = gh * gw

        def override_frames(v: torch.Tensor) -> torch.Tensor:  # [B, T, ...]
            row = source_rows(v)
            v = v.clone()
            for i, f in enumerate(anchor_frames):
                if i != skip:
                    v[i, f] = row
            return v

        def override_tokens(v: torch.Tensor) -> torch.Tensor:  # [B, N, D]
            return override_frames(v.reshape(b, frames, tokens, -1)).reshape(b, frames * tokens, -1)

        x = override_frames(x)
        temb = self.t_embed(t)
        rows = _frame_rows(cond, temb, frames)
        null = None if rows["null"] is None else rows["null"].flatten(0, 1)
        cvec = self.mapping(rows["g"].flatten(0, 1), rows["l"].flatten(0, 1),
                            rows["temb"].flatten(0, 1), null)
        cvec = override_frames(cvec.view(b, frames, -1))                   # [B, T, D]
        tok = self.x_embed(x.flatten(0, 1)) + self._positions(gh, gw, x.device)
        tok = tok + self.pos_temporal[rows["tpos"].flatten()][:, None]     # [B*T, P, D]
        hid = override_tokens(tok.reshape(b, frames * tokens, -1))         # [B, N, D]
        for block in self.blocks:
            hid = override_tokens(block(hid, cvec))
        out = self.final(hid, cvec)                                        # [B, N, p*p*Co]
        out = unpatchify(out.reshape(b * frames, tokens, -1), cfg.out_channels, cfg.patch, gh, gw)
        return out.unflatten(0, (b, frames))


def _frame_rows(cond: Conditions, temb: torch.Tensor, frames: int) -> dict:
    """Per-(sequence, frame) mapping-network inputs, each [B, T, ...]."""
    b = temb.shape[0]
    g = cond.global_embed
    if g.dim() != 2 or g.shape[0] != b:
        raise ValueError(f"cond.global_embed must be [B, G] with B={b}, got {list(g.shape)}")
    if cond.null is not None and tuple(cond.null.shape) != (b,):
        raise ValueError(f"cond.null must be [B] = [{b}], got {list(cond.null.shape)}")
    null = None
    if cond.null is not None:
        null = cond.null.to(torch.bool).view(b, 1).expand(b, frames)
    tpos = torch.arange(frames, device=temb.device).expand(b, frames)
    return {"g": g[:, None].expand(b, frames, g.shape[-1]), "l": cond.control,
            "temb": temb[:, None].expand(b, frames, temb.shape[-1]), "null": null, "tpos": tpos}
