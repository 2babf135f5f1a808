"""MediaPipe face-mesh landmarks (478 points with irises) for images and videos.

Uses mediapipe 0.10.21's legacy ``mp.solutions.face_mesh`` with ``refine_landmarks=True``: the
model ships inside the wheel, so nothing is downloaded (later mediapipe versions fetch it at run
time). Output convention is described in :mod:`avatar_models.conditioning.face_regions`, which
also holds the region index sets and the mask rasterisation (no mediapipe needed there)::

    with FaceLandmarker() as lm:
        pts = lm(frames)              # frames uint8 [T, H, W, 3] -> float32 [T, 478, 3]
    masks = region_masks(pts, 64)     # bool [T, 5, 64, 64]
"""

from __future__ import annotations

from typing import Literal

import mediapipe as mp
import numpy as np
import torch

from avatar_models.conditioning._checks import as_tensor, check_dim, check_dtype, check_rank
from avatar_models.conditioning.face_regions import (  # noqa: F401  (re-exported)
    DEFAULT_REGIONS,
    EXPRESSIVE_INDICES,
    EXPRESSIVE_REGIONS,
    FACE_PARTS,
    NUM_LANDMARKS,
    PART_INDICES,
    REGIONS,
    expressive_weights,
    face_part_labels,
    region_masks,
    to_pixels,
)


class NoFaceFoundError(ValueError):
    """No face was detected in a frame; ``frame_index`` says which (0 for a single image),
    ``path`` (optional) in which file; ``hint`` replaces the default advice."""

    def __init__(self, frame_index: int, num_frames: int, *, path: str | None = None,
                 hint: str | None = None):
        self.frame_index, self.num_frames, self.path = frame_index, num_frames, path
        where = f"{path}: " if path else ""
        hint = hint or "pass on_missing='nan' to get NaN landmarks for such frames instead"
        super().__init__(f"{where}no face found in frame {frame_index} (of {num_frames} "
                         f"frames); {hint}")


class FaceLandmarker:
    """Reusable MediaPipe face mesh (one face, 478 landmarks). Close it, or use ``with``.

    Args:
        video_mode: track the face across consecutive calls/frames (MediaPipe's
            ``static_image_mode=False``): smoother and faster for one video, but the state carries
            over between calls, so use one instance per video. Default: detect every frame.
        min_detection_confidence, min_tracking_confidence: MediaPipe thresholds.
    """

    def __init__(self, *, video_mode: bool = False, min_detection_confidence: float = 0.5,
                 min_tracking_confidence: float = 0.5):
        self.video_mode = video_mode
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=not video_mode, max_num_faces=1, refine_landmarks=True,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence)

    def __call__(self, frames: torch.Tensor | np.ndarray, *,
                 on_missing: Literal["raise", "nan"] = "raise") -> torch.Tensor:
        """Landmarks of ``frames`` uint8 ``[T, H, W, 3]`` (or one image ``[H, W, 3]``) RGB.

        Returns:
            float32 ``[T, 478, 3]`` (``[478, 3]`` for one image): x, y normalised to [0, 1] by
            width/height, z MediaPipe's relative depth.

        Raises:
            NoFaceFoundError (a ValueError) naming the first frame without a face, unless
            ``on_missing="nan"`` (such frames are NaN).
        """
        if on_missing not in ("raise", "nan"):
            raise ValueError(f"on_missing must be 'raise' or 'nan', got {on_missing!r}")
        x = as_tensor("frames", frames)
        check_rank("frames", x, (3, 4), "[T, H, W, 3] or [H, W, 3]")
        check_dim("frames", x, -1, 3, "[T, H, W, 3] or [H, W, 3]")
        check_dtype("frames", x, uint8=True)
        single = x.dim() == 3
        arr = x.detach().cpu().numpy()[None] if single else x.detach().cpu().numpy()
        out = np.full((arr.shape[0], NUM_LANDMARKS, 3), np.nan, dtype=np.float32)
        for t in range(arr.shape[0]):
            result = self._mesh.process(np.ascontiguousarray(arr[t]))
            if not result.multi_face_landmarks:
                if on_missing == "raise":
                    raise NoFaceFoundError(t, arr.shape[0])
                continue
            pts = result.multi_face_landmarks[0].landmark
            out[t] = [(p.x, p.y, p.z) for p in pts]
        res = torch.from_numpy(out)
        return res[0] if single else res

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def detect_landmarks(frames: torch.Tensor | np.ndarray, *, video_mode: bool = False,
                     on_missing: Literal["raise", "nan"] = "raise") -> torch.Tensor:
    """One-shot :class:`FaceLandmarker` call: uint8 ``[T, H, W, 3]`` -> float32 ``[T, 478, 3]``
    (``[H, W, 3]`` -> ``[478, 3]``). Raises :class:`NoFaceFoundError` naming the frame."""
    with FaceLandmarker(video_mode=video_mode) as landmarker:
        return landmarker(frames, on_missing=on_missing)
