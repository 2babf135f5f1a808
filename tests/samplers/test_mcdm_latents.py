"""MCDM beyond the pixel toys: `train mcdm --codec` (patch-PCA, the VAE stand-in) / `--vae`, and
`--wav2vec` / `--clip` for the prior's audio and image (tiny random models saved to tmp folders
by tests/samplers/conftest.py; nothing downloads), carried from stage to stage, and `sample mcdm`
using them."""

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


def _sample(checkpoint, face, speech, out, frames: int, *extra) -> int:
    from samplers.cli import main

    return main(["sample", "mcdm", "--checkpoint", str(checkpoint), "--reference", str(face),
                 "--audio", str(speech), "--frames", str(frames), "--steps", "1",
                 "--prior-steps", "1", "--out", str(out), "--no-progress", "--device", "cpu",
                 *extra])


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
    assert _sample(s1, face, speech, out, 6) == 0
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


def test_vae_latents_train_and_sample(tiny_vae_dir, tmp_path):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.media import video_info
    from samplers.cli import main

    s0, s1 = tmp_path / "s0.safetensors", tmp_path / "s1.safetensors"
    assert main(["train", "mcdm", "--stage", "0", "--set", "in_channels=4", "--vae",
                 str(tiny_vae_dir), "--out", str(s0), *COMMON]) == 0
    assert main(["train", "mcdm", "--stage", "1", "--init", str(s0), "--out", str(s1),
                 *COMMON]) == 0
    assert load_checkpoint(s1).extra["vae"] == str(tiny_vae_dir.resolve())
    face, speech = _media(tmp_path)
    out = tmp_path / "out.mp4"
    assert _sample(s1, face, speech, out, 4) == 0
    info = video_info(out)
    assert (info.num_frames, info.width, info.height) == (4, 128, 128)    # 16 x factor 8


def test_configs_sized_for_clip_and_68_landmarks_are_refused_on_the_toy(tiny_vae_dir, tmp_path,
                                                                       capsys):
    """The paper config passes the codec checks with a 4-channel VAE, then stops on the toy's
    landmarks (20 points, not 68) and image embedding (48-d colour layout, not CLIP's 768
    without --clip), before any model is built."""
    from samplers.cli import main

    paper = ["train", "mcdm", "--stage", "0", "--config", "paper", "--vae", str(tiny_vae_dir),
             "--out", str(tmp_path / "x.safetensors"), *COMMON]
    assert main(paper) == 2
    assert "has landmark_points=68; the toy gives 20 (landmarks)" in capsys.readouterr().err
    assert main([*paper, "--set", "landmark_points=20"]) == 2
    assert "has image_dim=768; the toy gives 48 (colour-layout image embedding; or --clip" in \
        capsys.readouterr().err


def test_dataset_takes_audio_and_image_encoders():
    calls = []

    def audio(wave, rate, fps, frames):
        calls.append((wave.shape, rate, fps, frames))
        return torch.full((frames, 6), float(wave.abs().sum()))

    def image(frame):
        return frame.mean((1, 2))                                         # [3]

    plain = MCDMFaces().sample(torch.Generator().manual_seed(0))
    item = MCDMFaces(audio_features=audio, image_embedding=image).sample(
        torch.Generator().manual_seed(0))
    assert calls == [(torch.Size([int(4 * 16000 / 25)]), 16000, 25.0, 4)]
    assert item["audio"].shape == (4, 6) and item["image"].shape == (3,)
    assert torch.equal(item["clip"], plain["clip"])


def test_wav2vec_and_clip_reach_the_prior_and_sample(tiny_wav2vec_dir, tiny_clip_dir, tmp_path,
                                                     capsys, monkeypatch):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.conditioning.audio import AudioEncoder
    from avatar_models.media import video_info
    from samplers.cli import main

    encoded = []                 # frames per AudioEncoder.encode call (energy features: none)
    original = AudioEncoder.encode
    monkeypatch.setattr(AudioEncoder, "encode", lambda self, *a, **k: encoded.append(
        k["num_frames"]) or original(self, *a, **k))

    enc = ["--wav2vec", str(tiny_wav2vec_dir), "--clip", str(tiny_clip_dir)]
    dims = ["--set", "audio_dim=16", "--set", "image_dim=8"]
    paths = [tmp_path / f"s{s}.safetensors" for s in range(3)]
    assert main(["train", "mcdm", "--stage", "0", *dims, *enc, "--out", str(paths[0]),
                 *COMMON]) == 0
    for s in (1, 2):
        assert main(["train", "mcdm", "--stage", str(s), "--init", str(paths[s - 1]), "--out",
                     str(paths[s]), *COMMON]) == 0
    assert encoded and set(encoded) == {4}          # stage 2's items only: one clip each
    encoded.clear()
    extra = load_checkpoint(paths[2]).extra
    assert (extra["data"]["audio"], extra["data"]["image"]) == ("wav2vec", "clip")
    assert extra["wav2vec"] == str(tiny_wav2vec_dir.resolve())
    assert extra["clip"] == str(tiny_clip_dir.resolve())
    face, speech = _media(tmp_path)
    out = tmp_path / "out.mp4"
    assert _sample(paths[2], face, speech, out, 4) == 0
    assert video_info(out).num_frames == 4 and encoded == [4]
    capsys.readouterr()
    # widths named: Wav2Vec2's hidden size against audio_dim, CLIP's projection against image_dim
    bad = tmp_path / "bad.safetensors"
    assert main(["train", "mcdm", "--stage", "0", "--set", "image_dim=8", *enc, "--out",
                 str(bad), *COMMON]) == 2
    assert "--wav2vec" in (err := capsys.readouterr().err) and "hidden_size=16" in err \
        and "audio_dim=4" in err
    assert main(["train", "mcdm", "--stage", "0", "--set", "audio_dim=16", *enc, "--out",
                 str(bad), *COMMON]) == 2
    assert "projection_dim=8, the model takes image_dim=48" in capsys.readouterr().err
    assert main(["train", "mcdm", "--stage", "1", "--init", str(paths[0]), *enc, "--out",
                 str(bad), *COMMON]) == 2
    assert "--wav2vec / --clip are chosen at stage 0" in capsys.readouterr().err
