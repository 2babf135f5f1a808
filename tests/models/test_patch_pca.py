"""The demo's tiny linear autoencoder (per-patch PCA, whitened)."""

from __future__ import annotations

import pytest
import torch

from avatar_models.data import procedural_faces as pf
from avatar_models.data.patch_pca import PatchPCA


@pytest.fixture(scope="module")
def fitted() -> tuple[PatchPCA, torch.Tensor]:
    frames = pf.autoencoder_fit_frames(128, seed=0)
    return PatchPCA.fit(frames, 48, 8), frames


def test_full_rank_pca_is_lossless_and_orthonormal():
    frames = torch.rand(6, 3, 16, 24, dtype=torch.float64) * 2 - 1
    ae = PatchPCA.fit(frames, 3 * 4 * 4, patch=4)
    assert torch.allclose(ae.basis.T @ ae.basis, torch.eye(48), atol=1e-5)
    z = ae.encode(frames.float())
    assert z.shape == (6, 48, 4, 6)
    assert torch.allclose(ae.decode(z), frames.float(), atol=1e-4)


def test_latents_are_whitened_and_reconstruct_faces(fitted):
    ae, frames = fitted
    z = ae.encode(frames)
    assert z.shape == (128, 48, 8, 8)
    per_channel = z.transpose(0, 1).reshape(48, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(48), atol=1e-3)
    assert torch.allclose(per_channel.std(1), torch.ones(48), atol=1e-2)
    held_out = pf.make_video(pf.HELD_OUT_SEED_BASE + 3, 5, 8)["frames"] * 2 - 1
    err = (ae.decode(ae.encode(held_out)) - held_out).pow(2).mean()
    assert 10 * torch.log10(4 / err) > 25  # PSNR in dB on [-1, 1] frames
    assert ae.encode(held_out[None]).shape == (1, 8, 48, 8, 8)  # leading dims pass through


def test_unwhitened_latents_keep_the_spectrum(fitted):
    _, frames = fitted
    ae = PatchPCA.fit(frames, 32, 8, whiten=False)
    z = ae.encode(frames).transpose(0, 1).reshape(32, -1)
    assert torch.allclose(z.pow(2).mean(), torch.tensor(1.0), atol=1e-2)  # unit mean variance
    var = z.var(1)
    assert (var[:-1] >= var[1:] - 1e-3).all() and var[0] > 10 * var[-1]
    assert torch.equal(ae.std, ae.std[:1].expand(32))


def test_fit_is_deterministic_and_saves_round_trip(fitted, tmp_path):
    ae, frames = fitted
    again = PatchPCA.fit(frames, 48, 8)
    assert torch.equal(ae.basis, again.basis) and torch.equal(ae.std, again.std)
    loaded = PatchPCA.load(ae.save(tmp_path / "pca.safetensors"))
    assert loaded.patch == 8 and torch.equal(loaded.basis, ae.basis)
    assert torch.equal(loaded.mean, ae.mean) and torch.equal(loaded.std, ae.std)


def test_dataset_yields_latents_with_an_autoencoder(fitted):
    ae, _ = fitted
    ds = pf.ProceduralFaces(frames=3, video_frames=12, seed=1, autoencoder=ae)
    plain = pf.ProceduralFaces(frames=3, video_frames=12, seed=1)
    a, b = next(iter(ds)), next(iter(plain))
    assert a["frames"].shape == (3, 48, 8, 8) and a["mask"].shape == (3, 1, 64, 64)
    assert torch.allclose(a["frames"], ae.encode(b["frames"]))


def test_bad_arguments(fitted, tmp_path):
    ae, _ = fitted
    with pytest.raises(ValueError, match=r"frames: expected shape \[N, 3, H, W\]"):
        PatchPCA.fit(torch.zeros(2, 1, 8, 8), 4, 4)
    with pytest.raises(ValueError, match="frames: H and W must be multiples of patch=8"):
        ae.encode(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match="components: expected 1..48, got 49"):
        PatchPCA.fit(torch.zeros(2, 3, 8, 8), 49, 4)
    with pytest.raises(ValueError, match="latents: expected 48 channels"):
        ae.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(FileNotFoundError, match="patch-PCA autoencoder not found"):
        PatchPCA.load(tmp_path / "missing.safetensors")
