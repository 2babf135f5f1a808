"""AudioEncoder over a tiny random Wav2Vec2Model saved to disk; time resampling to frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from avatar_models import media
from avatar_models.conditioning.audio import (
    AudioEncoder,
    receptive_field,
    resample_to_frames,
    video_frame_times,
)

DIM, LAYERS = 16, 2


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=2,
                         intermediate_size=32, conv_dim=(8, 8, 8), conv_stride=(5, 4, 4),
                         conv_kernel=(10, 4, 4), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=2, vocab_size=10)
    path = tmp_path_factory.mktemp("w2v")
    Wav2Vec2Model(cfg).save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"sampling_rate": 16000, "do_normalize": True, "feature_size": 1}))
    return path


@pytest.fixture(scope="module")
def enc(w2v_dir):
    return AudioEncoder.from_pretrained(w2v_dir)


def test_receptive_field():
    assert receptive_field((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)) == (400, 320)
    assert receptive_field((10, 4, 4), (5, 4, 4)) == (10 + 3 * 5 + 3 * 20, 80)


def test_resample_to_frames_is_linear_in_time():
    t = torch.tensor([0.01, 0.03, 0.05, 0.07], dtype=torch.float64)
    feats = torch.stack([2 * t + 1, -t], dim=1).float()  # linear in time: exact interpolation
    q = torch.tensor([0.0, 0.02, 0.035, 0.07, 0.2], dtype=torch.float64)
    out = resample_to_frames(feats, t, q)
    qc = q.clamp(0.01, 0.07)  # held at the ends
    torch.testing.assert_close(out, torch.stack([2 * qc + 1, -qc], dim=1).float())
    torch.testing.assert_close(video_frame_times(3, 25.0),
                               torch.tensor([0.02, 0.06, 0.10], dtype=torch.float64))
    with pytest.raises(ValueError, match="strictly increasing"):
        resample_to_frames(feats, t.flip(0), q)
    with pytest.raises(ValueError, match=r"features must be \[N, \.\.\.\] with N"):
        resample_to_frames(feats[:3], t, q)


def test_encode_shapes(enc):
    assert (enc.sample_rate, enc.feature_dim, enc.stride) == (16000, DIM, 80)
    g = torch.Generator().manual_seed(0)
    wave = torch.randn(16000, generator=g) * 0.1  # 1 s
    feats, times = enc.features(wave, 16000)
    assert feats.shape[1] == DIM and feats.shape[0] == times.shape[0]
    assert feats.shape[0] == (16000 - enc.receptive_field) // enc.stride + 1
    assert bool((times[1:] > times[:-1]).all())
    out = enc.encode(wave, 16000, fps=25.0)
    assert out.shape == (25, DIM) and out.dtype == torch.float32
    assert enc.encode(wave, 16000, fps=30.0, num_frames=7).shape == (7, DIM)
    allh = enc.encode(wave, 16000, fps=25.0, layers="all")
    assert allh.shape == (25, LAYERS + 1, DIM)
    torch.testing.assert_close(allh[:, -1], out)
    # frame i's vector interpolates the wav2vec features around (i + 0.5) / fps
    i = 10
    k = int(torch.searchsorted(times, torch.tensor((i + 0.5) / 25.0, dtype=torch.float64)))
    lo, hi = feats[k - 1], feats[k]
    w = ((i + 0.5) / 25.0 - times[k - 1]) / (times[k] - times[k - 1])
    torch.testing.assert_close(out[i], lo + (hi - lo) * float(w), atol=1e-5, rtol=1e-4)


def test_channels_rate_and_chunks(enc):
    g = torch.Generator().manual_seed(1)
    wave = torch.randn(16000, generator=g) * 0.1
    out = enc.encode(wave, 16000, fps=25.0)
    torch.testing.assert_close(enc.encode(torch.stack([wave, wave]), 16000, fps=25.0), out)
    torch.testing.assert_close(enc.encode(wave * 3, 16000, fps=25.0), out, atol=1e-4, rtol=1e-3)
    up = media.resample_audio(wave, 16000, 32000)
    assert enc.encode(up, 32000, fps=25.0).shape == (25, DIM)
    feats, times = enc.features(wave, 16000, chunk_seconds=0.3)  # 4 chunks
    whole, whole_t = enc.features(wave, 16000)
    assert bool((times[1:] > times[:-1]).all())
    assert abs(feats.shape[0] - whole.shape[0]) <= 4
    assert times[-1] == pytest.approx(float(whole_t[-1]), abs=0.01)
    assert enc.encode(wave, 16000, fps=25.0, chunk_seconds=0.3).shape == (25, DIM)
    # a 40-sample tail (shorter than the receptive field) is folded into the previous chunk
    folded, _ = enc.features(wave, 16000, chunk_seconds=15960 / 16000)
    assert folded.shape[0] == whole.shape[0]


def test_encode_file_uses_the_video_timeline(enc, tmp_path):
    sr, fps, t = 22050, 20.0, 14
    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(int(sr * t / fps)) / sr)).astype(np.float32)
    path = media.write_video(tmp_path / "v.mp4", np.zeros((t, 16, 16, 3), np.uint8), fps,
                             audio=tone, sample_rate=sr)
    assert enc.encode_file(path).shape == (t, DIM)
    assert enc.encode_file(path, fps=10.0, num_frames=5).shape == (5, DIM)


def test_bad_input_and_missing_folder(enc, tmp_path):
    with pytest.raises(ValueError, match=r"waveform must be \[S\] or \[C, S\]"):
        enc.encode(torch.zeros(1, 1, 100), 16000, fps=25)
    with pytest.raises(TypeError, match="waveform must be a floating-point tensor"):
        enc.encode(torch.zeros(1000, dtype=torch.int16), 16000, fps=25)
    with pytest.raises(ValueError, match="waveform is too short"):
        enc.encode(torch.zeros(20), 16000, fps=25)
    with pytest.raises(ValueError, match="layers must be"):
        enc.features(torch.zeros(1000), 16000, layers="middle")
    with pytest.raises(FileNotFoundError, match="w2v_missing.*Wav2Vec2Model"):
        AudioEncoder.from_pretrained(tmp_path / "w2v_missing")
