"""A folder of videos as a training dataset, with a per-video landmark cache.

Landmark cache: ``clip.mp4`` -> ``clip.landmarks.npz`` next to it, holding ``landmarks`` float32
``[N, 478, 3]`` (NaN where no face was found), ``found`` bool ``[N]`` and the video's size and
mtime (a changed video is recomputed). It is computed once with
:class:`avatar_models.conditioning.landmarks.FaceLandmarker` (mediapipe is imported only then)
and read back afterwards, so training with a warm cache needs no mediapipe.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from avatar_models import media
from avatar_models.data.samplers import (
    audio_span,
    keyframe_index,
    nonuniform_indices,
    segment_indices,
)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm")
CACHE_SUFFIX = ".landmarks.npz"
_CACHE_VERSION = 1


def landmark_cache_path(video_path: str | os.PathLike) -> Path:
    """``dir/clip.mp4`` -> ``dir/clip.landmarks.npz``."""
    p = Path(video_path)
    return p.with_name(p.stem + CACHE_SUFFIX)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def load_or_compute_landmarks(video_path: str | os.PathLike, *, landmarker=None,
                              recompute: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks of every frame of a video, through the ``.landmarks.npz`` cache.

    Args:
        video_path: the video.
        landmarker: a ``FaceLandmarker`` to use on a cache miss (default: a new one, per-frame
            detection).
        recompute: ignore an existing cache.

    Returns:
        ``(landmarks float32 [N, 478, 3], found bool [N])``; frames without a face are NaN.
    """
    path = Path(video_path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {str(path)!r}")
    cache = landmark_cache_path(path)
    size, mtime = _stamp(path)
    if cache.is_file() and not recompute:
        with np.load(cache, allow_pickle=False) as z:
            fresh = (int(z["version"]) == _CACHE_VERSION and int(z["video_size"]) == size
                     and int(z["video_mtime_ns"]) == mtime)
            if fresh:
                return z["landmarks"], z["found"]
    from avatar_models.conditioning.landmarks import FaceLandmarker  # mediapipe only on a miss

    frames = media.read_video(path, with_audio=False).frames
    if landmarker is None:
        with FaceLandmarker() as own:
            lms = own(frames, on_missing="nan").numpy()
    else:
        lms = landmarker(frames, on_missing="nan").numpy()
    found = np.isfinite(lms).all(axis=(1, 2))
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, landmarks=lms.astype(np.float32), found=found, version=_CACHE_VERSION,
             video_size=size, video_mtime_ns=mtime)
    os.replace(tmp, cache)
    return lms, found


