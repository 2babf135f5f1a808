"""Training data: frame samplers (pure index functions) and a video-folder dataset.

``avatar_models.data.samplers`` needs only torch; the dataset (PyAV) is imported on first use of
its names, so ``from avatar_models.data import nonuniform_indices`` stays light.
"""

from __future__ import annotations

import importlib

from avatar_models.data.samplers import (
    audio_span,
    farthest_frame,
    keyframe_index,
    nonuniform_indices,
    segment_indices,
)

_LAZY = {"VideoFolderDataset", "load_or_compute_landmarks", "landmark_cache_path",
         "VIDEO_EXTENSIONS"}

__all__ = ["audio_span", "farthest_frame", "keyframe_index", "nonuniform_indices",
           "segment_indices", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.video_folder"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
