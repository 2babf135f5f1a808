"""`avatar-kernels demo`: a reduced run of the real demo on the bundled model, the bundled
model itself, and the training entry point behind `make train-demo`."""

from __future__ import annotations

import json
import math
import os
import shlex

import pytest
import torch

from samplers.cli import main
from samplers.demo.pipeline import checkpoint_world
from samplers.demo.train import (
    CHECKPOINT,
    CONDITIONER,
    DemoRecipe,
    train_command,
    train_demo,
)

OUTPUTS = ("anchored.mp4", "multidiffusion.mp4", "independent.mp4", "autoregressive.mp4",
           "contact_sheet.png", "metrics.json", "drift.png", "consistency.png")
METRICS = ("csim", "self_csim", "lmse_px", "expressive_lmse_px", "psnr_db", "psnr_face_hair_db",
           "flicker", "pixel_spread", "pixel_anchor_distance", "readout_spread", "anchor_transfer")


@pytest.fixture(autouse=True)
def _one_thread_reference_kernels():
    """One thread (CI shares cores) and the reference kernels: under TRITON_INTERPRET=1 the
    registry would run the model's attention and adaLN in Triton's interpreter, which the kernel
    tests already cover and which makes this pipeline test 50x slower. The demo itself never
    forces a backend."""
    import kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with kernels.backend("ref"):
        yield
    torch.set_num_threads(threads)


def _numbers(x):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)


def test_reduced_demo_writes_every_output(tmp_path, capsys):
    from avatar_models.media import read_video

    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--frames", "8", "--steps", "2", "--lengths", "4,8",
                 "--curve-seeds", "1", "--fit-steps", "5", "--pairs", "2", "--no-progress",
                 "--methods", "anchored,multidiffusion,independent,autoregressive"]) == 0
    printed = capsys.readouterr().out
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert str(out / name) in printed, name
    video = read_video(out / "anchored.mp4", with_audio=False)
    assert video.frames.shape == (8, 256, 256, 3)
    report = json.loads((out / "metrics.json").read_text())
    assert report["embedding"]["name"] == "rgbhist4-hog9x8"
    assert report["world"] == "fine"  # the bundled model records its world
    assert report["protocol"]["pairs"] == 2 and len(report["inputs"]["pairs"]) == 2
    for method in ("anchored", "multidiffusion", "independent", "autoregressive"):
        for key in METRICS:
            ci = report["methods"][method][key]
            assert ci["n"] == 2 and ci["low"] <= ci["mean"] <= ci["high"], (method, key)
        assert len(report["per_pair"][method]) == 2
        drift = report["drift_vs_distance"][method]
        assert len(drift["mean"]) == len(report["drift_vs_distance"]["distances"])
    assert report["drift_vs_distance"]["distances"] == [1, 2, 4]
    assert "anchor" in report["anchor_transfer_verdict"]
    curve = report["consistency_vs_length"]
    assert curve["lengths"] == [4, 8]
    assert len(curve["anchored"]["self_csim"]) == len(curve["multidiffusion"]["csim"]) == 2
    values = list(_numbers(report))
    assert len(values) > 20 and all(math.isfinite(v) for v in values)


def test_bundled_checkpoint_and_its_training_record():
    from avatar_models.checkpoint import load_checkpoint

    assert CHECKPOINT.stat().st_size <= 20 * 2 ** 20
    ckpt = load_checkpoint(CHECKPOINT, system="anchored")
    recipe = DemoRecipe(**ckpt.extra["demo_recipe"])
    assert ckpt.config == recipe.model_config().to_dict()
    assert checkpoint_world(ckpt) == "fine"  # `make train-demo`: the DemoRecipe defaults
    # the recorded recipe, with the defaults of fields added since, is today's default recipe
    assert recipe == DemoRecipe()
    assert ckpt.extra["codec"] == {"kind": "patch-pca", "file": "patch_pca.safetensors"}
    assert ckpt.extra["conditioner"] == CONDITIONER
    assert ckpt.ema, "the demo samples the EMA weights"
    record = json.loads((CHECKPOINT.parent / "loss.json").read_text())
    assert record["recipe"] == ckpt.extra["demo_recipe"]
    assert len(record["loss"]) == recipe.steps == ckpt.extra["step"]
    assert (CHECKPOINT.parent / "loss.png").is_file()
    first, last = record["loss"][:50], record["loss"][-100:]
    assert sum(last) / len(last) < 0.5 * sum(first) / len(first)