class VideoFolderDataset(Dataset):
    """Videos under ``root`` (recursively), one sample per video per ``__getitem__``.

    Args:
        root: folder searched for ``VIDEO_EXTENSIONS`` files.
        num_frames: T, frames per sample.
        mode: ``"nonuniform"`` (Anchored Diffusion: sorted random frames + farthest source frame,
            see :func:`~avatar_models.data.samplers.nonuniform_indices`) or ``"segment"``
            (contiguous frames, optional aligned audio and lookahead keyframe).
        max_span: nonuniform mode: largest window the T frames are drawn from (None: the video).
        stride: segment mode: frame step.
        with_audio: segment mode: add the aligned waveform, resampled to ``audio_sample_rate``.
        keyframe_max_distance: segment mode: add a keyframe ``l ~ U[0, T - 1 + d_max]`` frames
            after the segment start (Lookahead Anchoring); None: no keyframe.
        with_landmarks: add cached landmarks (computed on first use, see module doc).
        seed: fixed seed -> sample ``i`` is the same every epoch; None -> drawn from torch's
            global RNG (DataLoader seeds it per worker).
        transform: optional callable applied to each sample dict.

    Videos too short for a sample are skipped (listed in ``self.skipped``); so are unreadable
    (corrupt) files, with a warning naming each.

    Sample dict (``T = num_frames``):
        ``frames`` uint8 [T, H, W, 3]; ``indices`` int64 [T]; ``fps`` float; ``path`` str;
        nonuniform: ``source`` uint8 [H, W, 3], ``source_index`` int;
        segment + audio: ``audio`` float32 [1, S] (S = round(T * stride / fps * rate), zero-padded
        past the end of the track), ``sample_rate`` int;
        segment + keyframe: ``keyframe`` uint8 [H, W, 3], ``keyframe_index`` int;
        landmarks: ``landmarks`` float32 [T, 478, 3] and ``source_landmarks`` /
        ``keyframe_landmarks`` [478, 3] (NaN where no face was found).
    Use :func:`avatar_models.media.to_model_frames` for float [-1, 1] channels-first frames.
    """

    def __init__(self, root: str | os.PathLike, num_frames: int, *,
                 mode: Literal["nonuniform", "segment"] = "nonuniform",
                 max_span: int | None = None, stride: int = 1, with_audio: bool = False,
                 audio_sample_rate: int = 16000, keyframe_max_distance: int | None = None,
                 with_landmarks: bool = False, seed: int | None = None,
                 transform: Callable[[dict], dict] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"video folder not found: {str(root)!r}")
        if mode not in ("nonuniform", "segment"):
            raise ValueError(f"mode must be 'nonuniform' or 'segment', got {mode!r}")
        if mode == "nonuniform" and (with_audio or keyframe_max_distance is not None):
            raise ValueError("with_audio and keyframe_max_distance need mode='segment'")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        self.root, self.num_frames, self.mode = root, num_frames, mode
        self.max_span, self.stride = max_span, stride
        self.with_audio, self.audio_sample_rate = with_audio, audio_sample_rate
        self.keyframe_max_distance = keyframe_max_distance
        self.with_landmarks, self.seed, self.transform = with_landmarks, seed, transform
        needed = num_frames + 1 if mode == "nonuniform" else (num_frames - 1) * stride + 1
        files = sorted(p for p in root.rglob("*")
                       if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        self.videos: list[media.VideoInfo] = []
        self.skipped: list[str] = []
        for p in files:
            try:
                info = media.video_info(p)
            except (av.error.FFmpegError, ValueError, OSError) as exc:
                warnings.warn(f"skipping {str(p)!r}: not a readable video ({exc})",
                              stacklevel=2)
                self.skipped.append(str(p))
                continue
            ok = info.num_frames >= needed and (info.has_audio or not with_audio)
            (self.videos if ok else self.skipped).append(info if ok else str(p))
        if not self.videos:
            raise ValueError(f"no usable video under {str(root)!r}: need {VIDEO_EXTENSIONS} files "
                             f"with >= {needed} frames{' and audio' if with_audio else ''}; "
                             f"skipped {self.skipped}")

    def __len__(self) -> int:
        return len(self.videos)

    def _generator(self, index: int) -> torch.Generator:
        seed = (int(torch.randint(0, 2**62, (1,)).item()) if self.seed is None
                else self.seed * 1_000_003 + index)
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, index: int) -> dict:
        info = self.videos[index]
        g = self._generator(index)
        n, t = info.num_frames, self.num_frames
        sample: dict = {"path": info.path, "fps": info.fps}
        extra: dict[str, int] = {}
        if self.mode == "nonuniform":
            idx, extra["source"] = nonuniform_indices(n, t, g, max_span=self.max_span)
        else:
            idx = segment_indices(n, t, g, stride=self.stride)
            if self.keyframe_max_distance is not None:
                extra["keyframe"] = keyframe_index(int(idx[0]), int(idx[-1]) - int(idx[0]) + 1,
                                                   n, self.keyframe_max_distance, g)
        wanted = idx.tolist() + list(extra.values())
        frames = media.read_video(info.path, frames=wanted, with_audio=False).frames
        sample["frames"], sample["indices"] = frames[:t], idx
        for k, (name, frame_index) in enumerate(extra.items()):
            sample[name], sample[f"{name}_index"] = frames[t + k], frame_index
        if self.with_audio:
            sr = self.audio_sample_rate
            lo, hi = audio_span(int(idx[0]), t * self.stride, info.fps, sr)
            seg, _ = media.read_audio(info.path, sample_rate=sr, mono=True, start=lo / sr,
                                      end=hi / sr)
            seg = seg[:, :hi - lo]
            sample["audio"] = torch.nn.functional.pad(seg, (0, (hi - lo) - seg.shape[1]))
            sample["sample_rate"] = sr
        if self.with_landmarks:
            lms = torch.from_numpy(load_or_compute_landmarks(info.path)[0])
            sample["landmarks"] = lms[idx]
            for name, frame_index in extra.items():
                sample[f"{name}_landmarks"] = lms[frame_index]
        return self.transform(sample) if self.transform is not None else sample
