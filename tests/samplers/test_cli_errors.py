"""User errors of the ``avatar-kernels`` CLI (issue 13, items 9 to 17): each exits with status 2
and ONE line on stderr naming the option or file, with no traceback, and fails before any model
is loaded. Inputs are tiny files made in tmp_path."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import samplers.commands.anchored as anchored_cmd
from samplers.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``avatar-kernels argv``; parse errors exit through argparse."""
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def assert_user_error(argv, capsys, *needles):
    status, err = run_cli(argv, capsys)
    assert status == 2, (status, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Every case here must fail before a model loads: loading one fails the test (as a bug,
    which the CLI lets through with its traceback)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(anchored_cmd, "load_model", forbidden)
    from avatar_models.conditioning import CLIPEncoder, FrameVAE
    monkeypatch.setattr(CLIPEncoder, "from_pretrained", forbidden)
    monkeypatch.setattr(FrameVAE, "from_pretrained", forbidden)


@pytest.fixture(scope="module")
def files(tmp_path_factory, random_frames):
    """A tiny checkpoint (clip-landmarks conditioner, pixel space, frames=4), a source image,
    a 5-frame noise video (no face), a 1-frame video, and broken checkpoints."""
    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.checkpoint import save_checkpoint
    from avatar_models.media import write_image, write_video

    root = tmp_path_factory.mktemp("cli")
    cfg = SDiTConfig.from_name("tiny", in_channels=3, input_size=8, patch=4, frames=4,
                               hidden=16, depth=1, heads=2)
    ckpt = save_checkpoint(root / "tiny.safetensors", SDiT(cfg), system="anchored",
                           config=cfg.to_dict(), extra={"conditioner": "clip-landmarks"})
    frames = random_frames(5, 24, 32)
    write_video(root / "drive.mp4", frames, 8)
    write_video(root / "one.mp4", frames[:1], 8)
    write_image(root / "face.png", frames[0])
    good = ckpt.read_bytes()
    (root / "empty.safetensors").write_bytes(b"")
    (root / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (root / "text.safetensors").write_text("this is not a checkpoint\n" * 4)
    (root / "pickle.safetensors").write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    (root / "videos").mkdir()
    return root


@pytest.fixture
def sample_argv(files, tiny_clip_dir, tmp_path):
    return ["sample", "anchored", "--checkpoint", files / "tiny.safetensors", "--source",
            files / "face.png", "--driving", files / "drive.mp4", "--out", tmp_path / "o.mp4",
            "--clip", tiny_clip_dir, "--no-progress"]


def train_argv(tmp_path, *extra):
    return ["train", "anchored", "--synthetic", "2", "--config", "tiny", "--out",
            tmp_path / "t.safetensors", "--no-progress", *extra]


# ---- item 9: user errors print one line, exit 2; --debug shows the traceback

@pytest.mark.parametrize("name", ["empty", "truncated", "text", "pickle"])
def test_item9_broken_checkpoint_is_one_line(files, sample_argv, capsys, name):
    path = files / f"{name}.safetensors"
    argv = [str(path) if str(a).endswith("tiny.safetensors") else a for a in sample_argv]
    line = assert_user_error(argv, capsys, "--checkpoint", path)
    assert "truncated" in line or "not a safetensors" in line


def test_item9_set_with_wrong_type_names_the_item(tmp_path, capsys):
    assert_user_error(train_argv(tmp_path, "--set", "depth=abc"), capsys,
                      "--set depth='abc'", "depth must be int, got str")
    assert_user_error(train_argv(tmp_path, "--set", "colour=3"), capsys,
                      "--set colour=", "no field 'colour'")
    assert_user_error(train_argv(tmp_path, "--set", "depth"), capsys, "--set expects KEY=VALUE")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_item9_device_cuda_without_cuda(sample_argv, capsys):
    assert_user_error(sample_argv + ["--device", "cuda"], capsys, "--device cuda",
                      "CUDA is not available", "--device cpu")


@pytest.mark.parametrize("verb", ["sample", "train", "eval", "demo"])
def test_item9_device_gpu0_is_not_a_device(verb, sample_argv, files, tmp_path, capsys):
    argv = {"sample": sample_argv, "train": train_argv(tmp_path),
            "eval": ["eval", "anchored", "--generated", files / "drive.mp4", "--driving",
                     files / "drive.mp4", "--no-landmarks"],
            "demo": ["demo", "--out", tmp_path, "--no-progress"]}[verb]
    assert_user_error(argv + ["--device", "gpu0"], capsys, "--device 'gpu0'", "cuda:N")


def test_item9_wrong_model_folder_is_file_not_found(files, tiny_clip_dir, tmp_path, capsys):
    assert_user_error(["train", "anchored", "--data", files / "videos", "--clip", tiny_clip_dir,
                       "--vae", tiny_clip_dir, "--out", tmp_path / "t.safetensors"], capsys,
                      "--vae", str(tiny_clip_dir), "not a diffusers AutoencoderKL folder")
    assert_user_error(["train", "anchored", "--data", files / "videos", "--clip",
                       tmp_path / "nowhere", "--out", tmp_path / "t.safetensors"], capsys,
                      "--clip", "nowhere")
    from samplers.commands.validation import check_model_folder
    with pytest.raises(FileNotFoundError, match="not a diffusers AutoencoderKL"):
        check_model_folder(tiny_clip_dir, "--vae", "vae")


def test_item9_debug_shows_the_traceback(tmp_path, capsys):
    from samplers.commands.validation import OptionError

    with pytest.raises(OptionError, match="depth"):
        main([str(a) for a in train_argv(tmp_path, "--set", "depth=abc", "--debug")])


def test_item9_a_bug_keeps_its_traceback(files, monkeypatch):
    def broken(args):
        raise ValueError("an internal inconsistency")  # a plain ValueError is not the user's

    monkeypatch.setattr(anchored_cmd, "evaluate", broken)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["eval", "anchored", "--generated", str(files / "drive.mp4"), "--driving",
              str(files / "drive.mp4"), "--no-landmarks"])


# ---- item 10: every option is checked before any model loads

@pytest.mark.parametrize("extra, needles", [
    (["--steps", "0"], ["--steps", "expected an int >= 1, got 0"]),
    (["--frames", "9"], ["--frames 9", "frames=4", "2 to 4"]),
    (["--frames", "1"], ["--frames", ">= 2"]),
    (["--strategy", "multidiffusion", "--stride", "0"], ["--stride", ">= 1, got 0"]),
    (["--strategy", "multidiffusion", "--stride", "5"], ["--stride 5", "1 to 4"]),
    (["--stride", "2"], ["--stride", "multidiffusion"]),
    (["--out", "video"], ["--out", "must end in .mp4", "no extension"]),
    (["--out", "video.png"], ["--out", "must end in .mp4", ".png"]),
    (["--sheet", "sheet.jpg"], ["--sheet", ".png"]),
    (["--eta", "2"], ["--eta", "[0.0, 1.0]"]),
    (["--conditioner", "nowhere.mod:fn"], ["--conditioner", "'nowhere'"]),
])
def test_item10_sample_options_fail_before_loading(sample_argv, capsys, extra, needles):
    assert_user_error(sample_argv + extra, capsys, *needles)


def test_item10_latent_checkpoint_needs_vae_before_loading(files, sample_argv, tmp_path,
                                                           capsys):
    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.checkpoint import save_checkpoint

    cfg = SDiTConfig.from_name("tiny", in_channels=4, input_size=4, patch=2, hidden=16, depth=1,
                               heads=2)
    path = save_checkpoint(tmp_path / "latent.safetensors", SDiT(cfg), system="anchored",
                           config=cfg.to_dict(), extra={"conditioner": "clip-landmarks"})
    argv = [path if str(a).endswith("tiny.safetensors") else a for a in sample_argv]
    assert_user_error(argv, capsys, "--checkpoint", "VAE latents", "--vae DIR")


# ---- item 11: nonsense values are refused

@pytest.mark.parametrize("extra, needles", [
    (["--steps", "-5"], ["--steps", "got -5"]),
    (["--steps", "0"], ["--steps", "got 0"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--lr", "0"], ["--lr", "> 0.0"]),
    (["--cond-drop", "1.5"], ["--cond-drop"]),
    (["--out", "model.pt"], ["--out", ".safetensors"]),
])
def test_item11_train_nonsense_is_refused(tmp_path, capsys, extra, needles):
    assert_user_error(train_argv(tmp_path, *extra), capsys, *needles)
    assert not (tmp_path / "t.safetensors").exists()


def test_item11_fps_zero_and_still_driving_image(files, sample_argv, capsys):
    assert_user_error(sample_argv + ["--fps", "0"], capsys, "--fps", "got 0")
    still = [files / "face.png" if str(a).endswith("drive.mp4") else a for a in sample_argv]
    assert_user_error(still, capsys, "--driving", "face.png", "still image")
    one = [files / "one.mp4" if str(a).endswith("drive.mp4") else a for a in sample_argv]
    assert_user_error(one, capsys, "--driving", "one.mp4", "has 1 frame(s)")


def test_item11_dataset_without_conditioner_fails_at_train_time(tmp_path, capsys):
    argv = ["train", "anchored", "--dataset",
            "avatar_models.data.procedural_faces:training_dataset", "--config", "tiny",
            "--out", tmp_path / "t.safetensors"]
    assert_user_error(argv, capsys, "--dataset needs --conditioner", "--conditioner none")
    assert_user_error(argv + ["--conditioner", "nowhere:fn"], capsys, "--conditioner",
                      "'nowhere'")


# ---- item 12: missing faces are errors naming the file and frame, or counted skips

def test_item12_sample_driving_without_face(files, sample_argv, capsys, monkeypatch):
    from avatar_models.conditioning import CLIPEncoder

    monkeypatch.setattr(CLIPEncoder, "from_pretrained", lambda *a, **k: FakeCLIP())
    assert_user_error(sample_argv, capsys, "drive.mp4", "no face found in frame 0 (of 5",
                      "--missing-faces fill")


class FakeCLIP:
    """Stands in for the CLIP encoder where only the landmark path is under test."""

    def encode_images(self, images):
        return torch.ones(1 if images.dim() == 3 else images.shape[0], 8)


def test_item12_train_data_without_faces(files, tiny_clip_dir, tmp_path, capsys,
                                          random_frames):
    from avatar_models.media import write_video

    write_video(tmp_path / "videos" / "a.mp4", random_frames(6, 24, 32, seed=3), 5)
    assert_user_error(["train", "anchored", "--data", tmp_path / "videos", "--clip",
                       tiny_clip_dir, "--config", "tiny", "--set", "frames=3", "--out",
                       tmp_path / "t.safetensors"], capsys,
                      "a.mp4", "no face found in frame 0 (of 6", "--missing-faces fill")


def test_item12_eval_without_faces_errors_or_writes_strict_json(files, tmp_path, capsys):
    argv = ["eval", "anchored", "--generated", files / "drive.mp4", "--driving",
            files / "drive.mp4", "--json", tmp_path / "m.json"]
    assert_user_error(argv, capsys, "drive.mp4", "no face found in frame 0",
                      "--missing-faces skip")
    status, err = run_cli(argv + ["--missing-faces", "skip"], capsys)
    assert status == 0 and "skip 5 of 5 frames" in err

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    m = json.loads((tmp_path / "m.json").read_text(), parse_constant=no_constants)
    assert m["lmse"] is None and m["expressive_lmse"] is None
    assert m["skipped"]["lmse"] == "no frame has a face in both videos"


# ---- item 13: eval says what it skips

def test_item13_eval_source_without_clip_and_one_frame(files, tmp_path, capsys, monkeypatch):
    assert_user_error(["eval", "anchored", "--generated", files / "drive.mp4", "--driving",
                       files / "drive.mp4", "--source", files / "face.png", "--no-landmarks"],
                      capsys, "--source", "--clip")
    monkeypatch.setattr(anchored_cmd, "check_model_folder", lambda *a, **k: None)
    from avatar_models.conditioning import CLIPEncoder
    monkeypatch.setattr(CLIPEncoder, "from_pretrained", lambda *a, **k: FakeCLIP())
    status, _ = run_cli(["eval", "anchored", "--generated", files / "one.mp4", "--driving",
                         files / "drive.mp4", "--clip", tmp_path, "--no-landmarks", "--json",
                         tmp_path / "m.json"], capsys)
    assert status == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["frames"] == 1 and m["self_csim"] is None
    assert m["skipped"]["self_csim"] == "needs at least 2 frames, the videos have 1"


def test_item13_eval_without_clip_says_so(files, capsys):
    status, err = run_cli(["eval", "anchored", "--generated", files / "drive.mp4", "--driving",
                           files / "drive.mp4", "--no-landmarks"], capsys)
    assert status == 0 and "CSIM and Self-CSIM need --clip DIR" in err


# ---- item 14: a corrupt video in --data is skipped with a warning naming it

def test_item14_corrupt_video_is_skipped_with_a_warning(tmp_path, random_frames):
    from avatar_models.data import VideoFolderDataset
    from avatar_models.media import write_video

    good = write_video(tmp_path / "good.mp4", random_frames(6, 16, 16), 5).read_bytes()
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])  # an interrupted download
    with pytest.warns(UserWarning) as caught:
        dataset = VideoFolderDataset(tmp_path, 3)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    for message, name in zip(messages, ("bad.mp4", "cut.mp4"), strict=True):
        assert message.startswith("skipping '") and f"{name}': not a readable video" in message
    assert [Path(v.path).name for v in dataset.videos] == ["good.mp4"]
    assert sorted(Path(p).name for p in dataset.skipped) == ["bad.mp4", "cut.mp4"]


# ---- item 15: bench from the repository root, and the program name

def test_item15_bench_found_without_the_checkout_on_sys_path(monkeypatch, tmp_path):
    """An installed console script has neither the checkout nor '' on sys.path."""
    from samplers.commands import bench

    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p not in ("", ".") and Path(p).resolve() != REPO])
    for name in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.chdir(tmp_path)
    assert bench.find_bench_root() == REPO
    with pytest.raises(SystemExit) as exit_info:  # `python -m bench`'s own help, forwarded
        main(["bench", "--", "-h"])
    assert exit_info.value.code == 0
    assert Path(sys.modules["bench"].__file__).parent == REPO / "bench"


