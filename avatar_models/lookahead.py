"""Lookahead Anchoring (paper 001): an audio-driven video DiT with a distant clean keyframe.

The model denoises a window of n latent frames ``x [B, n, C, H, W]`` (L = n * r video frames, r
the VAE temporal ratio). Every frame is patchified; all tokens of the window, the optional
starting frames and the keyframe attend to each other through full 3D attention with in-kernel
3D RoPE (``kernels.attention3d`` with explicit (t, y, x) per token); adaLN-Zero blocks are
modulated per frame (``kernels.adaln_modulate`` / ``gated_residual``) by the embedding of that
frame's diffusion time; every block starts with a cross-attention to the audio features of the
window (:class:`avatar_models.layers.cross_attention.TemporalCrossAttention`).

Keyframe (Eq. 6, appendix B): a clean latent appended once as P extra tokens through its own
projection phi (initialised from the patch embedding's weights), never noised, modulated as a
clean frame (diffusion time 0), no loss (it is never in the output). Its tokens keep the frames'
(y, x) positions; its temporal index is ``keyframe_time``:

- 0: reference conditioning, the baseline. Under RoPE only offsets between tokens matter, so a
  keyframe at index 0 has no time of its own relative to the window's start: this is the same
  as "no time P.E." for the reference;
- n - 1 + d with d = floor(D / r): lookahead, the keyframe D video frames past the window's last
  frame. The tokens are *moved* there: nothing is left at index 0;
- negative: past-time conditioning (Table 4's comparison arm);
- ``time_embedding="learned"`` (Table 5 ablation): THIS PROJECT'S OWN DEFINITION, the paper does
  not say how a learnable time P.E. combines with RoPE: the keyframe keeps RoPE index 0 and gets a
  learned vector ``e[l]`` (zero-initialised, one per allowed l) added to its tokens.

Starting frames (s clean frames from the previous segment):

- ``start_mode="replace"`` (default, OmniAvatar): they replace the first s noisy frames of the
  window (same patch embedding, diffusion time 0, temporal indices 0..s-1, no loss there);
- ``start_mode="concat"`` (HunyuanAvatar runs of Tables 4 and 5): they are extra clean tokens
  through their own projection (initialised from the patch embedding), at temporal indices
  -s..-1 before the window; all n window frames are generated.

Objectives (:class:`NoiseSchedule`): flow matching (default, Wan-style: x_u = (1-u) x0 + u eps,
target eps - x0), v-prediction (CogVideoX / Hallo3) or epsilon, the latter two on DiT's linear
beta schedule.

Training (:func:`lookahead_system`, on :mod:`avatar_models.training.engine`): ``stage="base"``
(reference at index 0), ``stage="lookahead"`` (l ~ U[0, n-1+d_max], Eq. 7), ``anchor="fixed"``
(Table 5: l = n-1+d), ``anchor="past"`` (negative offsets). Toy data: :class:`LookaheadFaces`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from avatar_models.data.speech import energy_features, speech_waveform
from avatar_models.layers import DiTBlock, FinalLayer, PatchEmbed, TimestepEmbedder, unpatchify
from avatar_models.layers.cross_attention import TemporalCrossAttention
from avatar_models.layers.named_config import NamedConfig

OBJECTIVES = ("flow", "v", "eps")
START_MODES = ("replace", "concat")
TIME_EMBEDDINGS = ("rope", "learned")
STAGES = ("base", "lookahead")
ANCHORS = ("uniform", "fixed", "past")


@dataclass(frozen=True)
class LookaheadConfig(NamedConfig):
    """Architecture of the lookahead DiT. ``from_name`` gives ``tiny`` (CPU) and ``wan-1.3b``
    (Wan-2.1-1.3B-like shape: head dim 128, 12 heads, 30x52 = 1560 tokens per latent frame)."""

    name: str = "custom"
    depth: int = 2
    hidden: int = 64
    heads: int = 4
    patch: int = 2
    in_channels: int = 3
    input_height: int = 8
    input_width: int = 8
    frames: int = 4                 # n, latent frames per window
    vae_temporal_ratio: int = 1     # r; checked against the codec at sampling
    audio_dim: int = 4              # per-video-frame audio feature width
    mlp_ratio: float = 4.0
    objective: str = "flow"         # "flow", "v", "eps"
    start_mode: str = "replace"     # "replace" (token replacement) or "concat"
    time_embedding: str = "rope"    # "rope" or "learned" (project's own ablation, see module doc)
    min_keyframe_time: int = -16    # range of l the learned time P.E. table covers
    max_keyframe_time: int = 64
    rope_theta: float = 10000.0

    def __post_init__(self):
        for field, allowed in (("objective", OBJECTIVES), ("start_mode", START_MODES),
                               ("time_embedding", TIME_EMBEDDINGS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got "
                                 f"{getattr(self, field)!r}")
        for field in ("depth", "hidden", "heads", "patch", "in_channels", "input_height",
                      "input_width", "frames", "vae_temporal_ratio", "audio_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.input_height % self.patch or self.input_width % self.patch:
            raise ValueError(f"input_height and input_width must be multiples of patch="
                             f"{self.patch}, got {self.input_height}x{self.input_width}")
        if self.min_keyframe_time > self.max_keyframe_time:
            raise ValueError(f"min_keyframe_time must be <= max_keyframe_time, got "
                             f"{self.min_keyframe_time} > {self.max_keyframe_time}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_height // self.patch, self.input_width // self.patch

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.grid
        return gh * gw


NAMED_CONFIGS: dict[str, dict] = {
    "tiny": dict(depth=2, hidden=64, heads=4, patch=2, in_channels=3, input_height=8,
                 input_width=8, frames=4, audio_dim=4),
    # Wan 2.1 1.3B: width 1536, 30 layers, FFN 8960, 16-channel latents of 480x832 video
    # (60x104, patch 2 -> 30x52 = 1560 tokens), 81 frames -> 21 latent frames, Wav2Vec2-base audio.
    "wan-1.3b": dict(depth=30, hidden=1536, heads=12, patch=2, in_channels=16, input_height=60,
                     input_width=104, frames=21, vae_temporal_ratio=4, audio_dim=768,
                     mlp_ratio=8960 / 1536),
}
LookaheadConfig.SYSTEM, LookaheadConfig.NAMED = 'lookahead', NAMED_CONFIGS


def latent_distance(distance_frames: int, ratio: int) -> int:
    """d = floor(D / r): the keyframe's distance in latent frames (Eq. 6)."""
    if distance_frames < 0:
        raise ValueError(f"distance_frames D must be >= 0, got {distance_frames}")
    return distance_frames // ratio


