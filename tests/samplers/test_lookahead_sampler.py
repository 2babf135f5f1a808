"""Lookahead sampling: segment bookkeeping, keyframes, starting frames, warnings, streaming."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from avatar_models.lookahead import LookaheadConfig, LookaheadDiT, NoiseSchedule
from samplers.lookahead import (
    LookaheadSettings,
    StreamingMp4,
    keyframe_at,
    lookahead_sample,
    segment_plan,
)

SHAPE = (3, 8, 8)


def _model(start_mode="replace", seed=0):
    cfg = LookaheadConfig.from_name("tiny", start_mode=start_mode)
    model = LookaheadDiT(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


class Recorder:
    """Wraps the model callable and keeps every call's inputs."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, audio, keyframe, keyframe_time, *, start=None, audio_null=None):
        self.calls.append({"x": x.clone(), "t": t.clone(), "audio": audio.clone(),
                           "keyframe": keyframe.clone(), "keyframe_time": keyframe_time.clone(),
                           "start": None if start is None else start.clone(),
                           "audio_null": audio_null})
        return self.model(x, t, audio, keyframe, keyframe_time, start=start,
                          audio_null=audio_null)


def _run(model, total=11, settings=None, keyframes=None, start_mode="replace", **kw):
    ref = torch.linspace(-1, 1, 3 * 64).view(SHAPE)
    return lookahead_sample(
        model, NoiseSchedule("flow"), total_frames=total, window=4, latent_shape=SHAPE,
        audio=torch.linspace(0, 1, total * 4).view(total, 4), fps=25.0,
        keyframes=keyframes or [(0.0, ref)],
        settings=settings or LookaheadSettings(distance=3, starting_frames=1, steps=3),
        start_mode=start_mode, generator=torch.Generator().manual_seed(0), progress=False, **kw)


@pytest.mark.parametrize("mode,s", [("replace", 1), ("replace", 2), ("concat", 2)])
def test_segments_advance_without_gap_or_repeat(mode, s):
    plan = segment_plan(23, 4, s, mode)
    new = [f for seg in plan for f in range(seg.new_first, seg.new_first + seg.new_count)]
    assert new[:23] == list(range(23)) and len(new) == len(set(new))
    step = 4 - s if mode == "replace" else 4
    assert [seg.first for seg in plan[1:]] == [4 + (i - 1) * step - (s if mode == "replace"
                                                                     else 0)
                                               for i in range(1, len(plan))]
    assert plan[0].starting == 0 and all(seg.starting == s for seg in plan[1:])
    with pytest.raises(ValueError, match="starting frames s must be in"):
        segment_plan(10, 4, 4, "replace")


def test_writer_gets_every_frame_once_in_order():
    got = []
    n = _run(_model(), total=11, writer=lambda frames, first: got.append((first, frames.shape)))
    assert n == 11
    assert [g[0] for g in got] == [0, 4, 7, 10]
    assert sum(g[1][0] for g in got) == 11


@pytest.mark.parametrize("mode", ["replace", "concat"])
def test_starting_frames_are_the_previous_segments_last_frames_at_every_step(mode):
    finals, steps = {}, []

    def callback(seg, k, state):
        steps.append((seg.index, k, state["x"].clone(), state["start"]))
        finals[seg.index] = state["x"].clone()

    rec = Recorder(_model(mode))
    _run(rec, total=12, callback=callback, start_mode=mode,
         settings=LookaheadSettings(distance=3, starting_frames=2, steps=3))
    checked = 0
    for seg, _, x, start in steps:
        if seg == 0:
            assert start is None
            continue
        tail = finals[seg - 1][:, -2:]
        assert torch.equal(start, tail)
        if mode == "replace":
            assert torch.equal(x[:, :2], tail)
        checked += 1
    assert checked >= 3
    for call in rec.calls[3:]:                # segment 1 on: the model got the tail
        assert call["start"] is not None and call["start"].shape[1] == 2
    assert all(c["start"] is None for c in rec.calls[:3])


def test_keyframe_never_changes_and_sits_at_n_minus_1_plus_d():
    rec = Recorder(_model())
    ref = torch.linspace(-1, 1, 3 * 64).view(SHAPE)
    _run(rec, keyframes=[(0.0, ref)])
    for call in rec.calls:
        assert torch.equal(call["keyframe"][0], ref)
        assert call["keyframe_time"].tolist() == [4 - 1 + 3]


