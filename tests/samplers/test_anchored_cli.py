"""End to end through the CLI: train a tiny pixel-space model, sample an mp4, evaluate it."""

from __future__ import annotations

import json

import pytest
import torch

import kernels
from samplers.cli import main


@pytest.fixture(autouse=True)
def _cpu_lane():
    """Reference kernels (the Triton interpreter would win the automatic choice under
    TRITON_INTERPRET=1 and is far too slow for whole models) and one intra-op thread (tiny
    models: more threads only add contention on shared CI cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with kernels.backend("ref"):
        yield
    torch.set_num_threads(threads)


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
                 "--no-progress"]) == 0
    meta = load_checkpoint(ckpt)
    assert meta.config["in_channels"] == 3 and meta.extra["train"]["lr"] == 1e-3
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
    with pytest.raises(SystemExit, match="exactly one of --data, --dataset, --synthetic"):
        main(["train", "anchored", "--out", str(ckpt)])