def lookahead_time(frames: int, distance_frames: int, ratio: int) -> int:
    """Temporal index of the keyframe: n - 1 + floor(D / r)."""
    return frames - 1 + latent_distance(distance_frames, ratio)


# ---------------------------------------------------------------------------------------------
# noise schedules of the three objectives


@dataclass(frozen=True)
class NoiseSchedule:
    """x_u = alpha(u) x0 + sigma(u) eps for a noise level u in [0, 1] (1: pure noise).

    flow: alpha = 1 - u, sigma = u, the model sees time 1000 u and predicts eps - x0.
    v / eps: DiT's linear betas (1000 steps); u maps to the step round(u * 999), which is also the
    model's time; v = alpha eps - sigma x0 or eps is predicted.
    """

    objective: str = "flow"
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    def _step(self, u: torch.Tensor) -> torch.Tensor:
        return torch.round(u.double() * (self.num_train_timesteps - 1)).long()

    def alpha_sigma(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [B] -> (alpha, sigma), each [B] float32."""
        if self.objective == "flow":
            return 1.0 - u.float(), u.float()
        from avatar_models.training.diffusion import DiffusionSchedule

        acp = torch.cumprod(1.0 - DiffusionSchedule(self.num_train_timesteps).betas(), 0)
        a = acp.to(u.device)[self._step(u)]
        return a.sqrt().float(), (1.0 - a).sqrt().float()

    def model_time(self, u: torch.Tensor) -> torch.Tensor:
        if self.objective == "flow":
            return u.float() * self.num_train_timesteps
        return self._step(u).float()

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        a, s = (v.view(-1, *[1] * (x0.dim() - 1)) for v in self.alpha_sigma(u))
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.objective == "flow":
            return noise - x0
        if self.objective == "eps":
            return noise
        a, s = (v.view(-1, *[1] * (x0.dim() - 1)) for v in self.alpha_sigma(u))
        return a * noise - s * x0

    def x0_eps(self, xt: torch.Tensor, out: torch.Tensor,
               u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's estimates of (x0, eps) from x_u and its output."""
        a, s = (v.view(-1, *[1] * (xt.dim() - 1)) for v in self.alpha_sigma(u))
        if self.objective == "flow":
            return xt - s * out, xt + a * out
        if self.objective == "v":
            return a * xt - s * out, s * xt + a * out
        return (xt - s * out) / a.clamp_min(1e-4), out


# ---------------------------------------------------------------------------------------------
# model


class LookaheadBlock(nn.Module):
    """Audio cross-attention, then an adaLN-Zero DiT block (self-attention with 3D RoPE, MLP)."""

    def __init__(self, cfg: LookaheadConfig, attention_backend: str | None = None):
        super().__init__()
        self.audio = TemporalCrossAttention(cfg.hidden, cfg.heads, cfg.hidden,
                                            backend=attention_backend)
        self.dit = DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio,
                            attention_backend=attention_backend)

    def reset_parameters(self) -> None:
        self.audio.reset_parameters()
        self.dit.reset_parameters()

    def forward(self, x, c, positions, audio, audio_time):
        x = self.audio(x, audio, positions[..., 0], audio_time)           # [B, N, D]
        return self.dit(x, c, positions=positions)                       # [B, N, D]