def test_changing_d_changes_the_keyframe_position_and_nothing_else():
    runs = []
    for distance in (3, 7):
        rec = Recorder(_model())
        _run(rec, settings=LookaheadSettings(distance=distance, starting_frames=1, steps=3))
        runs.append(rec.calls[0])
    a, b = runs
    assert a["keyframe_time"].item() == 6 and b["keyframe_time"].item() == 10
    for key in ("x", "t", "audio", "keyframe"):
        assert torch.equal(a[key], b[key]), key


def test_reference_and_past_modes():
    for mode, expected in (("reference", 0), ("past", -3)):
        rec = Recorder(_model())
        _run(rec, settings=LookaheadSettings(distance=3, steps=2, mode=mode))
        assert {c["keyframe_time"].item() for c in rec.calls} == {expected}


def test_narrative_keyframe_switches_d_frames_before_its_time():
    a, b = torch.zeros(SHAPE), torch.ones(SHAPE)
    # switch at frame 10 (0.4 s at 25 fps); D = 3: segment windows end at 3, 6, 9 (s = 1)
    # anchors at frames 6, 9, 12 -> the third segment (window ending at frame 9) already uses b
    rec = Recorder(_model())
    _run(rec, total=10, keyframes=[(0.0, a), (0.4, b)],
         settings=LookaheadSettings(distance=3, starting_frames=1, steps=1))
    used = [float(c["keyframe"].mean()) for c in rec.calls]
    assert used == [0.0, 0.0, 1.0]
    assert keyframe_at([(0.0, "x"), (1.0, "y")], 0.99) == "x"
    assert keyframe_at([(0.5, "x"), (1.0, "y")], 0.0) == "x"
    with pytest.raises(ValueError, match="increasing"):
        keyframe_at([(1.0, "x"), (0.0, "y")], 0.5)


def test_audio_cfg_keeps_the_keyframe_in_the_unconditional_branch():
    rec = Recorder(_model())
    _run(rec, total=4, settings=LookaheadSettings(distance=3, steps=2, guidance=3.0))
    call = rec.calls[0]
    assert call["audio_null"].tolist() == [False, True]
    assert torch.equal(call["keyframe"][0], call["keyframe"][1])
    assert torch.equal(call["keyframe_time"][0], call["keyframe_time"][1])


def test_audio_slice_covers_the_window():
    rec = Recorder(_model())
    audio = torch.arange(11 * 4, dtype=torch.float32).view(11, 4)
    lookahead_sample(rec, NoiseSchedule("flow"), total_frames=11, window=4, latent_shape=SHAPE,
                     audio=audio, keyframes=[(0.0, torch.zeros(SHAPE))], fps=25.0,
                     settings=LookaheadSettings(distance=3, starting_frames=1, steps=1),
                     progress=False)
    firsts = [0, 3, 6, 9]
    for call, first in zip(rec.calls, firsts):
        want = torch.zeros(4, 4)
        rows = audio[first:first + 4]
        want[: rows.shape[0]] = rows
        assert torch.equal(call["audio"][0], want)


def test_warnings_for_short_and_out_of_range_distances():
    with pytest.warns(UserWarning, match="D=2 < r=4"):
        lookahead_sample(_model(), NoiseSchedule("flow"), total_frames=4, window=4,
                         latent_shape=SHAPE, audio=torch.zeros(16, 4), ratio=4,
                         keyframes=[(0.0, torch.zeros(SHAPE))], fps=25.0,
                         settings=LookaheadSettings(distance=2, steps=1), progress=False)
    with pytest.warns(UserWarning, match="exceeds the trained d_max=2"):
        _run(_model(), total=4, settings=LookaheadSettings(distance=5, steps=1, d_max=2))


def _frames_u8(count, value=128):
    return torch.full((count, 16, 16, 3), value, dtype=torch.uint8)


