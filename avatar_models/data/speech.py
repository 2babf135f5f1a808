"""Toy audio shared by the talking-face systems (Lookahead, MCDM, WarpFace tests): a speech-like
waveform whose loudness follows a mouth-opening track, and its weight-free per-frame energy
feature, the stand-in for Wav2Vec2 in the toy worlds."""

from __future__ import annotations

import math

import torch


def speech_waveform(mouth_open: torch.Tensor, fps: float, sample_rate: int = 16000,
                    seed: int = 0) -> torch.Tensor:
    """A voiced-speech-like waveform [S] whose loudness follows the mouth opening [N] in [0, 1]:
    a 130 Hz harmonic tone with a slowly wandering pitch plus breath noise, amplitude-modulated
    by the opening (linearly interpolated between frame centres). S = round(N / fps * rate)."""
    n = mouth_open.shape[0]
    samples = int(round(n / fps * sample_rate))
    gen = torch.Generator().manual_seed(seed)
    times = torch.arange(samples, dtype=torch.float64) / sample_rate
    frame_pos = (times * fps - 0.5).clamp(0, n - 1)
    lo = frame_pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = frame_pos - lo
    env = mouth_open.double()[lo] * (1 - frac) + mouth_open.double()[hi] * frac
    pitch = 130.0 * (1 + 0.08 * torch.sin(2 * math.pi * 0.7 * times))
    phase = 2 * math.pi * torch.cumsum(pitch, 0) / sample_rate
    voice = sum(torch.sin(k * phase) / k for k in (1, 2, 3, 4))
    breath = 0.05 * torch.randn(samples, generator=gen, dtype=torch.float64)
    return (0.4 * env * (voice + breath)).float().clamp(-1, 1)


def energy_features(waveform: torch.Tensor, sample_rate: int, fps: float, frames: int,
                    bands: int = 4) -> torch.Tensor:
    """Weight-free per-frame audio feature [frames, bands]: the RMS energy of ``bands`` equal
    sub-intervals of each video frame's display interval (zero past the end of the audio),
    scaled so a full-volume tone reads about 1."""
    if waveform.dim() != 1:
        raise ValueError(f"waveform must be mono [S], got shape {list(waveform.shape)}")
    per = sample_rate / fps / bands
    edges = torch.round(torch.arange(frames * bands + 1, dtype=torch.float64) * per).long()
    total = int(edges[-1])
    wave = torch.nn.functional.pad(waveform.float(), (0, max(0, total - waveform.shape[0])))
    sq = torch.cat([torch.zeros(1), torch.cumsum(wave[:total].double() ** 2, 0)])
    counts = (edges[1:] - edges[:-1]).clamp_min(1).double()
    rms = ((sq[edges[1:]] - sq[edges[:-1]]) / counts).clamp_min(0).sqrt()
    return (rms * 3.0).float().view(frames, bands)
