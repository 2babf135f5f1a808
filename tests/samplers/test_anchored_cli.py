"""End to end through the CLI: train a tiny pixel-space model, sample an mp4, evaluate it."""

from __future__ import annotations

import json

import pytest
import torch

from samplers.cli import main


def test_train_sample_eval(tmp_path, capsys):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.media import read_video, write_image, write_video

    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(9, 24, 32, 3, generator=g) * 255).to(torch.uint8)
    write_video(tmp_path / "drive.mp4", frames, 8)
    write_image(tmp_path / "face.png", frames[0])
    ckpt = tmp_path / "tiny.safetensors"
    assert main(["train", "anchored", "--synthetic", "8", "--config", "tiny",
                 "--set", "in_channels=3", "--set", "input_size=16", "--set", "patch=4",
                 "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--out", str(ckpt),
                 "--prediction-type", "v_prediction", "--no-progress"]) == 0
    meta = load_checkpoint(ckpt)
    assert meta.config["in_channels"] == 3 and meta.extra["train"]["lr"] == 1e-3
    assert meta.extra["diffusion"]["prediction_type"] == "v_prediction"
    assert meta.extra["conditioner"].endswith(":stats_conditioner")
    for strategy, sampler in (("anchored", "ddim"), ("multidiffusion", "ddpm")):
        out = tmp_path / f"{strategy}.mp4"
        assert main(["sample", "anchored", "--checkpoint", str(ckpt), "--source",
                     str(tmp_path / "face.png"), "--driving", str(tmp_path / "drive.mp4"),
                     "--out", str(out), "--strategy", strategy, "--sampler", sampler,
                     "--steps", "3", "--guidance", "1.5", "--no-progress",
                     "--sheet", str(tmp_path / f"{strategy}.png")]) == 0
        video = read_video(out, with_audio=False)
        assert video.frames.shape == (9, 16, 16, 3) and video.fps == pytest.approx(8)
        assert (tmp_path / f"{strategy}.png").is_file()
    assert main(["eval", "anchored", "--generated", str(tmp_path / "anchored.mp4"),
                 "--driving", str(tmp_path / "drive.mp4"), "--no-landmarks",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == {"frames": 9}
    capsys.readouterr()
    assert main(["train", "anchored", "--out", str(ckpt)]) == 2
    assert "exactly one of --data, --dataset, --synthetic" in capsys.readouterr().err


def test_real_video_path_with_tiny_vae_and_clip(tmp_path, tiny_vae_dir, tiny_clip_dir,
                                                capsys):
    """--data / --vae / --clip: the video-folder dataset, latents, CLIP, landmarks (no face in
    random frames: with --missing-faces fill/skip, NaN landmarks become zero controls and empty
    masks, and eval's LMSE is null), VAE decode, eval."""
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.media import read_video, write_image, write_video

    g = torch.Generator().manual_seed(1)
    for i in range(2):
        frames = (torch.rand(6, 36, 44, 3, generator=g) * 255).to(torch.uint8)
        write_video(tmp_path / "videos" / f"v{i}.mp4", frames, 5)
    write_image(tmp_path / "face.png", frames[0])
    ckpt = tmp_path / "latent.safetensors"
    common = ["--vae", str(tiny_vae_dir), "--clip", str(tiny_clip_dir)]
    assert main(["train", "anchored", "--data", str(tmp_path / "videos"), *common,
                 "--resolution", "32", "--config", "tiny", "--set", "frames=3", "--steps", "2",
                 "--batch-size", "2", "--out", str(ckpt), "--no-progress",
                 "--missing-faces", "fill"]) == 0
    assert "12 of 12 frames in --data" in capsys.readouterr().err  # the skip is reported
    meta = load_checkpoint(ckpt)
    assert (meta.config["in_channels"], meta.config["input_size"]) == (4, 4)
    assert (meta.config["global_dim"], meta.config["control_dim"]) == (8, 1434)
    assert meta.extra["conditioner"] == "clip-landmarks" and meta.extra["vae"] is True
    out = tmp_path / "out.mp4"
    assert main(["sample", "anchored", "--checkpoint", str(ckpt), "--source",
                 str(tmp_path / "face.png"), "--driving", str(tmp_path / "videos" / "v1.mp4"),
                 "--out", str(out), *common, "--steps", "2", "--no-progress",
                 "--missing-faces", "fill"]) == 0
    err = capsys.readouterr().err  # (MediaPipe's tracking mode may see a face in one noise frame)
    assert "of 6 frames of" in err and "have no face" in err
    assert read_video(out, with_audio=False).frames.shape == (6, 32, 32, 3)
    assert main(["eval", "anchored", "--generated", str(out), "--driving",
                 str(tmp_path / "videos" / "v1.mp4"), "--source", str(tmp_path / "face.png"),
                 "--clip", str(tiny_clip_dir), "--json", str(tmp_path / "m.json"),
                 "--missing-faces", "skip"]) == 0
    assert "skip 6 of 6 frames without a face" in capsys.readouterr().err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["frames"] == 6 and m["landmark_frames"] == 0
    assert m["lmse"] is None and "no frame has a face" in m["skipped"]["lmse"]
    assert -1.0 <= m["csim"] <= 1.0 and 0.0 <= m["self_csim"] <= 2.0