@pytest.mark.parametrize("fragmented,tolerance", [(False, 0), (True, 0.1)])
def test_streaming_mp4_has_audio_of_the_right_duration(tmp_path, fragmented, tolerance):
    from avatar_models.media import read_audio, video_info

    path = tmp_path / "out.mp4"
    with StreamingMp4(path, 25.0, sample_rate=16000, fragmented=fragmented) as writer:
        for _ in range(3):
            writer.write(_frames_u8(5), torch.sin(torch.arange(5 * 640) * 0.05) * 0.3)
    info = video_info(path)
    assert info.num_frames == 15 and info.has_audio
    wave, rate = read_audio(path)[:2]
    assert rate == 16000
    assert abs(wave.shape[-1] / rate - 15 / 25) <= tolerance


@pytest.mark.parametrize("fragmented", [False, True])
def test_interrupted_run_leaves_a_playable_file(tmp_path, fragmented):
    from avatar_models.media import read_video

    path = tmp_path / "cut.mp4"
    done = []
    with pytest.raises(KeyboardInterrupt):
        with StreamingMp4(path, 25.0, fragmented=fragmented) as writer:
            def write(frames, first):
                if len(done) == 2:
                    raise KeyboardInterrupt
                u8 = ((frames.clamp(-1, 1) + 1) * 127.5).round().byte()
                u8 = torch.nn.functional.interpolate(u8.float(), size=(16, 16)).byte()
                writer.write(u8.permute(0, 2, 3, 1).contiguous())
                done.append(frames.shape[0])
            _run(_model(), total=20, writer=write)
    frames = read_video(path, with_audio=False)[0]
    assert frames.shape[0] == sum(done) == 7


def test_live_tensor_memory_does_not_grow_with_segments():
    """A proxy for flat RSS: bytes of live tensors (gc-reachable) at each segment's hand-off
    stay the same from segment 2 on."""
    import gc

    def live_bytes():
        gc.collect()
        return sum(o.numel() * o.element_size() for o in gc.get_objects()
                   if type(o) is torch.Tensor)      # parameters have their own type

    sizes = []
    _run(_model(), total=4 + 3 * 6, writer=lambda frames, first: sizes.append(live_bytes()))
    assert len(sizes) == 7
    assert max(sizes[2:]) == min(sizes[2:]), sizes


def _speech_wav(path, seconds=1.2):
    from avatar_models.data.speech import speech_waveform
    from avatar_models.media import write_wav

    wave = speech_waveform(torch.rand(int(seconds * 25), generator=torch.Generator()
                                      .manual_seed(0)), 25.0)
    write_wav(path, wave, 16000)


def test_cli_train_then_sample_writes_an_mp4_with_audio(tmp_path, capsys):
    from avatar_models.media import read_audio, video_info, write_image
    from samplers.cli import main

    base, tuned = tmp_path / "base.safetensors", tmp_path / "la.safetensors"
    common = ["--steps", "2", "--batch-size", "2", "--no-progress", "--d-max", "3",
              "--distance", "3", "--device", "cpu"]
    assert main(["train", "lookahead", "--stage", "base", "--out", str(base), *common]) == 0
    assert main(["train", "lookahead", "--stage", "lookahead", "--init", str(base),
                 "--out", str(tuned), *common]) == 0
    write_image(tmp_path / "face.png", torch.randint(0, 255, (40, 50, 3), dtype=torch.uint8))
    _speech_wav(tmp_path / "speech.wav")
    out = tmp_path / "out.mp4"
    assert main(["sample", "lookahead", "--checkpoint", str(tuned), "--reference",
                 str(tmp_path / "face.png"), "--audio", str(tmp_path / "speech.wav"), "--out",
                 str(out), "--steps", "2", "--no-progress", "--device", "cpu"]) == 0
    info = video_info(out)
    assert info.num_frames == 30 and info.has_audio
    wave, rate = read_audio(out)[:2]
    assert wave.shape[-1] == 30 * rate // 25


