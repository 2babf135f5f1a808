"""MCDM sampling: archived clip bookkeeping, landmarks only when given, seams, CLI end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar_models.mcdm import MCDM, MCDMConfig
from samplers.mcdm import (
    MCDMSettings,
    SeamStats,
    initial_archive,
    mcdm_sample,
    roll_archive,
    seam_metric,
)

FAST = MCDMSettings(steps=1, prior_steps=1)


def _model(**overrides) -> MCDM:
    cfg = MCDMConfig.from_name("tiny", **overrides)
    torch.manual_seed(0)
    model = MCDM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _inputs(model, frames):
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    return dict(reference=torch.rand(3, 16, 16, generator=g) * 2 - 1,
                image=torch.randn(48, generator=g),
                audio=torch.rand(frames, cfg.audio_dim, generator=g))


def test_archived_clip_starts_as_the_repeated_reference_then_holds_the_last_a_frames():
    model = _model(archived_frames=6)                     # a = 6 > f = 4: spans two clips
    inputs = _inputs(model, 14)
    seen, clips = [], []

    def callback(c, state):
        seen.append(state["archived"].clone())
        clips.append(state["clip"].clone())

    report = mcdm_sample(model, **inputs, total_frames=14, settings=FAST, progress=False,
                         generator=torch.Generator().manual_seed(0), callback=callback)
    assert report["frames"] == 14 and report["clips"] == 4
    ref = inputs["reference"]
    assert torch.equal(seen[0], ref[None].expand(6, -1, -1, -1))
    made = torch.cat(clips)                                # every generated frame, in order
    assert torch.equal(seen[1], torch.cat([ref[None].expand(2, -1, -1, -1), made[:4]]))
    assert torch.equal(seen[2], made[2:8])
    assert torch.equal(seen[3], made[6:12])


def test_reference_archived_clip_never_holds_generated_frames():
    # w/o F_a (Table 4) / Fig. 5 "without the archived clip": the archive stays the reference
    model = _model()
    inputs = _inputs(model, 12)
    seen = []
    mcdm_sample(model, **inputs, total_frames=12, settings=FAST, progress=False,
                callback=lambda c, state: seen.append(state["archived"].clone()),
                archived_clip="reference")
    ref = inputs["reference"][None].expand(4, -1, -1, -1)
    assert len(seen) == 3 and all(torch.equal(a, ref) for a in seen)
    with pytest.raises(ValueError, match="archived_clip must be one of"):
        mcdm_sample(model, **inputs, total_frames=4, settings=FAST, progress=False,
                    archived_clip="none")


def test_archive_helpers():
    ref = torch.randn(3, 2, 2)
    arch = initial_archive(ref, 3)
    assert arch.shape == (3, 3, 2, 2) and torch.equal(arch[2], ref)
    new = torch.randn(2, 3, 2, 2)
    rolled = roll_archive(arch, new)
    assert torch.equal(rolled[0], ref) and torch.equal(rolled[1:], new)
    many = torch.randn(5, 3, 2, 2)
    assert torch.equal(roll_archive(arch, many), many[2:])


def test_writer_gets_every_frame_once_in_order():
    model = _model()
    got = []
    mcdm_sample(model, **_inputs(model, 10), total_frames=10, settings=FAST, progress=False,
                writer=lambda frames, first: got.append((first, frames.shape[0])))
    assert got == [(0, 4), (4, 4), (8, 2)]


def test_landmarks_are_used_only_when_given(monkeypatch):
    model = _model()
    calls = []
    guider = model.pose_guider.forward
    monkeypatch.setattr(model.pose_guider, "forward",
                        lambda lm: calls.append(lm.clone()) or guider(lm))
    motions = []
    mcdm_sample(model, **_inputs(model, 8), total_frames=8, settings=FAST, progress=False,
                callback=lambda c, s: motions.append(s["motion"]))
    assert calls == []
    lm = torch.rand(6, 40) * 2 - 1                          # shorter than the video: last row holds
    motions.clear()
    mcdm_sample(model, **_inputs(model, 8), total_frames=8, landmarks=lm, settings=FAST,
                progress=False, callback=lambda c, s: motions.append(s["motion"]))
    assert len(calls) == 2
    assert torch.equal(calls[1][0], torch.cat([lm[4:6], lm[5:6], lm[5:6]]))
    k = model.config.head_tokens
    with torch.no_grad():
        assert torch.equal(motions[0][:, :, :k], guider(lm[None, :4]))


def test_seam_metric_and_stats():
    prev = torch.zeros(1, 2, 2)
    clip = torch.stack([torch.full((1, 2, 2), v) for v in (1.0, 1.5, 2.0)])
    assert seam_metric(prev, clip) == (1.0, 0.5)
    stats = SeamStats()
    stats.add(1.0, 0.5)
    stats.add(0.5, 0.5)
    s = stats.summary()
    assert s["boundaries"] == 2 and s["seam_mean"] == 0.75 and s["seam_to_inner"] == 1.5
    assert stats.ratios == [2.0, 1.0]


def test_bad_sampler_inputs_name_the_argument():
    model = _model()
    inputs = _inputs(model, 4)
    with pytest.raises(ValueError, match="reference"):
        mcdm_sample(model, **{**inputs, "reference": torch.zeros(3, 8, 8)}, total_frames=4)
    with pytest.raises(ValueError, match="image"):
        mcdm_sample(model, **{**inputs, "image": torch.zeros(5)}, total_frames=4)
    with pytest.raises(ValueError, match="landmarks"):
        mcdm_sample(model, **inputs, total_frames=4, landmarks=torch.zeros(4, 7))
    with pytest.raises(ValueError, match="steps"):
        MCDMSettings(steps=0)


@pytest.fixture(scope="module")
def stage_checkpoints(tmp_path_factory):
    from samplers.cli import main

    root = tmp_path_factory.mktemp("mcdm")
    common = ["--steps", "1", "--batch-size", "1", "--ema-decay", "0", "--no-progress",
              "--device", "cpu"]
    paths = [root / f"s{s}.safetensors" for s in range(4)]
    assert main(["train", "mcdm", "--stage", "0", "--out", str(paths[0]), *common]) == 0
    for s in (1, 2, 3):
        assert main(["train", "mcdm", "--stage", str(s), "--init", str(paths[s - 1]),
                     "--out", str(paths[s]), *common]) == 0
    return root, paths


def _media(root):
    from avatar_models.data import procedural_faces as pf
    from avatar_models.data.speech import speech_waveform
    from avatar_models.media import write_image, write_video

    video = pf.make_video(3, 4, 10)
    face = root / "face.png"
    write_image(face, (video["frames"][0].permute(1, 2, 0) * 255).round().to(torch.uint8))
    wave = speech_waveform(video["params"][:, 5], 25.0)
    speech = root / "speech.mp4"
    write_video(speech, (video["frames"].permute(0, 2, 3, 1) * 255).round().to(torch.uint8),
                25.0, audio=wave[None], sample_rate=16000)
    lm = root / "lm.npy"
    np.save(lm, pf.landmarks(video["params"]).numpy())
    return face, speech, lm


def test_cli_stages_then_sample_write_an_mp4_with_audio(stage_checkpoints, capsys):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.media import read_audio, video_info
    from samplers.cli import main

    root, paths = stage_checkpoints
    assert [load_checkpoint(p).extra["train"]["stage"] for p in paths] == [0, 1, 2, 3]
    face, speech, lm = _media(root)
    out = root / "out.mp4"
    assert main(["sample", "mcdm", "--checkpoint", str(paths[3]), "--reference", str(face),
                 "--audio", str(speech), "--frames", "10", "--steps", "1", "--prior-steps",
                 "1", "--landmarks", str(lm), "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    info = video_info(out)
    assert info.num_frames == 10 and info.has_audio and info.fps == 25.0
    wave, rate = read_audio(out)
    assert abs(wave.shape[1] / rate - 0.4) < 0.05
    assert "2 boundaries" in capsys.readouterr().out


def test_cli_switches_reach_the_model_config(stage_checkpoints, tmp_path):
    from avatar_models.checkpoint import load_checkpoint
    from samplers.cli import main

    _, paths = stage_checkpoints
    out = tmp_path / "s3b.safetensors"
    assert main(["train", "mcdm", "--stage", "3", "--init", str(paths[2]), "--no-memory",
                 "--temporal", "softmax", "--memory-alpha", "0.5", "--steps", "1",
                 "--batch-size", "1", "--ema-decay", "0", "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    cfg = load_checkpoint(out).config
    assert (cfg["memory"], cfg["temporal"], cfg["memory_alpha"]) == (False, "softmax", 0.5)


def test_cli_option_errors_come_before_any_model_loads(stage_checkpoints, tmp_path, capsys,
                                                       monkeypatch):
    import avatar_models.mcdm as mcdm
    from samplers.cli import main

    root, paths = stage_checkpoints
    face, speech, _ = _media(tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(mcdm.MCDM, "__init__", no_model)
    out = str(tmp_path / "x.safetensors")
    assert main(["train", "mcdm", "--stage", "1", "--out", out]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["train", "mcdm", "--stage", "2", "--init", str(paths[0]), "--out", out]) == 2
    assert "stage 0 checkpoint" in capsys.readouterr().err
    assert main(["train", "mcdm", "--stage", "0", "--set", "memory_alpha=2.0", "--out",
                 out]) == 2
    assert "memory_alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:     # an argparse type error: exits while parsing
        main(["train", "mcdm", "--stage", "0", "--memory-alpha", "1.5", "--out", out])
    assert stop.value.code == 2 and "--memory-alpha" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((5, 7), dtype=np.float32))
    sample = ["sample", "mcdm", "--reference", str(face), "--audio", str(speech), "--out",
              str(tmp_path / "o.mp4")]
    assert main([*sample, "--checkpoint", str(paths[0])]) == 2
    assert "stage 0" in capsys.readouterr().err
    assert main([*sample, "--checkpoint", str(paths[3]), "--landmarks", str(bad)]) == 2
    assert "[T, 40]" in capsys.readouterr().err


def test_live_tensor_memory_does_not_grow_with_clips():
    """Bytes of live (gc-reachable, non-parameter) tensors at every clip's hand-off stay the
    same from clip 2 on: nothing but fixed-size state is carried."""
    import gc

    def live_bytes():
        gc.collect()
        return sum(o.numel() * o.element_size() for o in gc.get_objects()
                   if type(o) is torch.Tensor)

    model = _model()
    sizes = []
    mcdm_sample(model, **_inputs(model, 28), total_frames=28, settings=FAST, progress=False,
                writer=lambda frames, first: sizes.append(live_bytes()))
    assert len(sizes) == 7
    assert max(sizes[2:]) == min(sizes[2:]), sizes


def test_300_frame_run_keeps_peak_rss_flat_after_the_first_clips(tmp_path):
    """The issue's check: 300 tiny frames streamed to an mp4 with audio; the resident set after
    clip 10 may wobble by allocator noise (a few MB) but must not climb with the clip count."""
    from avatar_models.media import to_uint8_frames
    from samplers.lookahead import StreamingMp4

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        pytest.skip("no /proc/self/status on this platform")

    model = _model()
    rss = []
    with StreamingMp4(tmp_path / "long.mp4", 25.0, sample_rate=16000) as out:
        def write(frames, first):
            out.write(to_uint8_frames(frames.clamp(-1, 1)), torch.zeros(frames.shape[0] * 640))
            rss.append(rss_mb())

        mcdm_sample(model, **_inputs(model, 300), total_frames=300, settings=FAST,
                    progress=False, writer=write)
    assert len(rss) == 75
    early, late = max(rss[5:20]), max(rss[50:])
    assert late - early < 16.0, (early, late)


def test_clip_video_keeps_every_frame_in_range():
    # a random model's unclamped DDIM output leaves [-1, 1]; with clip_video=1 the last step's
    # x0 is clamped, so a written frame is sqrt(abar_0) x0 + sqrt(1 - abar_0) eps: within
    # [-1, 1] up to 1% of the predicted noise (abar_0 = 0.9999)
    model = _model()
    inputs = _inputs(model, 8)
    got = {}
    for clip in (None, 1.0):
        frames = []
        mcdm_sample(model, **inputs, total_frames=8, progress=False,
                    settings=MCDMSettings(steps=3, prior_steps=3, clip_video=clip,
                                          clip_prior=clip),
                    generator=torch.Generator().manual_seed(0),
                    writer=lambda x, first: frames.append(x))
        got[clip] = torch.cat(frames)
    assert got[1.0].abs().max() < 1.05 < got[None].abs().max()
    with pytest.raises(ValueError, match="clip_video must be None or > 0"):
        MCDMSettings(clip_video=0.0)
