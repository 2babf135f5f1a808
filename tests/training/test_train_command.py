"""`avatar-kernels train anchored` on the engine: --resume, --set with --resume (applies or
raises), --checkpoint-every / --keep-last, and the commands under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avatar_models.checkpoint import load_checkpoint
from avatar_models.training import run_state
from avatar_models.training.engine import metrics_path, read_metrics
from samplers.cli import main

ROOT = Path(__file__).resolve().parents[2]


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "anchored", "--synthetic", "8", "--config", "tiny", "--batch-size", "4",
            "--lr", "1e-3", "--out", str(out), "--no-progress", *extra]


def test_resume_continues_and_set_applies_or_raises(tmp_path, capsys):
    out = tmp_path / "ck.safetensors"
    assert main(train_args(out, "--steps", "4", "--checkpoint-every", "2",
                           "--keep-last", "1")) == 0
    root = run_state.checkpoint_root(out)
    assert [p.name for p in run_state.step_dirs(root)] == ["step-00000004"]

    capsys.readouterr()
    assert main(train_args(out, "--steps", "6", "--resume", str(out), "--set", "hidden=32")) == 2
    err = capsys.readouterr().err
    assert "--set with --resume: hidden=32 changes the model's weight shapes" in err
    assert "the checkpoint has hidden=64" in err

    assert main(train_args(out, "--steps", "6", "--resume", str(root),
                           "--config", "sdit-s/2")) == 2
    assert "trains 'tiny'; drop --config" in capsys.readouterr().err

    # frames: no weight depends on it (the temporal table is computed), so it applies
    assert main(train_args(out, "--steps", "6", "--resume", str(root),
                           "--set", "frames=4")) == 0
    err = capsys.readouterr().err
    assert "--set frames=4 applies on resume (the checkpoint had frames=3" in err
    assert f"resumed anchored from {root / 'step-00000004'} at step 4" in err
    assert "resume: steps 4 -> 6 (this run's value applies)" in err
    ck = load_checkpoint(out)
    assert ck.extra["step"] == 6 and ck.config["frames"] == 4
    assert [r["step"] for r in read_metrics(metrics_path(out))] == [1, 2, 3, 4, 5, 6]


def test_resume_of_a_missing_or_foreign_path_is_an_option_error(tmp_path, capsys):
    assert main(train_args(tmp_path / "a.safetensors", "--steps", "1", "--resume",
                           str(tmp_path / "none"))) == 2
    assert "does not exist" in capsys.readouterr().err
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(plain))
    assert main(train_args(tmp_path / "a.safetensors", "--steps", "1", "--resume",
                           str(plain))) == 2
    assert "has no training state" in capsys.readouterr().err


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "samplers", *args]
    # its own session, so that a timeout can end torchrun and its workers together
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_commands_run_unchanged_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m samplers train anchored --fsdp ...` then `sample
    anchored --parallel` (gloo on CPU): the same commands as on one process."""
    from avatar_models.media import read_video, write_image, write_video

    out = tmp_path / "ck.safetensors"
    run = _torchrun(*train_args(out, "--set", "in_channels=3", "--set", "input_size=16",
                                "--set", "patch=4", "--steps", "2", "--fsdp"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_checkpoint(out).extra["step"] == 2
    records = read_metrics(metrics_path(out))
    assert [r["step"] for r in records] == [1, 2]            # rank 0 alone writes metrics
    assert run_state.find_checkpoint(out).state["world_size"] == 2

    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(9, 16, 16, 3, generator=g) * 255).to(torch.uint8)
    write_video(tmp_path / "drive.mp4", frames, 8)
    write_image(tmp_path / "face.png", frames[0])
    video = tmp_path / "out.mp4"
    run = _torchrun("sample", "anchored", "--checkpoint", str(out), "--source",
                    str(tmp_path / "face.png"), "--driving", str(tmp_path / "drive.mp4"),
                    "--out", str(video), "--steps", "2", "--parallel", "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_video(video, with_audio=False).frames.shape == (9, 16, 16, 3)


def test_sample_parallel_options(tmp_path, capsys):
    """--parallel needs --strategy anchored; without torchrun it says so and samples on one
    process, giving the same video as without it."""
    from avatar_models.media import read_video, write_image, write_video

    out = tmp_path / "ck.safetensors"
    assert main(train_args(out, "--set", "in_channels=3", "--set", "input_size=16", "--set",
                           "patch=4", "--steps", "1")) == 0
    frames = (torch.rand(7, 16, 16, 3, generator=torch.Generator().manual_seed(0)) * 255)
    write_video(tmp_path / "drive.mp4", frames.to(torch.uint8), 8)
    write_image(tmp_path / "face.png", frames[0].to(torch.uint8))
    common = ["sample", "anchored", "--checkpoint", str(out), "--source",
              str(tmp_path / "face.png"), "--driving", str(tmp_path / "drive.mp4"), "--steps",
              "2", "--no-progress"]
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "m.mp4"), "--parallel", "--strategy",
                          "multidiffusion"]) == 2
    assert "--parallel splits the anchored sequences" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "p.mp4"), "--parallel"]) == 0
    assert "--parallel: one process (not started by torchrun)" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "s.mp4")]) == 0
    assert main(common + ["--out", str(tmp_path / "o.mp4"), "--seed", "1"]) == 0
    a, b, other = (read_video(tmp_path / f"{name}.mp4", with_audio=False).frames.float()
                   for name in ("p", "s", "o"))
    # Not bitwise: CPU BLAS results may differ in the last bit from call to call (MKL picks its
    # code path by buffer alignment unless MKL_CBWR is set), and x264 at crf 18 turns a last-bit
    # difference into a few levels at a few pixels. A sampling divergence (other noise, another
    # plan) moves every pixel: another seed is tens of levels away on average.
    assert (a - b).abs().mean() < 1.0
    assert (a - other).abs().mean() > 10.0