def test_cli_option_errors_come_before_any_model_loads(tmp_path, capsys):
    from avatar_models.media import write_image
    from samplers.cli import main

    write_image(tmp_path / "face.png", torch.zeros(8, 8, 3, dtype=torch.uint8))
    assert main(["train", "lookahead", "--stage", "base", "--fixed-anchor", "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "needs --stage lookahead" in capsys.readouterr().err
    assert main(["train", "lookahead", "--stage", "lookahead", "--starting-frames", "4",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "s < n = 4" in capsys.readouterr().err
    assert main(["sample", "lookahead", "--checkpoint", str(tmp_path / "face.png"),
                 "--reference", str(tmp_path / "face.png"), "--audio",
                 str(tmp_path / "face.png"), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_fragmented_file_survives_a_hard_kill(tmp_path):
    """os._exit skips every close: the fragments flushed so far must still play."""
    import subprocess
    import sys

    from avatar_models.media import read_video

    path = tmp_path / "killed.mp4"
    script = (
        "import os, torch\n"
        "from samplers.lookahead import StreamingMp4\n"
        f"w = StreamingMp4({str(path)!r}, 25.0, fragmented=True, sample_rate=16000)\n"
        "for v in (50, 100, 150, 200):\n"
        "    w.write(torch.full((5, 16, 16, 3), v, dtype=torch.uint8), torch.zeros(3200))\n"
        "os._exit(3)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=str(Path(__file__).parents[2]),
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 3
    frames = read_video(path, with_audio=False)[0]
    assert 5 <= frames.shape[0] < 20 and frames.shape[0] % 5 == 0
    assert int(frames[0].float().mean().round()) in range(45, 56)


def test_distance_pilot_moves_only_the_clean_frames_time():
    from samplers.lookahead import distance_pilot

    rec = Recorder(_model())
    clean = torch.linspace(-1, 1, 3 * 64).view(SHAPE)
    frames = distance_pilot(rec, NoiseSchedule("flow"), clean, torch.ones(1, 4), [1, 8],
                            steps=2)
    assert sorted(frames) == [1, 8] and frames[1].shape == SHAPE
    assert [c["keyframe_time"].item() for c in rec.calls] == [1, 1, 8, 8]
    assert torch.equal(rec.calls[0]["x"], rec.calls[2]["x"])       # same noise for every k
    assert all(torch.equal(c["keyframe"][0], clean) for c in rec.calls)
    assert not torch.equal(frames[1], frames[8])


def test_cli_sample_on_real_inputs_with_local_wav2vec_and_vae_folders(tmp_path, tiny_vae_dir,
                                                                      tiny_wav2vec_dir):
    """The real-data path of `sample lookahead`: a latent-space checkpoint trained on wav2vec
    features, sampled from a photo and a wav with local (tiny, random) Wav2Vec2 and VAE
    folders; the mp4 has the VAE's pixel size and the audio's duration."""
    from avatar_models.checkpoint import save_checkpoint
    from avatar_models.lookahead import LookaheadConfig, LookaheadDiT
    from avatar_models.media import read_audio, video_info, write_image
    from samplers.cli import main

    w2v = tiny_wav2vec_dir
    # 4 latent channels at 4x4 = 32x32 pixels through the tiny VAE's 8x downsampling
    cfg = LookaheadConfig.from_name("tiny", in_channels=4, input_height=4, input_width=4,
                                    audio_dim=16)
    ckpt = tmp_path / "latent.safetensors"
    save_checkpoint(ckpt, LookaheadDiT(cfg).state_dict(), system="lookahead",
                    config=cfg.to_dict(),
                    extra={"data": {"kind": "video", "audio": "wav2vec", "fps": 25,
                                    "sample_rate": 16000},
                           "train": {"stage": "lookahead", "distance": 3, "d_max": 3,
                                     "starting_frames": 1}})
    write_image(tmp_path / "face.png", torch.randint(0, 255, (48, 40, 3), dtype=torch.uint8))
    _speech_wav(tmp_path / "speech.wav")
    out = tmp_path / "out.mp4"
    common = ["sample", "lookahead", "--checkpoint", str(ckpt), "--reference",
              str(tmp_path / "face.png"), "--audio", str(tmp_path / "speech.wav"), "--out",
              str(out), "--steps", "2", "--no-progress", "--device", "cpu"]
    assert main([*common, "--vae", str(tiny_vae_dir)]) == 2     # no --wav2vec: refused
    assert main([*common, "--vae", str(tiny_vae_dir), "--wav2vec", str(w2v)]) == 0
    info = video_info(out)
    assert info.num_frames == 30 and info.has_audio
    assert (info.height, info.width) == (32, 32)
    wave, rate = read_audio(out)[:2]
    assert wave.shape[-1] == 30 * rate // 25