def test_train_demo_writes_checkpoint_and_loss_curve(tmp_path):
    """A few steps of the fine-world recipe at toy width (the smoke test of `make train-demo`);
    the checkpoint records its world, codec and conditioner, so `sample anchored` takes it with
    nothing but a source image and a driving video."""
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.data import procedural_faces as pf
    from avatar_models.media import read_video, write_image, write_video

    recipe = DemoRecipe(steps=2, batch_size=2, hidden=32, depth=1, heads=2, pca_frames=64)
    assert recipe.world == "fine" and DemoRecipe().pca_components == 48
    ckpt_path = tmp_path / "m.safetensors"
    record = train_demo(recipe, ckpt_path, progress=False)
    assert ckpt_path.is_file() and (tmp_path / "loss.png").is_file()
    saved = json.loads((tmp_path / "loss.json").read_text())
    assert saved["recipe"] == record["recipe"] and len(saved["loss"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "loss.json", "loss.png", "m.safetensors", "patch_pca.safetensors"]
    # compacting rewrites the file: it keeps the mode open() would give, not safetensors' 0600
    mask = os.umask(0)
    os.umask(mask)
    assert ckpt_path.stat().st_mode & 0o777 == 0o666 & ~mask
    ckpt = load_checkpoint(ckpt_path)
    assert checkpoint_world(ckpt) == "fine" and ckpt.extra["conditioner"] == CONDITIONER
    assert ckpt.extra["codec"] == {"kind": "patch-pca", "file": "patch_pca.safetensors"}
    clip = pf.make_video(pf.HELD_OUT_SEED_BASE + 1, pf.HELD_OUT_SEED_BASE + 2, 5, "fine")
    frames = (clip["frames"] * 255).round().byte().permute(0, 2, 3, 1)
    write_video(tmp_path / "drive.mp4", frames, 8)
    write_image(tmp_path / "face.png", frames[0])
    out = tmp_path / "out.mp4"
    assert main(["sample", "anchored", "--checkpoint", str(ckpt_path), "--source",
                 str(tmp_path / "face.png"), "--driving", str(tmp_path / "drive.mp4"),
                 "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    assert read_video(out, with_audio=False).frames.shape == (5, 64, 64, 3)


def test_train_command_is_a_valid_train_anchored_line(tmp_path):
    """The printed `train anchored` line trains the same model as `train_demo` (which is what
    lets a model trained by that line be shipped as the `make train-demo` model)."""
    from avatar_models.checkpoint import load_checkpoint

    recipe = DemoRecipe(steps=3, batch_size=2, hidden=32, depth=1, heads=2, pca_frames=64,
                        prediction_type="v_prediction")
    train_demo(recipe, tmp_path / "demo.safetensors", progress=False)   # + patch_pca beside it
    out = tmp_path / "cli.safetensors"
    argv = shlex.split(train_command(recipe, out))
    assert argv[:3] == ["avatar-kernels", "train", "anchored"]
    assert main(argv[1:] + ["--no-progress"]) == 0
    ckpt = load_checkpoint(out)
    shipped = load_checkpoint(tmp_path / "demo.safetensors").weights("ema")   # float16
    trained = ckpt.weights("ema")
    assert shipped.keys() == trained.keys()
    assert all(torch.equal(shipped[k], trained[k].to(shipped[k].dtype)) for k in shipped)
    assert ckpt.config == recipe.model_config().to_dict()
    assert ckpt.extra["codec"] == {"kind": "patch-pca", "file": "patch_pca.safetensors"}
    assert ckpt.extra["conditioner"] == CONDITIONER
    assert ckpt.extra["dataset_args"]["world"] == "fine" and checkpoint_world(ckpt) == "fine"
    assert ckpt.extra["diffusion"]["prediction_type"] == "v_prediction"
    assert "--prediction-type epsilon" in train_command(DemoRecipe(prediction_type="epsilon"), out)


def test_demo_arguments_are_checked(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--checkpoint",
                 str(tmp_path / "none.st")]) == 2
    assert "demo checkpoint not found" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--frames", "7"]) == 2
    assert "--frames 7" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--context", "4"]) == 2
    assert "--context 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--methods", "anchored,teleport"])
    assert exit_info.value.code == 2 and "--methods" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--lengths", "1,8"])
    assert exit_info.value.code == 2 and "--lengths" in capsys.readouterr().err
