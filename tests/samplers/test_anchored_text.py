"""`sample anchored --prompt` (text-to-video) and `--edit` (CLIP-guided editing), paper section
4.4, on a tiny random CLIP with a tokenizer; their option checks; the patch-PCA codec recorded
in a checkpoint."""

from __future__ import annotations

import pytest
import torch

from samplers.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, random_frames, clip_tokenizer_saver, tiny_clip_dir):
    import shutil

    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.checkpoint import save_checkpoint
    from avatar_models.media import write_image, write_video

    root = tmp_path_factory.mktemp("text")
    shutil.copytree(tiny_clip_dir, root / "clip")
    shutil.copytree(tiny_clip_dir, root / "clip_no_tokenizer")
    clip_tokenizer_saver(root / "clip")
    cfg = SDiTConfig.from_name("tiny", in_channels=3, input_size=8, patch=4, frames=4,
                               hidden=16, depth=1, heads=2, global_dim=8, control_dim=1434)
    save_checkpoint(root / "clip.safetensors", SDiT(cfg), system="anchored",
                    config=cfg.to_dict(), extra={"conditioner": "clip-landmarks"})
    save_checkpoint(root / "stats.safetensors", SDiT(cfg), system="anchored",
                    config=cfg.to_dict(),
                    extra={"conditioner": "avatar_models.training.synthetic:stats_conditioner"})
    frames = random_frames(5, 24, 32)
    write_video(root / "drive.mp4", frames, 8)
    write_image(root / "face.png", frames[0])
    return root


def test_prompt_and_edit_set_g_from_text(files, random_frames):
    from avatar_models.conditioning import CLIPEncoder
    from avatar_models.conditioning.clip import edit_embedding
    from samplers.commands.anchored import clip_landmarks_conditioner, square_crop

    clip = CLIPEncoder.from_pretrained(files / "clip")
    source, driving = random_frames(1, 24, 32, seed=3)[0], random_frames(3, 24, 32, seed=4)
    dims = dict(global_dim=8, control_dim=1434)
    kw = dict(allow_missing_faces=True)
    g, control = clip_landmarks_conditioner(files / "clip", prompt="a smiling face", **kw)(
        None, driving, **dims)
    assert torch.allclose(g, clip.encode_text(["a smiling face"])[0], atol=1e-6)
    assert control.shape == (3, 1434)
    g_img, _ = clip_landmarks_conditioner(files / "clip", **kw)(source, driving, **dims)
    image = clip.encode_images(square_crop(source)[0])[0]
    assert torch.allclose(g_img, image, atol=1e-6)
    g_edit, _ = clip_landmarks_conditioner(files / "clip", edit=("a face", "a face with a hat"),
                                           edit_strength=0.5, **kw)(source, driving, **dims)
    texts = clip.encode_text(["a face", "a face with a hat"])
    assert torch.allclose(g_edit, edit_embedding(image, texts[0], texts[1], 0.5), atol=1e-6)
    assert not torch.allclose(g_edit, g_img, atol=1e-3)


def test_sample_with_prompt_and_with_edit(files, tmp_path):
    from avatar_models.media import read_video

    common = ["sample", "anchored", "--checkpoint", str(files / "clip.safetensors"),
              "--driving", str(files / "drive.mp4"), "--clip", str(files / "clip"),
              "--steps", "2", "--no-progress", "--missing-faces", "fill"]
    assert main(common + ["--prompt", "a smiling face", "--out", str(tmp_path / "p.mp4")]) == 0
    assert read_video(tmp_path / "p.mp4", with_audio=False).frames.shape == (5, 8, 8, 3)
    assert main(common + ["--source", str(files / "face.png"), "--edit", "a face",
                          "a face with a hat", "--edit-strength", "0.7",
                          "--out", str(tmp_path / "e.mp4")]) == 0
    assert (tmp_path / "e.mp4").is_file()


@pytest.mark.parametrize("extra, expected", [
    (["--prompt", "a face", "--source", "{face}"], "--prompt replaces --source"),
    ([], "give --source IMAGE (or --prompt TEXT"),
    (["--prompt", "  "], "--prompt: expected a non-empty text"),
    (["--prompt", "a", "--edit", "a", "b"], "--prompt and --edit exclude each other"),
    (["--source", "{face}", "--edit-strength", "2"], "--edit-strength is the strength of --edit"),
    (["--source", "{face}", "--edit", "a", " "], "--edit: expected two non-empty texts"),
    (["--prompt", "a face", "--clip", "{clip_no_tokenizer}"], "--prompt needs a CLIP tokenizer"),
    (["--prompt", "a face", "--checkpoint", "{stats}"], "--prompt needs a checkpoint whose G"),
])
def test_text_option_errors_before_any_model_loads(files, tmp_path, capsys, extra, expected):
    fill = dict(face=files / "face.png", clip_no_tokenizer=files / "clip_no_tokenizer",
                stats=files / "stats.safetensors")
    argv = ["sample", "anchored", "--checkpoint", str(files / "clip.safetensors"),
            "--driving", str(files / "drive.mp4"), "--clip", str(files / "clip"),
            "--out", str(tmp_path / "x.mp4"), "--no-progress"]
    argv += [a.format(**fill) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_codec_recorded_and_checked(files, tmp_path, capsys):
    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.checkpoint import save_checkpoint

    cfg = SDiTConfig.from_name("tiny", in_channels=4, input_size=8, patch=4, frames=4,
                               hidden=16, depth=1, heads=2, global_dim=8, control_dim=1434)
    ckpt = save_checkpoint(tmp_path / "codec.safetensors", SDiT(cfg), system="anchored",
                           config=cfg.to_dict(),
                           extra={"conditioner": "clip-landmarks",
                                  "codec": {"kind": "patch-pca", "file": "missing.safetensors"}})
    argv = ["sample", "anchored", "--checkpoint", str(ckpt), "--source", str(files / "face.png"),
            "--driving", str(files / "drive.mp4"), "--clip", str(files / "clip"),
            "--out", str(tmp_path / "x.mp4")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the codec of --checkpoint" in err and "missing.safetensors" in err
    (tmp_path / "missing.safetensors").write_bytes(b"not safetensors")
    assert main(argv) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert main(argv + ["--vae", str(tmp_path)]) == 2
    assert "drop --vae" in capsys.readouterr().err
    assert main(["train", "anchored", "--synthetic", "2", "--codec", str(tmp_path / "no.st"),
                 "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "--codec" in capsys.readouterr().err
