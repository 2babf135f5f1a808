"""avatar_models.media: mp4 + AAC round trips, frame selection, images, contact sheets."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from avatar_models import media


def _frames(t: int, h: int, w: int) -> np.ndarray:
    """Smooth, frame-dependent content (compresses well, every frame distinct)."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i, ..., 0] = (x * 255 // max(w - 1, 1)).astype(np.uint8)
        out[i, ..., 1] = (y * 255 // max(h - 1, 1)).astype(np.uint8)
        out[i, ..., 2] = (i * 7) % 256
    return out


def _sine(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * sr))) / sr)).astype(
        np.float32)


def test_video_with_audio_round_trip(tmp_path):
    t, h, w, fps, sr = 20, 48, 64, 25.0, 16000
    frames = _frames(t, h, w)
    wave = _sine(t / fps, sr)
    path = media.write_video(tmp_path / "a" / "clip.mp4", frames, fps, audio=wave, sample_rate=sr)
    info = media.video_info(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (t, fps, w, h)
    assert info.has_audio and info.audio_sample_rate == sr
    assert info.duration == pytest.approx(t / fps)

    video = media.read_video(path)
    got, got_fps, audio, got_sr = video  # NamedTuple unpacking
    assert got.dtype == torch.uint8 and got.shape == (t, h, w, 3)
    assert got_fps == fps and got_sr == sr
    err = (got.float() - torch.from_numpy(frames).float()).abs().mean().item()
    assert err < 4.0, err
    assert audio.dtype == torch.float32 and audio.shape[0] == 1
    assert audio.shape[1] / sr == pytest.approx(t / fps, abs=0.03)
    n = min(audio.shape[1], wave.shape[0])
    # AAC is lossy but a 440 Hz tone survives; compare away from the edges
    diff = (audio[0, 500:n - 500] - torch.from_numpy(wave[500:n - 500])).abs().mean().item()
    assert diff < 0.02, diff


def test_stereo_audio_and_resampling(tmp_path):
    sr = 44100
    left, right = _sine(0.5, sr, 440, 0.5), _sine(0.5, sr, 440, 0.1)
    path = media.write_video(tmp_path / "s.mp4", _frames(12, 32, 32), 24,
                             audio=np.stack([left, right]), sample_rate=sr)
    wave, rate = media.read_audio(path, mono=False)
    assert rate == sr and wave.shape[0] == 2
    rms = wave[:, 2000:-2000].pow(2).mean(1).sqrt()
    assert rms[0] / rms[1] == pytest.approx(5.0, rel=0.1)
    mono16, rate16 = media.read_audio(path, sample_rate=16000)
    part, _ = media.read_audio(path, sample_rate=16000, start=0.1, end=0.2)
    torch.testing.assert_close(part, mono16[:, 1600:3200])
    with pytest.raises(ValueError, match="need 0 <= start <= end"):
        media.read_audio(path, start=0.3, end=0.2)
    assert rate16 == 16000 and mono16.shape[0] == 1
    assert mono16.shape[1] == pytest.approx(8000, abs=40)
    res = media.resample_audio(torch.from_numpy(left), sr, 16000)
    assert res.shape == (8000,)
    ref = torch.from_numpy(_sine(0.5, 16000, 440, 0.5))
    assert (res[200:-200] - ref[200:-200]).abs().max() < 0.01


def test_wav_round_trip_clamps_and_rejects_multichannel(tmp_path):
    wave = torch.sin(torch.arange(1600) / 5.0) * 0.5
    wave[:10] = 2.0                                                    # out of range: clamped
    path = media.write_wav(tmp_path / "a.wav", wave, 16000)
    back, rate = media.read_audio(path)
    assert rate == 16000 and back.shape == (1, 1600)
    assert torch.allclose(back[0, 10:], wave[10:], atol=1 / 32767 + 1e-6)
    assert torch.allclose(back[0, :10], torch.ones(10), atol=1e-4)
    with pytest.raises(ValueError, match="wave: expected mono"):
        media.write_wav(tmp_path / "b.wav", torch.zeros(2, 100), 16000)


def test_ntsc_rate_is_kept_as_a_fraction(tmp_path):
    path = media.write_video(tmp_path / "ntsc.mp4", _frames(6, 16, 16), 30000 / 1001)
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == Fraction(30000, 1001)
    assert media.video_info(path).fps == pytest.approx(29.97, abs=1e-3)


def test_selected_frames_match_full_decode(tmp_path, monkeypatch):
    t = 150
    path = media.write_video(tmp_path / "long.mp4", _frames(t, 16, 16), 25, keyframe_interval=12)
    full = media.read_video(path, with_audio=False).frames
    assert full.shape[0] == t
    linear = media._decode_linear
    calls = []
    monkeypatch.setattr(media, "_decode_linear", lambda *a: calls.append(a) or linear(*a))
    for wanted in ([0], [149], [3, 120, 4, 60, 61, 3], [100, 0], [50, 148, 149]):
        got = media.read_video(path, frames=wanted).frames
        assert torch.equal(got, full[wanted]), wanted
    assert not calls  # constant frame rate: timestamps + seeking, no linear fallback
    with pytest.raises(ValueError, match="frames index 150 out of range"):
        media.read_video(path, frames=[2, 150])
    with pytest.raises(ValueError, match=">= 0"):
        media.read_video(path, frames=[-1])


def test_odd_sizes_error_or_pad(tmp_path):
    odd = _frames(3, 15, 20)
    with pytest.raises(ValueError, match=r"even.*H=15, W=20"):
        media.write_video(tmp_path / "odd.mp4", odd, 10)
    path = media.write_video(tmp_path / "odd.mp4", odd, 10, pad_to_even=True)
    got = media.read_video(path).frames
    assert got.shape == (3, 16, 20, 3)
    got = got.float()
    # a 16x20 frame with steep gradients loses a little more to 4:2:0 chroma than a large one
    assert (got[:, :15] - torch.from_numpy(odd).float()).abs().mean() < 8
    assert (got[:, 15] - got[:, 14]).abs().mean() < (got[:, 1] - got[:, 0]).abs().mean() + 4


def test_write_video_rejects_bad_input(tmp_path):
    f = tmp_path / "x.mp4"
    with pytest.raises(TypeError, match="dtype uint8.*got float32.*to_uint8_frames"):
        media.write_video(f, np.zeros((2, 8, 8, 3), np.float32), 10)
    with pytest.raises(ValueError, match=r"frames must be \[T, H, W, 3\]"):
        media.write_video(f, np.zeros((8, 8, 3), np.uint8), 10)
    with pytest.raises(ValueError, match="frames must be"):
        media.write_video(f, np.zeros((2, 8, 8, 4), np.uint8), 10)
    with pytest.raises(ValueError, match="sample_rate is required"):
        media.write_video(f, np.zeros((2, 8, 8, 3), np.uint8), 10, audio=np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="audio must have 1 or 2 channels"):
        media.write_video(f, np.zeros((2, 8, 8, 3), np.uint8), 10,
                          audio=np.zeros((3, 100), np.float32), sample_rate=8000)
    with pytest.raises(ValueError, match="fps must be > 0"):
        media.write_video(f, np.zeros((2, 8, 8, 3), np.uint8), 0)


def test_missing_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.mp4"
    for fn in (media.read_video, media.video_info, media.read_audio, media.read_image):
        with pytest.raises(FileNotFoundError, match="nope.mp4"):
            fn(missing)


def test_silent_video_has_no_audio(tmp_path):
    path = media.write_video(tmp_path / "silent.mp4", _frames(4, 16, 16), 8)
    video = media.read_video(path)
    assert video.audio is None and video.sample_rate is None
    with pytest.raises(ValueError, match="has no audio stream"):
        media.read_audio(path)


def test_image_round_trip_and_frame_conversions(tmp_path):
    img = _frames(1, 20, 30)[0]
    media.write_image(tmp_path / "i.png", img)
    assert torch.equal(media.read_image(tmp_path / "i.png"), torch.from_numpy(img))
    Image.fromarray(img[..., 0]).save(tmp_path / "grey.png")
    assert media.read_image(tmp_path / "grey.png").shape == (20, 30, 3)

    u8 = torch.from_numpy(_frames(2, 6, 5))
    x = media.to_model_frames(u8)
    assert x.shape == (2, 3, 6, 5) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, 0, 0, -1] == 1.0 and x[0, 0, 0, 0] == -1.0  # red channel ramp: 0 -> 255
    assert torch.equal(media.to_uint8_frames(x), u8)
    assert torch.equal(media.to_uint8_frames(torch.full((3, 2, 2), 5.0)),
                       torch.full((2, 2, 3), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"frames must be \[\.\.\., 3, H, W\]"):
        media.to_uint8_frames(torch.zeros(2, 4, 5, 5))


def test_contact_sheet(tmp_path):
    a = torch.from_numpy(_frames(3, 10, 12))
    b = torch.zeros(2, 10, 12, 3, dtype=torch.uint8)
    sheet = media.contact_sheet([a, b], path=tmp_path / "s.png", gap=2)
    assert sheet.size == (3 * 14 + 2, 2 * 12 + 2)
    back = np.array(Image.open(tmp_path / "s.png"))
    assert back.shape == (26, 44, 3)
    assert np.array_equal(back[2:12, 2:14], a[0].numpy())  # first tile where expected
    assert np.array_equal(back[14:24, 16:28], b[1].numpy())
    assert (back[14:24, 30:42] == 255).all()  # missing tile of the short row is background

    labelled = media.contact_sheet([a, b], labels=["ground truth", "ours"])
    assert labelled.size[0] > sheet.size[0] and labelled.size[1] == sheet.size[1]
    margin = labelled.size[0] - sheet.size[0]
    assert (np.array(labelled)[:, :margin] < 128).any()  # some label ink
    grid = media.contact_sheet(torch.from_numpy(_frames(6, 10, 12)), ncols=4)
    assert grid.size == (4 * 14 + 2, 2 * 12 + 2)
    with pytest.raises(ValueError, match="labels must have one entry per row"):
        media.contact_sheet([a, b], labels=["only one"])
    with pytest.raises(ValueError, match=r"rows\[1\] frames must be 10x12"):
        media.contact_sheet([a, torch.zeros(1, 8, 12, 3, dtype=torch.uint8)])