def test_item15_bench_forwards_its_options_and_refuses_unknown_ones_elsewhere(monkeypatch):
    import bench.__main__ as bench_main

    seen = []
    monkeypatch.setattr(bench_main, "main", lambda argv: seen.append(list(argv)) or 0)
    assert main(["bench", "--op", "adaln", "--quick"]) == 0
    assert seen == [["--op", "adaln", "--quick"]]
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--op", "adaln"])
    assert exit_info.value.code == 2


def test_item15_python_m_samplers_is_avatar_kernels():
    out = subprocess.run([sys.executable, "-m", "samplers", "--help"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert out.startswith("usage: avatar-kernels ")


# ---- item 16: help shows defaults, one device rule, demo time, checkpoint mode

def test_item16_help_shows_defaults_and_checkpoint_help(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "anchored", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "inference steps (default: 50)" in text
    assert "--checkpoint CHECKPOINT a `train anchored` checkpoint" in text
    for verb in (["train", "anchored"], ["eval", "anchored"], ["demo"]):
        with pytest.raises(SystemExit):
            main([*verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--device DEVICE default: cuda when available, else cpu" in text, verb
    with pytest.raises(SystemExit):
        main(["train", "anchored", "--help"])
    assert "optimiser steps (default: 1000)" in " ".join(capsys.readouterr().out.split())


def test_item16_one_device_rule(monkeypatch):
    from samplers.commands.validation import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_item16_demo_time_agrees_between_readme_and_docs():
    readme = (REPO / "README.md").read_text()
    docs = (REPO / "docs" / "demo.md").read_text()
    figure = "about 75 s on 2 CPU cores"
    assert figure in readme and figure in docs


def test_item16_checkpoint_mode_follows_umask(tmp_path):
    from avatar_models.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(2)}, system="x",
                               config={})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ---- item 17: one centre crop for driving videos everywhere

def _two_colour_video(height=96, width=160):
    """Red outside the centre square, green inside."""
    frames = torch.zeros(3, height, width, 3, dtype=torch.uint8)
    frames[..., 0] = 255
    left = (width - height) // 2
    frames[:, :, left:left + height] = torch.tensor([0, 255, 0], dtype=torch.uint8)
    return frames


def test_item17_sheet_row_uses_the_conditioning_crop():
    row = anchored_cmd.driving_sheet_row(_two_colour_video(), 16, 16)
    assert row.shape == (3, 16, 16, 3)
    assert (row[..., 0] == 0).all() and (row[..., 1] == 255).all()
    crop, _ = anchored_cmd.square_crop(_two_colour_video())
    assert crop.shape == (3, 96, 96, 3) and (crop[..., 1] == 255).all()


def test_item17_eval_landmarks_see_the_sample_crop(tmp_path, capsys, monkeypatch,
                                                   random_frames):
    """`eval` of a non-square driving video detects landmarks on the same centre square the
    conditioning of `sample` uses (the generated video is square)."""
    import avatar_models.conditioning as conditioning
    from avatar_models.media import write_video

    write_video(tmp_path / "wide.mp4", _two_colour_video(), 5)
    write_video(tmp_path / "gen.mp4", random_frames(3, 32, 32), 5)
    seen = []

    def fake_detect(frames, **kwargs):
        seen.append(frames.clone())
        return torch.full((frames.shape[0], 478, 3), 0.5)

    monkeypatch.setattr(conditioning, "detect_landmarks", fake_detect)
    status, _ = run_cli(["eval", "anchored", "--generated", tmp_path / "gen.mp4", "--driving",
                         tmp_path / "wide.mp4"], capsys)
    assert status == 0
    generated, driving = seen
    assert generated.shape == (3, 32, 32, 3) and driving.shape == (3, 96, 96, 3)
    assert (driving[..., 0] < 40).all() and (driving[..., 1] > 215).all()  # no red border
