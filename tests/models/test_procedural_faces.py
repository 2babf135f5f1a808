"""The procedural talking-face generator: determinism, identities, controls, masks, dataset."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from avatar_models.data import procedural_faces as pf


def _neutral(n: int = 1) -> torch.Tensor:
    p = torch.zeros(n, pf.N_PARAMS)
    p[:, 3:5] = 1.0  # eyes open
    p[:, 5] = 0.5
    return p


def test_deterministic_per_seed():
    a, b = pf.make_video(7, 11, 12), pf.make_video(7, 11, 12)
    for key in ("frames", "masks", "params", "controls"):
        assert torch.equal(a[key], b[key]), key
    assert pf.sample_identity(7) == pf.sample_identity(7)
    assert not torch.equal(pf.sample_motion(11, 12), pf.sample_motion(12, 12))


def test_shapes_and_ranges():
    v = pf.make_video(3, 4, 9)
    assert v["frames"].shape == (9, 3, 64, 64) and v["frames"].dtype == torch.float32
    assert v["masks"].shape == (9, 1, 64, 64)
    assert v["params"].shape == (9, pf.N_PARAMS) and v["controls"].shape == (9, pf.CONTROL_DIM)
    assert 0.0 <= v["frames"].min() and v["frames"].max() <= 1.0
    assert set(v["masks"].unique().tolist()) <= {0.0, 1.0}
    assert v["controls"].abs().max() <= 1.0
    lo = torch.tensor([-1, -1, -1, 0, 0, 0, -1, 0.0])
    assert ((v["params"] >= lo) & (v["params"] <= 1)).all()


def test_identities_differ():
    p = _neutral()
    frames = [pf.render(pf.sample_identity(s), p)[0] for s in range(6)]
    for i in range(6):
        for j in range(i + 1, 6):
            assert (frames[i] - frames[j]).abs().mean() > 0.03, (i, j)
    emb = pf.identity_embedding(torch.cat(frames))
    assert emb.shape == (6, pf.IDENTITY_DIM)
    assert torch.cdist(emb, emb).add(torch.eye(6) * 1e3).min() > 0.5


def _changed(ident, p0, p1):
    f0, m0 = pf.render(ident, p0)
    f1, m1 = pf.render(ident, p1)
    return (f0 - f1).abs().amax(1)[0] > 0.02, torch.maximum(m0, m1)[0, 0] > 0


@pytest.mark.parametrize("seed", [0, 5])
def test_expression_controls_change_only_their_region(seed):
    ident = pf.sample_identity(seed)
    p0 = _neutral()
    for col, value in ((5, 1.0), (6, 1.0), (7, 1.0)):  # mouth_open, smile, brow
        p1 = p0.clone()
        p1[:, col] = value
        changed, mask = _changed(ident, p0, p1)
        assert changed.sum() > 6, pf.PARAM_NAMES[col]
        assert not (changed & ~mask).any(), pf.PARAM_NAMES[col]
    # mouth changes below the eyes, brows above them
    rows = torch.arange(64).view(64, 1).expand(64, 64)
    p1 = p0.clone()
    p1[:, 5] = 0.0
    changed, _ = _changed(ident, p0, p1)
    assert rows[changed].min() > 34
    p1 = p0.clone()
    p1[:, 7] = 1.0
    changed, _ = _changed(ident, p0, p1)
    assert rows[changed].max() < 28


def test_eye_controls_are_per_side():
    ident = pf.sample_identity(2)
    cols = torch.arange(64).view(1, 64).expand(64, 64)
    for col, left in ((3, True), (4, False)):
        p1 = _neutral()
        p1[:, col] = 0.0
        changed, mask = _changed(ident, _neutral(), p1)
        assert changed.sum() > 6 and not (changed & ~mask).any()
        xs = cols[changed]
        assert (xs.max() < 32) if left else (xs.min() >= 32)


def test_head_pose_moves_the_face():
    ident = pf.sample_identity(4)
    p = _neutral(3)
    p[1, 0] = 1.0  # head_x: +6 px
    p[2, 1] = 1.0  # head_y: +4 px
    frames, masks = pf.render(ident, p)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    cen = [((m[0] * xs).sum() / m.sum(), (m[0] * ys).sum() / m.sum()) for m in masks]
    assert abs(cen[1][0] - cen[0][0] - 6.0) < 0.5 and abs(cen[1][1] - cen[0][1]) < 0.5
    assert abs(cen[2][1] - cen[0][1] - 4.0) < 0.5 and abs(cen[2][0] - cen[0][0]) < 0.5
    lm = pf.landmarks(p).view(3, pf.N_LANDMARKS, 2)
    assert torch.allclose(lm[1, 0] - lm[0, 0], torch.tensor([6 / 32, 0.0]), atol=1e-6)
    tilt = _neutral()
    tilt[:, 2] = 1.0  # roll: landmarks rotate about the face centre
    d0, d1 = lm[0, 1] - lm[0, 0], pf.landmarks(tilt).view(pf.N_LANDMARKS, 2)[1] - lm[0, 0]
    assert torch.allclose(d0.norm(), d1.norm(), atol=1e-6) and not torch.allclose(d0, d1)


def test_mouth_pixels_lie_in_mask_and_render_is_differentiable():
    ident = pf.sample_identity(1)
    p = _neutral(2)
    p[:, 5] = torch.tensor([0.2, 1.0])
    p.requires_grad_(True)
    frames, masks = pf.render(ident, p)
    key = torch.tensor(pf.MOUTH_INSIDE).view(1, 3, 1, 1)
    inside = (frames.detach() - key).abs().amax(1) < 0.02
    assert inside[1].sum() > inside[0].sum() > 0
    assert not (inside & (masks[:, 0] == 0)).any()
    frames.sum().backward()
    assert torch.isfinite(p.grad).all() and (p.grad[:, [0, 1, 2, 5]].abs() > 0).all()


def test_dataset_items_in_training_layout():
    ds = pf.ProceduralFaces(frames=5, video_frames=20, seed=3, identities=50)
    item = ds.sample(torch.Generator().manual_seed(0))
    assert sorted(item) == ["control", "frames", "global", "mask"]
    assert item["frames"].shape == (5, 3, 64, 64)
    assert -1.0 <= item["frames"].min() and item["frames"].max() <= 1.0
    assert item["frames"].min() < -0.5 and item["frames"].max() > 0.5
    assert item["control"].shape == (5, pf.CONTROL_DIM)
    assert item["global"].shape == (pf.IDENTITY_DIM,)
    assert item["mask"].shape == (5, 1, 64, 64) and item["mask"].sum() > 0
    a = next(iter(ds))
    b = next(iter(pf.ProceduralFaces(frames=5, video_frames=20, seed=3, identities=50)))
    c = next(iter(pf.ProceduralFaces(5, 20, seed=4)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["frames"], c["frames"])
    d = pf.training_dataset(frames=4, video_frames=30, seed=1)
    assert (d.frames, d.video_frames, d.seed, d.identities) == (4, 30, 1, pf.HELD_OUT_SEED_BASE)


def test_dataset_source_is_the_identity_and_frames_follow_controls():
    # the global vector is the embedding of another frame of the same clip: same identity
    ds = pf.ProceduralFaces(frames=3, video_frames=30, seed=0, identities=1)
    item = ds.sample(torch.Generator().manual_seed(1))
    ident = pf.sample_identity(0)
    neutral = pf.identity_embedding(pf.render(ident, _neutral())[0][0])
    other = pf.identity_embedding(pf.render(pf.sample_identity(1), _neutral())[0][0])
    assert (item["global"] - neutral).abs().mean() < (item["global"] - other).abs().mean()
    # frames are the renders of the identity at the poses the landmarks describe
    face_centre = item["control"].view(3, pf.N_LANDMARKS, 2)[:, 0] * 32 + 32
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    m = item["mask"][:, 0]
    mask_x = (m * xs).sum((1, 2)) / m.sum((1, 2))
    assert (mask_x - face_centre[:, 0]).abs().max() < 2.0


def test_bad_arguments_raise_with_names():
    with pytest.raises(ValueError, match=r"params: expected shape \[T, 8\], got \(3, 7\)"):
        pf.render(pf.sample_identity(0), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="params: expected shape"):
        pf.landmarks(torch.zeros(8))
    with pytest.raises(ValueError, match="seed: expected an int >= 0, got -1"):
        pf.sample_identity(-1)
    with pytest.raises(ValueError, match="frames: expected >= 1, got 0"):
        pf.sample_motion(0, 0)
    with pytest.raises(ValueError, match=r"source: expected shape \[..., 3, 64, 64\]"):
        pf.identity_embedding(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="frames: expected 1 <= frames < video_frames"):
        pf.ProceduralFaces(frames=8, video_frames=8)


# ---- the fine world: appearance that G does not carry ----

def test_fine_world_keeps_the_coarse_attributes_and_adds_fine_ones():
    plain, fine = pf.sample_identity(21), pf.sample_identity(21, "fine")
    assert plain.fine is None and fine.fine == pf.sample_fine_attributes(21)
    assert pf.coarse(fine) == dataclasses.replace(plain, texture=pf.FLAT_BACKGROUND)
    kinds = {pf.ACCESSORIES[pf.sample_fine_attributes(s).accessory] for s in range(40)}
    assert kinds == set(pf.ACCESSORIES)
    frames_plain = pf.render(plain, _neutral())[0]
    frames_fine = pf.render(fine, _neutral())[0]
    assert (frames_plain - frames_fine).abs().mean() > 0.02


def test_global_condition_is_invariant_to_fine_attributes_only():
    a = pf.sample_identity(3, "fine")
    b = dataclasses.replace(a, fine=pf.sample_fine_attributes(4))  # other fine attributes
    assert a.fine != b.fine
    p = _neutral(2)
    p[1, 0] = 0.8
    fa, fb = pf.render(a, p)[0], pf.render(b, p)[0]
    assert (fa - fb).abs().amax(1).gt(0.1).float().mean() > 0.2  # the frames differ a lot
    assert torch.equal(pf.global_condition(a, p), pf.global_condition(b, p))
    # ... but G still tells identities apart and follows the coarse layout (pose)
    other = pf.sample_identity(5, "fine")
    assert (pf.global_condition(a, p) - pf.global_condition(other, p)).abs().max() > 0.2
    g = pf.global_condition(a, p)
    assert (g[0] - g[1]).abs().max() > 0.05
    # in the plain world G is the thumbnail of the source frame itself
    plain = pf.sample_identity(3)
    assert torch.allclose(pf.global_condition(plain, p),
                          pf.identity_embedding(pf.render(plain, p)[0]))


def test_region_masks_never_touch_the_head_and_cover_face_and_hair():
    ident = pf.sample_identity(2, "fine")
    params = pf.sample_motion(9, 24)
    frames, _, layers = pf._draw(ident, params)
    m = pf.region_masks(ident, params)
    assert m["face_hair"].shape == (24, 1, 64, 64) and m["background"].shape == (1, 64, 64)
    assert m["background"].sum() > 500 and m["shirt"].sum() > 50
    assert not (m["background"] & m["shirt"]).any()
    head = layers["head"] > 0
    assert not (head & (m["background"] | m["shirt"])).any()
    # the readout regions show the same pixels in every frame of the clip
    still = (frames - frames[:1]).abs().amax(1) < 1e-6  # [T, H, W]
    assert still[:, m["background"][0]].all()
    # face and hair: the skin colour dominates, no accessory pixel counted
    assert not (m["face_hair"][:, 0] & (layers["accessory"] >= 0.5)).any()
    skin = (frames - torch.tensor(ident.skin).view(1, 3, 1, 1)).abs().amax(1) < 0.01
    assert skin.sum() > 24 * 200
    assert (skin & m["face_hair"][:, 0]).sum() == skin.sum()  # all skin lies in face_hair


def test_fine_dataset_uses_the_coarse_global_condition():
    ds = pf.ProceduralFaces(frames=3, video_frames=12, world="fine")
    item = ds.sample(torch.Generator().manual_seed(0))
    assert item["global"].shape == (pf.IDENTITY_DIM,) and item["frames"].shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="world"):
        pf.ProceduralFaces(world="noir")
    with pytest.raises(ValueError, match="world"):
        pf.sample_identity(1, "noir")
