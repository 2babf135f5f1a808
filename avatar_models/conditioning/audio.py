"""Wav2Vec2 audio features, one vector per video frame (Lookahead Anchoring, MCDM).

Pipeline: waveform (any rate, mono or stereo; decoded from files with PyAV) -> downmix ->
resample to the model's rate (16 kHz for wav2vec 2.0) -> zero-mean/unit-variance (when the
folder's ``preprocessor_config.json`` says ``do_normalize``, the default) -> ``Wav2Vec2Model`` in
chunks of ``chunk_seconds`` -> linear interpolation over time to the video frames.

Times: wav2vec feature ``k`` is placed at the centre of its receptive field,
``(k * stride + rf / 2) / sample_rate`` (stride 320, rf 400 samples for wav2vec 2.0: 20 ms per
feature); video frame ``i`` at the centre of its display interval, ``(i + 0.5) / fps``. Frames
before the first / after the last feature take the nearest feature.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import Wav2Vec2Model

from avatar_models import media
from avatar_models.conditioning._checks import (
    FrozenModelWrapper,
    as_tensor,
    check_dtype,
    check_positive,
    check_rank,
    resolve_model_dir,
)

EXPECTED = ("a transformers Wav2Vec2Model folder (config.json + model.safetensors; "
            "preprocessor_config.json optional), e.g. facebook/wav2vec2-base-960h saved with "
            "save_pretrained")


def receptive_field(conv_kernel: Sequence[int], conv_stride: Sequence[int]) -> tuple[int, int]:
    """``(receptive field, total stride)`` in samples of a stack of 1-D convolutions."""
    rf, jump = 1, 1
    for k, s in zip(conv_kernel, conv_stride):
        rf += (k - 1) * jump
        jump *= s
    return rf, jump


def video_frame_times(num_frames: int, fps: float) -> torch.Tensor:
    """Centre time in seconds of each video frame, float64 ``[num_frames]``."""
    check_positive("fps", fps)
    return (torch.arange(num_frames, dtype=torch.float64) + 0.5) / fps


def resample_to_frames(features: torch.Tensor, feature_times: torch.Tensor,
                       frame_times: torch.Tensor) -> torch.Tensor:
    """Linear interpolation over time.

    Args:
        features: ``[N, ...]`` sampled at ``feature_times`` ``[N]`` (seconds, increasing).
        frame_times: ``[M]`` query times; outside the feature range the end values are held.

    Returns:
        ``[M, ...]`` in ``features``' dtype.
    """
    feats = as_tensor("features", features)
    ft = as_tensor("feature_times", feature_times).to(torch.float64).cpu()
    qt = as_tensor("frame_times", frame_times).to(torch.float64).cpu()
    check_rank("feature_times", ft, 1, "[N]")
    check_rank("frame_times", qt, 1, "[M]")
    if feats.dim() < 1 or feats.shape[0] != ft.shape[0] or ft.shape[0] == 0:
        raise ValueError(f"features must be [N, ...] with N = len(feature_times) = {ft.shape[0]} "
                         f"> 0, got shape {list(feats.shape)}")
    if ft.shape[0] > 1 and not bool((ft[1:] > ft[:-1]).all()):
        raise ValueError("feature_times must be strictly increasing")
    if ft.shape[0] == 1:
        return feats[:1].expand(qt.shape[0], *feats.shape[1:]).clone()
    q = qt.clamp(ft[0], ft[-1])
    hi = torch.searchsorted(ft, q, right=False).clamp(1, ft.shape[0] - 1)
    lo = hi - 1
    w = ((q - ft[lo]) / (ft[hi] - ft[lo])).to(feats.device)
    shape = (-1,) + (1,) * (feats.dim() - 1)
    lo, hi = lo.to(feats.device), hi.to(feats.device)
    out = feats[lo].double() * (1 - w).view(shape) + feats[hi].double() * w.view(shape)
    return out.to(feats.dtype)


class AudioEncoder(FrozenModelWrapper):
    """Frozen Wav2Vec2 feature extractor, resampled to video frames."""

    def __init__(self, model: Wav2Vec2Model, *, sample_rate: int = 16000,
                 do_normalize: bool = True):
        if not isinstance(model, Wav2Vec2Model):
            raise TypeError(f"model must be a transformers Wav2Vec2Model, got "
                            f"{type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        self.sample_rate = int(sample_rate)
        self.do_normalize = bool(do_normalize)
        cfg = model.config
        self.feature_dim = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)
        self.receptive_field, self.stride = receptive_field(cfg.conv_kernel, cfg.conv_stride)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None, *, subfolder: str | None = None,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> AudioEncoder:
        """Load from a local folder; ``path=None`` reads ``$AVATAR_MODELS_HOME/wav2vec2``."""
        folder = resolve_model_dir(path, "wav2vec2", EXPECTED, subfolder=subfolder)
        model = Wav2Vec2Model.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        sr, norm = 16000, True
        pre = Path(folder) / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            sr, norm = cfg.get("sampling_rate", sr), cfg.get("do_normalize", norm)
        return cls(model.to(device, dtype), sample_rate=sr, do_normalize=norm)

    def _prepare(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        wave = as_tensor("waveform", waveform)
        check_rank("waveform", wave, (1, 2), "[S] or [C, S]")
        check_dtype("waveform", wave)
        check_positive("sample_rate", sample_rate, integer=True)
        wave = wave.detach().float().cpu()
        wave = wave.mean(0) if wave.dim() == 2 else wave
        if sample_rate != self.sample_rate:
            wave = media.resample_audio(wave, sample_rate, self.sample_rate)
        if wave.shape[0] < self.receptive_field:
            raise ValueError(f"waveform is too short: {wave.shape[0]} samples at "
                             f"{self.sample_rate} Hz, need at least {self.receptive_field}")
        if self.do_normalize:
            wave = (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7)
        return wave

    def features(self, waveform: torch.Tensor, sample_rate: int, *,
                 layers: Literal["last", "all"] = "last",
                 chunk_seconds: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw wav2vec features and their times.

        Args:
            waveform: float ``[S]`` or ``[C, S]`` (channels are averaged).
            sample_rate: rate of ``waveform``.
            layers: ``"last"`` -> ``[N, D]``; ``"all"`` -> every hidden state ``[N, L + 1, D]``
                (CNN projection output first).
            chunk_seconds: the transformer sees at most this much audio at once (its attention
                is quadratic in length); chunks are independent.

        Returns:
            ``(features, times)``: features in the model's dtype on its device, times float64
            ``[N]`` seconds.
        """
        if layers not in ("last", "all"):
            raise ValueError(f"layers must be 'last' or 'all', got {layers!r}")
        check_positive("chunk_seconds", chunk_seconds)
        wave = self._prepare(waveform, sample_rate)
        n = wave.shape[0]
        chunk = max(self.stride * math.ceil(chunk_seconds * self.sample_rate / self.stride),
                    self.stride * math.ceil(self.receptive_field / self.stride))
        starts = list(range(0, n, chunk))
        if len(starts) > 1 and n - starts[-1] < self.receptive_field:
            starts.pop()  # fold a too-short tail into the previous chunk
        feats, times = [], []
        for i, s in enumerate(starts):
            e = starts[i + 1] if i + 1 < len(starts) else n
            x = wave[s:e][None].to(self.device, self.dtype)
            out = self.model(x, output_hidden_states=layers == "all")
            f = out.last_hidden_state[0] if layers == "last" else torch.stack(
                [h[0] for h in out.hidden_states], dim=1)
            k = torch.arange(f.shape[0], dtype=torch.float64)
            times.append((s + k * self.stride + self.receptive_field / 2) / self.sample_rate)
            feats.append(f)
        return torch.cat(feats), torch.cat(times)

    def encode(self, waveform: torch.Tensor, sample_rate: int, *, fps: float,
               num_frames: int | None = None, layers: Literal["last", "all"] = "last",
               chunk_seconds: float = 30.0) -> torch.Tensor:
        """Per-video-frame audio features.

        Args:
            waveform, sample_rate, layers, chunk_seconds: as in :meth:`features`.
            fps: the video's frame rate.
            num_frames: frames to produce (default ``round(duration * fps)``).

        Returns:
            ``[num_frames, D]`` (``[num_frames, L + 1, D]`` with ``layers="all"``).
        """
        check_positive("fps", fps)
        feats, times = self.features(waveform, sample_rate, layers=layers,
                                     chunk_seconds=chunk_seconds)
        if num_frames is None:
            length = as_tensor("waveform", waveform).shape[-1]
            num_frames = max(1, int(round(length / sample_rate * fps)))
        check_positive("num_frames", num_frames, integer=True)
        return resample_to_frames(feats, times, video_frame_times(num_frames, fps))

    def encode_file(self, path: str | os.PathLike, *, fps: float | None = None,
                    num_frames: int | None = None, layers: Literal["last", "all"] = "last",
                    chunk_seconds: float = 30.0) -> torch.Tensor:
        """:meth:`encode` on the audio track of a file. For a video, ``fps`` and ``num_frames``
        default to the video's; for an audio file ``fps`` is required."""
        if fps is None or num_frames is None:
            try:
                info = media.video_info(path)
            except ValueError as err:
                if fps is None:
                    raise ValueError(f"{str(path)!r} has no video stream: pass fps") from err
            else:
                fps = info.fps if fps is None else fps
                num_frames = info.num_frames if num_frames is None else num_frames
        wave, sr = media.read_audio(path, sample_rate=self.sample_rate, mono=True)
        return self.encode(wave, sr, fps=fps, num_frames=num_frames, layers=layers,
                           chunk_seconds=chunk_seconds)
