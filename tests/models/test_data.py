"""Frame samplers (pure index functions) and the video-folder dataset with its landmark cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from avatar_models import media
from avatar_models.data import (
    audio_span,
    farthest_frame,
    keyframe_index,
    nonuniform_indices,
    segment_indices,
)
from avatar_models.data.video_folder import (
    VideoFolderDataset,
    landmark_cache_path,
    load_or_compute_landmarks,
)

# ------------------------------------------------------------------------------------- samplers


def _brute_force_source(indices: list[int], n: int) -> int:
    free = [j for j in range(n) if j not in indices]
    dist = [np.mean([abs(j - i) for i in indices]) for j in free]
    return free[int(np.argmax(dist))]  # argmax keeps the first (earlier) frame on ties


@pytest.mark.parametrize("num_frames,length,max_span", [(9, 8, None), (40, 4, None),
                                                        (200, 8, 30), (17, 1, None)])
def test_nonuniform_indices_properties(num_frames, length, max_span):
    seen_min, seen_max, uneven = num_frames, -1, 0
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        idx, src = nonuniform_indices(num_frames, length, g, max_span=max_span)
        assert idx.dtype == torch.long and idx.shape == (length,)
        lst = idx.tolist()
        assert lst == sorted(set(lst)), "sorted and distinct"
        assert 0 <= lst[0] and lst[-1] < num_frames
        if max_span is not None:
            assert lst[-1] - lst[0] < max_span
        assert src not in lst
        assert src == _brute_force_source(lst, num_frames)
        free = [j for j in range(num_frames) if j not in lst]
        assert src in (free[0], free[-1])  # first or last frame outside the sequence
        seen_min, seen_max = min(seen_min, lst[0]), max(seen_max, lst[-1])
        uneven += len(set(np.diff(lst).tolist())) > 1
    slack = 0 if max_span is None else 8  # a narrow window rarely lands exactly on an end
    assert seen_min <= slack and seen_max >= num_frames - 1 - slack  # the whole video is used
    if length > 2 and num_frames > length + 2:
        assert uneven > 150  # spacing really is non-uniform most of the time
    a = nonuniform_indices(num_frames, length, torch.Generator().manual_seed(7))
    b = nonuniform_indices(num_frames, length, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_farthest_frame():
    assert farthest_frame(torch.tensor([1, 2, 3]), 10) == 9
    assert farthest_frame(torch.tensor([6, 7, 8]), 10) == 0
    assert farthest_frame(torch.tensor([0, 1, 9]), 10) == 8  # mean distance, endpoint taken
    assert farthest_frame(torch.tensor([2, 7]), 10) == 0  # tie -> earlier frame
    with pytest.raises(ValueError, match="no source frame left"):
        farthest_frame(torch.arange(5), 5)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\]"):
        farthest_frame(torch.tensor([3, 5]), 5)


def test_nonuniform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_frames must be >= 9, got 8"):
        nonuniform_indices(8, 8)
    with pytest.raises(ValueError, match="max_span must be >= 4, got 2"):
        nonuniform_indices(20, 4, max_span=2)
    with pytest.raises(TypeError, match="length must be an int"):
        nonuniform_indices(20, 4.0)


def test_segment_keyframe_and_audio_span():
    starts = set()
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        idx = segment_indices(30, 5, g, stride=2)
        assert torch.equal(idx, idx[0] + 2 * torch.arange(5))
        assert idx[0] >= 0 and idx[-1] < 30
        starts.add(int(idx[0]))
    assert starts == set(range(30 - 8))
    inside = ahead = 0
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        k = keyframe_index(10, 8, 100, 12, g)
        assert 10 <= k <= 10 + 7 + 12
        inside += k < 18
        ahead += k >= 18
        assert keyframe_index(90, 8, 100, 12, g) <= 99  # capped at the last frame
    assert inside > 50 and ahead > 50  # l ~ U[0, n - 1 + d_max] spans both sides
    assert audio_span(0, 25, 25.0, 16000) == (0, 16000)
    lengths = {b - a for a, b in (audio_span(f, 7, 29.97, 16000) for f in range(100))}
    assert lengths == {int(round(7 / 29.97 * 16000))}
    assert audio_span(50, 7, 25.0, 16000)[0] == 32000
    with pytest.raises(ValueError, match="num_frames must be >= 9"):
        segment_indices(8, 5, stride=2)


# ------------------------------------------------------------------------------------- dataset

FPS = 20.0


def _indexed_video(path, n: int, size: int = 32, audio: bool = False):
    """Frame i is a flat colour encoding i; the audio amplitude ramps with time."""
    frames = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        frames[i] = (i * 6 % 256, 255 - i * 6 % 256, 128)
    wave, sr = None, None
    if audio:
        sr = 16000
        tt = np.arange(int(round(n / FPS * sr))) / sr
        wave = ((0.05 + 0.4 * tt / tt[-1]) * np.sin(2 * np.pi * 500 * tt)).astype(np.float32)
    media.write_video(path, frames, FPS, audio=wave, sample_rate=sr)
    return frames


def _decoded_index(frame: torch.Tensor) -> int:
    return int(round(frame[..., 0].float().mean().item() / 6))


def test_nonuniform_dataset_returns_the_sampled_frames(tmp_path):
    _indexed_video(tmp_path / "a.mp4", 40)
    _indexed_video(tmp_path / "sub" / "b.mp4", 12)
    _indexed_video(tmp_path / "short.mp4", 4)  # too short for T=6: skipped
    ds = VideoFolderDataset(tmp_path, 6, seed=3)
    assert len(ds) == 2 and ds.skipped == [str(tmp_path / "short.mp4")]
    for i in range(len(ds)):
        s = ds[i]
        assert s["frames"].shape == (6, 32, 32, 3) and s["frames"].dtype == torch.uint8
        assert [_decoded_index(f) for f in s["frames"]] == s["indices"].tolist()
        assert _decoded_index(s["source"]) == s["source_index"]
        n = media.video_info(s["path"]).num_frames
        assert s["source_index"] == farthest_frame(s["indices"], n)
        assert s["fps"] == FPS
        assert torch.equal(ds[i]["indices"], s["indices"])  # fixed seed: same sample
    free = VideoFolderDataset(tmp_path, 6)  # no seed: varies between calls
    assert len({tuple(free[0]["indices"].tolist()) for _ in range(6)}) > 1


def test_segment_dataset_with_audio_and_keyframe(tmp_path):
    n = 40
    _indexed_video(tmp_path / "talk.mp4", n, audio=True)
    _indexed_video(tmp_path / "mute.mp4", n)  # no audio: skipped when audio is asked for
    ds = VideoFolderDataset(tmp_path, 8, mode="segment", with_audio=True,
                            keyframe_max_distance=10, seed=0)
    assert len(ds) == 1 and ds.skipped == [str(tmp_path / "mute.mp4")]
    for seed in range(4):
        ds.seed = seed
        s = ds[0]
        idx = s["indices"].tolist()
        assert idx == list(range(idx[0], idx[0] + 8))
        assert [_decoded_index(f) for f in s["frames"]] == idx
        assert idx[0] <= s["keyframe_index"] <= min(idx[0] + 7 + 10, n - 1)
        assert _decoded_index(s["keyframe"]) == s["keyframe_index"]
        assert s["sample_rate"] == 16000 and s["audio"].shape == (1, 6400)  # 8 frames at 20 fps
        # amplitude of the ramp at the segment's middle time tells where the audio came from
        mid = (idx[0] + 4) / FPS
        expected = (0.05 + 0.4 * mid / (n / FPS)) / np.sqrt(2)
        rms = s["audio"].pow(2).mean().sqrt().item()
        assert rms == pytest.approx(expected, rel=0.1), (idx[0], rms, expected)


def test_landmark_cache_is_computed_once_and_refreshed(tmp_path, monkeypatch):
    face = np.array(Image.fromarray(skimage.data.astronaut()).resize((128, 128)))
    frames = np.stack([np.roll(face, s, axis=1) for s in range(0, 12, 2)])
    video = tmp_path / "face.mp4"
    media.write_video(video, frames, 10.0)
    ds = VideoFolderDataset(tmp_path, 3, with_landmarks=True, seed=1)
    s = ds[0]
    cache = landmark_cache_path(video)
    assert cache == tmp_path / "face.landmarks.npz" and cache.is_file()
    assert s["landmarks"].shape == (3, 478, 3) and torch.isfinite(s["landmarks"]).all()
    assert s["source_landmarks"].shape == (478, 3)
    with np.load(cache) as z:
        assert z["found"].all() and z["landmarks"].shape == (6, 478, 3)
        torch.testing.assert_close(s["landmarks"], torch.from_numpy(z["landmarks"])[s["indices"]])
    # the face moves right by 2 px per frame: so do the landmarks
    lms, _ = load_or_compute_landmarks(video)
    dx = np.diff(lms[:, :, 0].mean(1)) * 128
    assert np.allclose(dx, 2.0, atol=0.7), dx

    from avatar_models.conditioning import landmarks as lm_mod

    def boom(self, *a, **k):
        raise AssertionError("landmarks recomputed")

    monkeypatch.setattr(lm_mod.FaceLandmarker, "__call__", boom)
    assert torch.equal(ds[0]["landmarks"], s["landmarks"])  # served from the cache
    st = video.stat()
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # video changed
    with pytest.raises(AssertionError, match="landmarks recomputed"):
        ds[0]


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_videos_here"):
        VideoFolderDataset(tmp_path / "no_videos_here", 4)
    _indexed_video(tmp_path / "tiny.mp4", 3)
    with pytest.raises(ValueError, match="no usable video.*>= 5 frames"):
        VideoFolderDataset(tmp_path, 4)
    with pytest.raises(ValueError, match="need mode='segment'"):
        VideoFolderDataset(tmp_path, 2, with_audio=True)
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        load_or_compute_landmarks(tmp_path / "gone.mp4")