class LookaheadDiT(nn.Module):
    """Audio-driven video DiT with a distant clean keyframe (see the module docstring)."""

    def __init__(self, config: LookaheadConfig, *, attention_backend: str | None = None):
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden
        self.x_embed = PatchEmbed(cfg.in_channels, d, cfg.patch)
        self.keyframe_embed = PatchEmbed(cfg.in_channels, d, cfg.patch)   # phi
        self.start_embed = (PatchEmbed(cfg.in_channels, d, cfg.patch)
                            if cfg.start_mode == "concat" else None)
        self.t_embed = TimestepEmbedder(d)
        self.audio_proj = nn.Linear(cfg.audio_dim, d)
        self.null_audio = nn.Parameter(torch.zeros(cfg.audio_dim))
        self.keyframe_time_table = (
            nn.Parameter(torch.zeros(cfg.max_keyframe_time - cfg.min_keyframe_time + 1, d))
            if cfg.time_embedding == "learned" else None)
        self.blocks = nn.ModuleList(LookaheadBlock(cfg, attention_backend)
                                    for _ in range(cfg.depth))
        self.final = FinalLayer(d, cfg.patch, cfg.in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init; phi (and the concat start projection) start as copies of the patch
        embedding, so clean latents land where noisy-frame tokens live (appendix B)."""
        self.x_embed.reset_parameters()
        for clean in (self.keyframe_embed, self.start_embed):
            if clean is not None:
                clean.load_state_dict(self.x_embed.state_dict())
        self.t_embed.reset_parameters()
        nn.init.xavier_uniform_(self.audio_proj.weight)
        nn.init.zeros_(self.audio_proj.bias)
        nn.init.normal_(self.null_audio, std=0.02)
        if self.keyframe_time_table is not None:
            nn.init.zeros_(self.keyframe_time_table)
        for block in self.blocks:
            block.reset_parameters()
        self.final.reset_parameters()

    def _grid_positions(self, device) -> torch.Tensor:
        gh, gw = self.config.grid
        ys = torch.arange(gh, device=device).repeat_interleave(gw)
        xs = torch.arange(gw, device=device).repeat(gh)
        return torch.stack([ys, xs], dim=-1).float()                      # [P, 2]

    def token_positions(self, frame_times: torch.Tensor) -> torch.Tensor:
        """Per-frame temporal indices [B, F] -> (t, y, x) of every token [B, F*P, 3]."""
        b, f = frame_times.shape
        yx = self._grid_positions(frame_times.device)                     # [P, 2]
        p = yx.shape[0]
        t = frame_times.float()[:, :, None, None].expand(b, f, p, 1)      # [B, F, P, 1]
        return torch.cat([t, yx.expand(b, f, p, 2)], dim=-1).reshape(b, f * p, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, audio: torch.Tensor,
                keyframe: torch.Tensor | None, keyframe_time: torch.Tensor | int = 0, *,
                start: torch.Tensor | None = None,
                audio_null: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the objective's target for the window's frames.

        Args:
            x: [B, n, C, H, W] noisy window latents (replace mode: slots 0..s-1 are ignored and
                taken from ``start``).
            t: [B] model time of the noisy frames (:meth:`NoiseSchedule.model_time`).
            audio: [B, La, A] audio features, one per video frame of the window (video frame j at
                latent time j / r; in concat mode the window's frames, starting frames excluded).
            keyframe: [B, C, H, W] clean keyframe latent, or None (no keyframe tokens).
            keyframe_time: l, the keyframe's temporal index, [B] ints or one int.
            start: [B, s, C, H, W] clean starting latents, or None (s = 0).
            audio_null: [B] bool: True replaces the audio by the learned null feature (CFG).

        Returns:
            [B, n, C, H, W] (the starting slots of replace mode carry no meaning and no loss).
        """
        cfg = self.config
        b, n, c, h, w = x.shape
        if c != cfg.in_channels or (h, w) != (cfg.input_height, cfg.input_width):
            raise ValueError(f"x must be [B, n, {cfg.in_channels}, {cfg.input_height}, "
                             f"{cfg.input_width}], got {list(x.shape)}")
        if audio.dim() != 3 or audio.shape[0] != b or audio.shape[2] != cfg.audio_dim:
            raise ValueError(f"audio must be [B, La, A] = [{b}, La, {cfg.audio_dim}], got "
                             f"{list(audio.shape)}")
        s = 0 if start is None else start.shape[1]
        if start is not None and (start.shape[0] != b or tuple(start.shape[2:]) != (c, h, w)):
            raise ValueError(f"start must be [B, s, C, H, W] = [{b}, s, {c}, {h}, {w}], got "
                             f"{list(start.shape)}")
        if cfg.start_mode == "replace" and s > n:
            raise ValueError(f"start has s={s} frames, more than the window's n={n}")
        device = x.device
        kf_time = torch.as_tensor(keyframe_time, device=device).long().expand(b)
        zero = torch.zeros(b, device=device)
        tokens, frame_times, clock = [], [], []            # per part: [B, F*P, D], [B, F], [B, F]
        if cfg.start_mode == "concat" and s:
            tokens.append(self.start_embed(start.flatten(0, 1)).unflatten(0, (b, s)))
            frame_times.append(torch.arange(-s, 0, device=device).expand(b, s))
            clock.append(zero[:, None].expand(b, s))
        frames = x
        noisy = torch.ones(b, n, dtype=torch.bool, device=device)
        if cfg.start_mode == "replace" and s:
            frames = torch.cat([start, x[:, s:]], dim=1)                  # [B, n, C, H, W]
            noisy[:, :s] = False
        tokens.append(self.x_embed(frames.flatten(0, 1)).unflatten(0, (b, n)))
        frame_times.append(torch.arange(n, device=device).expand(b, n))
        clock.append(torch.where(noisy, t.float()[:, None], zero[:, None]))
        window_first = sum(part.shape[1] for part in tokens[:-1])        # frames before window
        if keyframe is not None:
            kf = self.keyframe_embed(keyframe)[:, None]                   # [B, 1, P, D]
            if self.keyframe_time_table is not None:
                row = kf_time - cfg.min_keyframe_time
                if bool(((row < 0) | (row >= self.keyframe_time_table.shape[0])).any()):
                    raise ValueError(f"keyframe_time must lie in [{cfg.min_keyframe_time}, "
                                     f"{cfg.max_keyframe_time}] with time_embedding='learned', "
                                     f"got {kf_time.tolist()}")
                kf = kf + self.keyframe_time_table[row][:, None, None]    # [B, 1, P, D]
                kf_rope = torch.zeros_like(kf_time)     # learned ablation: RoPE index 0
            else:
                kf_rope = kf_time
            tokens.append(kf)
            frame_times.append(kf_rope[:, None])
            clock.append(zero[:, None])
        tok = torch.cat(tokens, dim=1)                                    # [B, F, P, D]
        frame_times = torch.cat(frame_times, dim=1)                       # [B, F]
        f, p = tok.shape[1], tok.shape[2]
        hid = tok.reshape(b, f * p, cfg.hidden)                           # [B, N, D]
        positions = self.token_positions(frame_times)                     # [B, N, 3]
        cvec = self.t_embed(torch.cat(clock, dim=1).flatten()).view(b, f, -1)  # [B, F, D]
        feats = audio.float()
        if audio_null is not None:
            feats = torch.where(audio_null.view(b, 1, 1).bool(), self.null_audio, feats)
        aud = self.audio_proj(feats.to(self.audio_proj.weight.dtype))    # [B, La, D]
        audio_time = torch.arange(aud.shape[1], device=device) / cfg.vae_temporal_ratio  # [La]
        for block in self.blocks:
            hid = block(hid, cvec, positions, aud, audio_time)            # [B, N, D]
        out = self.final(hid, cvec)                                       # [B, N, p*p*C]
        out = out.view(b, f, p, -1)[:, window_first:window_first + n]    # [B, n, P, p*p*C]
        gh, gw = cfg.grid
        out = unpatchify(out.flatten(0, 1), cfg.in_channels, cfg.patch, gh, gw)  # [B*n, C, H, W]
        return out.unflatten(0, (b, n))                                   # [B, n, C, H, W]


# ---------------------------------------------------------------------------------------------
# toy dataset and the training system


class LookaheadFaces(torch.utils.data.IterableDataset):
    """Endless toy clips from :mod:`avatar_models.data.procedural_faces` at ``fps``.

    Item: ``frames`` [past + n + d_max, 3, size, size] in [-1, 1] (the window is
    ``frames[past:past + n]``; the frames around it are keyframe candidates), ``audio``
    [n, bands] (:func:`energy_features` of :func:`speech_waveform` of the ground-truth mouth
    opening, over the window's frames) and ``mouth`` [n] (that opening). r = 1 (pixels).
    """

    def __init__(self, frames: int = 4, d_max: int = 12, past: int = 0, size: int = 8,
                 fps: float = 25.0, bands: int = 4, seed: int = 0, identities: int | None = None,
                 sample_rate: int = 16000):
        from avatar_models.data import procedural_faces as pf

        super().__init__()
        if frames < 1 or d_max < 0 or past < 0:
            raise ValueError(f"frames must be >= 1 and d_max, past >= 0, got frames={frames}, "
                             f"d_max={d_max}, past={past}")
        if pf.SIZE % size:
            raise ValueError(f"size must divide {pf.SIZE}, got {size}")
        self.frames, self.d_max, self.past, self.size = frames, d_max, past, size
        self.fps, self.bands, self.seed, self.sample_rate = fps, bands, seed, sample_rate
        self.identities = identities or pf.HELD_OUT_SEED_BASE

    @property
    def clip_frames(self) -> int:
        return self.past + self.frames + self.d_max

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.sample(gen)

    def sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        from avatar_models.data import procedural_faces as pf

        seeds = torch.randint(0, 2 ** 31 - 1, (2,), generator=gen).tolist()
        params = pf.sample_motion(seeds[1], self.clip_frames)
        video, _ = pf.render(pf.sample_identity(seeds[0] % self.identities), params)
        video = torch.nn.functional.interpolate(video, size=(self.size, self.size), mode="area")
        mouth = params[:, pf.PARAM_NAMES.index("mouth_open")]
        window = slice(self.past, self.past + self.frames)
        wave = speech_waveform(mouth[window], self.fps, self.sample_rate, seed=seeds[1])
        audio = energy_features(wave, self.sample_rate, self.fps, self.frames, self.bands)
        return {"frames": video * 2 - 1, "audio": audio, "mouth": mouth[window]}


@dataclass(frozen=True)
class LookaheadTrainConfig:
    """What a lookahead training run decides besides the engine (defaults are this project's
    choices where the paper is silent: see docs/lookahead.md)."""

    stage: str = "lookahead"        # "base": reference at index 0; "lookahead": Eq. 7
    anchor: str = "uniform"         # "uniform" (Eq. 7), "fixed" (Table 5: n-1+d), "past"
    d_max: int = 12                 # latent frames; l ~ U[0, n - 1 + d_max]
    distance: int = 12              # D in video frames for "fixed" (and the warning below)
    past_max: int = 8               # "past": l ~ U[-past_max, -1] (latent frames)
    starting_frames: int = 1        # s
    no_start_prob: float = 0.1      # batches trained like segment 0 (no starting frames)
    audio_drop: float = 0.1         # audio dropped for classifier-free guidance

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        for name in ("d_max", "distance", "starting_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.past_max < 1:
            raise ValueError(f"past_max must be >= 1, got {self.past_max}")
        for name in ("no_start_prob", "audio_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def past_frames(self, cfg: LookaheadConfig) -> int:
        """Frames the data must hold before the window (concat starting frames, past anchors)."""
        need = self.starting_frames if cfg.start_mode == "concat" else 0
        if self.stage == "lookahead" and self.anchor == "past":
            need = max(need, self.past_max)
        return need

    def ahead_frames(self, cfg: LookaheadConfig) -> int:
        """Frames the data must hold after the window (keyframe candidates)."""
        if self.stage == "lookahead" and self.anchor == "fixed":
            return latent_distance(self.distance, cfg.vae_temporal_ratio)
        return 0 if self.anchor == "past" and self.stage == "lookahead" else self.d_max


def check_distance(d: int, d_max: int, what: str) -> None:
    """Warn when the keyframe distance d exceeds the trained range d_max."""
    if d > d_max:
        warnings.warn(f"{what}: keyframe distance d={d} latent frames exceeds the trained "
                      f"d_max={d_max}; the model never saw a keyframe that far", stacklevel=3)


def draw_keyframe_offsets(train: LookaheadTrainConfig, cfg: LookaheadConfig, batch: int,
                          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(source index l of the keyframe relative to the window start, its temporal index) [B].

    base: l ~ U[0, n-1+d_max], temporal index 0 (reference conditioning); lookahead + uniform:
    l ~ U[0, n-1+d_max] (Eq. 7) at index l; fixed: l = n-1+d; past: l ~ U[-past_max, -1]."""
    n = cfg.frames
    if train.stage == "lookahead" and train.anchor == "fixed":
        ell = torch.full((batch,), lookahead_time(n, train.distance, cfg.vae_temporal_ratio))
    elif train.stage == "lookahead" and train.anchor == "past":
        ell = torch.randint(-train.past_max, 0, (batch,), generator=generator)
    else:
        ell = torch.randint(0, n + train.d_max, (batch,), generator=generator)
    return ell, (torch.zeros_like(ell) if train.stage == "base" else ell)


def lookahead_loss(model, cfg: LookaheadConfig, train: LookaheadTrainConfig, batch: dict,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Loss terms (means) of one batch (:class:`LookaheadFaces` layout, ``frames`` holding
    ``train.past_frames(cfg)`` frames before the window)."""
    clip = batch["frames"].float()                                         # [B, Lc, C, H, W]
    b, n = clip.shape[0], cfg.frames
    w0 = train.past_frames(cfg)
    need = w0 + n + train.ahead_frames(cfg)
    if clip.shape[1] < need:
        raise ValueError(f"batch['frames'] must hold at least {need} frames ({w0} before the "
                         f"window, n={n}, and the keyframe candidates after it), got "
                         f"{clip.shape[1]}")
    device = clip.device
    x0 = clip[:, w0:w0 + n]                                                # [B, n, C, H, W]
    ell, kf_time = draw_keyframe_offsets(train, cfg, b, generator)
    keyframe = clip[torch.arange(b), w0 + ell.to(device)]                 # [B, C, H, W]
    s = train.starting_frames
    if s and torch.rand((), generator=generator) < train.no_start_prob:
        s = 0
    start = None
    if s and cfg.start_mode == "replace":
        start = x0[:, :s]
    elif s:
        start = clip[:, w0 - s:w0]
    sched = NoiseSchedule(cfg.objective)
    u = torch.rand(b, generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    xt = sched.noisy(x0, noise, u)                                        # [B, n, C, H, W]
    null = (torch.rand(b, generator=generator) < train.audio_drop).to(device)
    out = model(xt, sched.model_time(u), batch["audio"].float(), keyframe, kf_time.to(device),
                start=start, audio_null=null)                             # [B, n, C, H, W]
    first = s if cfg.start_mode == "replace" else 0                        # no loss on start slots
    err = (out.float() - sched.target(x0, noise, u))[:, first:] ** 2
    return {"loss": err.mean(), "in_window": (ell < n).float().mean()}


def lookahead_system(model: LookaheadDiT, dataset, train: LookaheadTrainConfig,
                     extra: dict | None = None):
    """The engine's view: the model, :func:`lookahead_loss`, one parameter group, the data."""
    from avatar_models.training.engine import TrainingSystem

    cfg = model.config

    def loss(wrapped, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return lookahead_loss(wrapped, cfg, train, batch, generator)

    meta = {"train": train.to_dict(), **(extra or {})}
    return TrainingSystem("lookahead", model, loss, dataset, config=cfg.to_dict(), metadata=meta,
                          unused_parameters=True)
