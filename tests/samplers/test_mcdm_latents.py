"""MCDM on codec latents: `train mcdm --codec` (patch-PCA, the VAE stand-in) / `--vae` (a tiny
random diffusers AutoencoderKL saved to a tmp folder; nothing downloads), the codec carried from
stage to stage, and `sample mcdm` encoding the reference and decoding the frames."""

from __future__ import annotations

import pytest
import torch

from avatar_models.mcdm import MCDMFaces

COMMON = ["--steps", "1", "--batch-size", "1", "--ema-decay", "0", "--no-progress", "--device",
          "cpu"]


@pytest.fixture(scope="module")
def codec_file(tmp_path_factory):
    from avatar_models.data import procedural_faces as pf
    from avatar_models.data.patch_pca import PatchPCA

    path = tmp_path_factory.mktemp("codec") / "pca.safetensors"
    PatchPCA.fit(pf.autoencoder_fit_frames(32, seed=0), 4, patch=4).save(path)
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL (4 latent channels, factor 2) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                  norm_num_groups=4, sample_size=32).save_pretrained(folder,
                                                                     safe_serialization=True)
    return folder


def _media(root):
    from avatar_models.data import procedural_faces as pf
    from avatar_models.data.speech import speech_waveform
    from avatar_models.media import write_image, write_wav

    video = pf.make_video(3, 4, 6)
    face = root / "face.png"
    write_image(face, (video["frames"][0].permute(1, 2, 0) * 255).round().to(torch.uint8))
    speech = root / "speech.wav"
    write_wav(speech, speech_waveform(video["params"][:, 5], 25.0), 16000)
    return face, speech


def test_dataset_frames_are_the_codec_latents(codec_file):
    from avatar_models.data.patch_pca import PatchPCA

    codec = PatchPCA.load(codec_file)
    gen = torch.Generator().manual_seed(0)
    pixels = MCDMFaces(size=64).sample(gen)
    latents = MCDMFaces(size=64, codec=codec).sample(torch.Generator().manual_seed(0))
    for key in MCDMFaces.FRAME_KEYS:
        assert torch.equal(latents[key], codec.encode(pixels[key])), key
    assert latents["clip"].shape == (4, 4, 16, 16)
    assert torch.equal(latents["audio"], pixels["audio"])


def test_patch_pca_stages_carry_the_codec_and_sample_decodes(codec_file, tmp_path, capsys):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.media import video_info
    from samplers.cli import main

    s0, s1 = tmp_path / "s0.safetensors", tmp_path / "s1.safetensors"
    assert main(["train", "mcdm", "--stage", "0", "--set", "in_channels=4", "--codec",
                 str(codec_file), "--out", str(s0), *COMMON]) == 0
    assert main(["train", "mcdm", "--stage", "1", "--init", str(s0), "--out", str(s1),
                 *COMMON]) == 0
    for path in (s0, s1):
        entry = load_checkpoint(path).extra["codec"]
        assert entry["kind"] == "patch-pca"
        assert (path.parent / entry["file"]).resolve() == codec_file.resolve()
    face, speech = _media(tmp_path)
    out = tmp_path / "out.mp4"
    assert main(["sample", "mcdm", "--checkpoint", str(s1), "--reference", str(face),
                 "--audio", str(speech), "--frames", "6", "--steps", "1", "--prior-steps", "1",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    info = video_info(out)
    assert (info.num_frames, info.width, info.height) == (6, 64, 64) and info.has_audio
    capsys.readouterr()
    # errors, named, before any training
    assert main(["train", "mcdm", "--stage", "0", "--set", "in_channels=4", "--out",
                 str(tmp_path / "x.safetensors"), *COMMON]) == 2
    assert "4-channel latents: give a codec" in capsys.readouterr().err
    assert main(["train", "mcdm", "--stage", "0", "--set", "in_channels=5", "--codec",
                 str(codec_file), "--out", str(tmp_path / "x.safetensors"), *COMMON]) == 2
    assert "gives 4 latent channels, the model takes in_channels=5" in capsys.readouterr().err
    assert main(["train", "mcdm", "--stage", "1", "--init", str(s0), "--codec",
                 str(codec_file), "--out", str(tmp_path / "x.safetensors"), *COMMON]) == 2
    assert "uses --init's (drop them)" in capsys.readouterr().err
    assert main(["sample", "mcdm", "--checkpoint", str(s1), "--reference", str(face),
                 "--audio", str(speech), "--vae", str(tmp_path), "--out", str(out)]) == 2
    assert "was not trained on VAE latents (patch-pca)" in capsys.readouterr().err


def test_vae_latents_train_and_sample(vae_dir, tmp_path):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.media import video_info
    from samplers.cli import main

    s0, s1 = tmp_path / "s0.safetensors", tmp_path / "s1.safetensors"
    assert main(["train", "mcdm", "--stage", "0", "--set", "in_channels=4", "--vae",
                 str(vae_dir), "--out", str(s0), *COMMON]) == 0
    assert main(["train", "mcdm", "--stage", "1", "--init", str(s0), "--out", str(s1),
                 *COMMON]) == 0
    assert load_checkpoint(s1).extra["vae"] == str(vae_dir.resolve())
    face, speech = _media(tmp_path)
    out = tmp_path / "out.mp4"
    assert main(["sample", "mcdm", "--checkpoint", str(s1), "--reference", str(face),
                 "--audio", str(speech), "--frames", "4", "--steps", "1", "--prior-steps", "1",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    info = video_info(out)
    assert (info.num_frames, info.width, info.height) == (4, 32, 32)      # 16 x factor 2


def test_configs_sized_for_clip_and_68_landmarks_are_refused_on_the_toy(vae_dir, tmp_path,
                                                                       capsys):
    """The paper config passes the codec checks with a 4-channel VAE, then stops on the toy's
    image embedding (48-d colour layout, not CLIP's 768) before any model is built."""
    from samplers.cli import main

    out = str(tmp_path / "x.safetensors")
    assert main(["train", "mcdm", "--stage", "0", "--config", "paper", "--vae", str(vae_dir),
                 "--out", out, *COMMON]) == 2
    assert "has image_dim=768; the toy gives 48 (colour-layout image embedding" in \
        capsys.readouterr().err
    assert main(["train", "mcdm", "--stage", "0", "--set", "landmark_points=68", "--out", out,
                 *COMMON]) == 2
    assert "has landmark_points=68; the toy gives 20 (landmarks" in capsys.readouterr().err
