"""MediaPipe face mesh on a real face, region index sets, mask rasterisation, no-face errors."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import skimage.transform
import torch
from mediapipe.python.solutions import face_mesh_connections as fmc

from avatar_models.conditioning import face_regions as fr
from avatar_models.conditioning.landmarks import FaceLandmarker, NoFaceFoundError, detect_landmarks

# Face of skimage.data.astronaut() (512x512), measured by overlaying the mesh on the image:
# forehead/hairline ~y 70, chin ~y 178, cheeks ~x 178..272. The box leaves a margin around that.
FACE_BOX = (165, 55, 285, 195)  # x0, y0, x1, y1 in pixels


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astro_landmarks(astronaut):
    return detect_landmarks(astronaut)


def test_index_sets_are_the_mesh_connection_sets():
    names = {"left_eye": "LEFT_EYE", "right_eye": "RIGHT_EYE", "left_eyebrow": "LEFT_EYEBROW",
             "right_eyebrow": "RIGHT_EYEBROW", "lips": "LIPS", "nose": "NOSE",
             "face_oval": "FACE_OVAL", "left_iris": "LEFT_IRIS", "right_iris": "RIGHT_IRIS"}
    assert set(names) == set(fr.PART_INDICES)
    for part, const in names.items():
        edges = getattr(fmc, f"FACEMESH_{const}")
        assert fr.PART_INDICES[part] == tuple(sorted({i for e in edges for i in e})), part
    assert max(max(v) for v in fr.PART_INDICES.values()) < fr.NUM_LANDMARKS


def test_astronaut_landmarks_fall_on_the_face(astronaut, astro_landmarks):
    lm = astro_landmarks
    assert lm.shape == (478, 3) and lm.dtype == torch.float32
    assert torch.isfinite(lm).all()
    px = fr.to_pixels(lm, astronaut.shape[:2])
    x0, y0, x1, y1 = FACE_BOX
    assert (px[:, 0] > x0).all() and (px[:, 0] < x1).all()
    assert (px[:, 1] > y0).all() and (px[:, 1] < y1).all()
    # the mesh spans the face, not a corner of it
    assert px[:, 0].max() - px[:, 0].min() > 70 and px[:, 1].max() - px[:, 1].min() > 80

    def centre(part):
        return px[list(fr.PART_INDICES[part])].mean(0)

    left, right, mouth, nose = (centre(p) for p in ("left_eye", "right_eye", "lips", "nose"))
    assert left[0] > right[0] + 30  # subject's left eye is on the image's right
    assert abs(left[1] - right[1]) < 15  # upright face: eyes level
    assert mouth[1] > nose[1] > max(left[1], right[1])  # eyes above nose above mouth
    assert right[0] < mouth[0] < left[0]
    assert 190 < mouth[0] < 250 and 130 < mouth[1] < 160  # the smile, checked by eye


def test_region_masks_on_the_astronaut(astronaut, astro_landmarks):
    masks = fr.region_masks(astro_landmarks, 512)
    assert masks.shape == (len(fr.DEFAULT_REGIONS), 512, 512) and masks.dtype == torch.bool
    area = dict(zip(fr.DEFAULT_REGIONS, masks.flatten(1).sum(1).tolist()))
    assert all(v > 0 for v in area.values()), area
    assert area["face"] > area["mouth"] > area["eyes"] / 4
    assert area["face"] > 5 * (area["eyes"] + area["mouth"])
    for name in ("eyes", "eyebrows", "nose", "mouth"):  # every part lies in the face oval
        inside = (masks[fr.DEFAULT_REGIONS.index(name)] & masks[0]).sum()
        assert inside >= 0.9 * area[name], name
    ys, xs = masks[fr.DEFAULT_REGIONS.index("mouth")].nonzero(as_tuple=True)
    assert 120 < ys.float().mean() < 170 and 190 < xs.float().mean() < 250
    # resolution independent: the latent-size mask covers the same fraction of the image
    small = fr.region_masks(astro_landmarks, 64)
    frac_big = masks.flatten(1).float().mean(1)
    frac_small = small.flatten(1).float().mean(1)
    assert torch.allclose(frac_big, frac_small, atol=0.01)


def test_no_face_raises_naming_the_frame(astronaut):
    grey = np.full((256, 256, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    face = np.array(skimage.transform.resize(astronaut, (256, 256), preserve_range=True),
                    dtype=np.uint8)
    with pytest.raises(NoFaceFoundError, match="no face found in frame 0") as info:
        detect_landmarks(grey)
    assert isinstance(info.value, ValueError) and info.value.frame_index == 0
    video = np.stack([face, face, noise, grey])
    with FaceLandmarker() as lm:
        with pytest.raises(NoFaceFoundError, match=r"frame 2 \(of 4 frames\)") as info:
            lm(video)
        assert info.value.frame_index == 2
        out = lm(video, on_missing="nan")
    assert out.shape == (4, 478, 3)
    assert torch.isfinite(out[:2]).all() and torch.isnan(out[2:]).all()
    masks = fr.region_masks(out, 32)
    assert masks[:2].any() and not masks[2:].any()  # NaN frames give empty masks


def test_landmarker_rejects_bad_frames():
    with pytest.raises(TypeError, match="frames must have dtype uint8, got float32"):
        detect_landmarks(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"frames must be \[T, H, W, 3\]"):
        detect_landmarks(np.zeros((1, 2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="frames must be"):
        detect_landmarks(np.zeros((8, 8, 4), np.uint8))


def _square_landmarks(x0, y0, x1, y1) -> torch.Tensor:
    """Every landmark on the corners of one axis-aligned rectangle (normalised coords)."""
    corners = torch.tensor([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=torch.float32)
    lm = corners[torch.arange(fr.NUM_LANDMARKS) % 4]
    return torch.cat([lm, torch.zeros(fr.NUM_LANDMARKS, 1)], dim=1)


def test_rasterisation_is_exact_for_a_rectangle():
    lm = _square_landmarks(0.25, 0.5, 0.75, 1.0)
    m = fr.region_masks(lm, (8, 16), regions=("mouth", "face"))
    expected = torch.zeros(8, 16, dtype=torch.bool)
    expected[4:8, 4:12] = True  # pixel centres inside [4, 12) x [4, 8)
    assert torch.equal(m[0], expected) and torch.equal(m[1], expected)
    grown = fr.region_masks(lm, (8, 16), regions=("mouth",), dilate=1)[0]
    expected_grown = torch.zeros(8, 16, dtype=torch.bool)
    expected_grown[3:8, 3:13] = True
    assert torch.equal(grown, expected_grown)
    # batched leading dims are kept
    assert fr.region_masks(lm.expand(2, 3, -1, -1), 8).shape == (2, 3, 5, 8, 8)


def test_weights_and_part_labels(astro_landmarks):
    w = fr.expressive_weights(astro_landmarks, 64, lambda_ex=1.0)
    assert w.shape == (64, 64) and w.dtype == torch.float32
    assert set(w.unique().tolist()) == {1.0, 2.0}
    m = fr.region_masks(astro_landmarks, 64, fr.EXPRESSIVE_REGIONS).any(0)
    assert torch.equal(w == 2.0, m)
    labels = fr.face_part_labels(astro_landmarks, 64)
    assert labels.dtype == torch.long
    assert set(labels.unique().tolist()) == set(range(len(fr.FACE_PARTS)))
    mouth = fr.region_masks(astro_landmarks, 64, ("mouth",))[0]
    assert (labels[mouth] == fr.FACE_PARTS.index("mouth")).all()
    assert set(fr.EXPRESSIVE_INDICES) >= set(fr.PART_INDICES["lips"])


def test_region_masks_reject_bad_input():
    lm = _square_landmarks(0.1, 0.1, 0.9, 0.9)
    with pytest.raises(ValueError, match=r"landmarks must be \[\.\.\., 478, 2 or 3\]"):
        fr.region_masks(lm[:468], 16)
    with pytest.raises(ValueError, match="regions must be non-empty names"):
        fr.region_masks(lm, 16, regions=("ears",))
    with pytest.raises(ValueError, match="size must be a positive int"):
        fr.region_masks(lm, (0, 4))
    with pytest.raises(TypeError, match="landmarks must be floating point"):
        fr.region_masks(lm.long(), 16)


def test_masks_and_samplers_import_without_heavy_dependencies():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import avatar_models

    root = str(Path(avatar_models.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    code = ("import sys, avatar_models, avatar_models.conditioning, avatar_models.data\n"
            "import avatar_models.conditioning.face_regions\n"
            "heavy = {'av', 'diffusers', 'transformers', 'mediapipe'}\n"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.strip() == "[]", out.stdout
