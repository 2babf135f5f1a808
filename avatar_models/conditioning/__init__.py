"""Frozen conditioning encoders: VAE, CLIP, MediaPipe landmarks, Wav2Vec2 audio.

Every pretrained part loads from a local folder (see README.md next to this file); nothing is
downloaded. Importing this package is cheap: each name below is imported from its submodule
(and that submodule's heavy dependency: diffusers, transformers, mediapipe, av) on first use::

    from avatar_models.conditioning import FrameVAE       # imports diffusers here
    from avatar_models.conditioning.face_regions import region_masks   # torch/numpy only
"""

from __future__ import annotations

import importlib

_LAZY = {
    "FrameVAE": "vae",
    "VAECodec": "vae",
    "CLIPEncoder": "clip",
    "mix_embeddings": "clip",
    "edit_embedding": "clip",
    "FaceLandmarker": "landmarks",
    "NoFaceFoundError": "landmarks",
    "detect_landmarks": "landmarks",
    "AudioEncoder": "audio",
    "resample_to_frames": "audio",
    "region_masks": "face_regions",
    "expressive_weights": "face_regions",
    "face_part_labels": "face_regions",
    "REGIONS": "face_regions",
    "PART_INDICES": "face_regions",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
