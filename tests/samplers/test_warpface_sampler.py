"""WarpFace sampling, editing and the train / sample / edit commands (tiny config, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from avatar_models.checkpoint import save_checkpoint
from avatar_models.training.diffusion import GaussianDiffusion
from avatar_models.warpface import MotionCode, WarpFace, WarpFaceConfig
from samplers.cli import main
from samplers.warpface import (
    SampleSettings,
    canonical_condition,
    ddim_sample,
    edit_conditions,
    encode_motion,
    make_scheduler,
    motion_conditions,
    reenact,
)

REF = dict(attention_backend="ref", warp_backend="ref")


def _model(seed: int = 0) -> WarpFace:
    model = WarpFace(WarpFaceConfig.from_name("tiny"), **REF).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_scheduler_matches_the_training_schedule():
    cfg = WarpFaceConfig.from_name("tiny")
    sched = make_scheduler(cfg)
    expected = GaussianDiffusion(cfg.diffusion_schedule()).alphas_cumprod
    torch.testing.assert_close(sched.alphas_cumprod.double(), expected, atol=1e-6, rtol=1e-5)


def test_reference_net_runs_once_per_source_across_steps_and_frames(monkeypatch):
    model = _model()
    calls = {"reference": 0, "denoise": 0}
    ref_forward, den_forward = model.reference_net.forward, model.denoising_net.forward

    def count(name, fn):
        def wrapped(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(model.reference_net, "forward", count("reference", ref_forward))
    monkeypatch.setattr(model.denoising_net, "forward", count("denoise", den_forward))
    out = reenact(model, torch.randn(8, 16, 16), torch.randn(5, 8, 16, 16),
                  settings=SampleSettings(steps=3, guidance=2.5, batch=2),
                  generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 8, 16, 16)
    assert calls == {"reference": 1, "denoise": 3 * 3}                    # 3 batches x 3 steps


def test_one_noise_for_every_frame_and_cfg_uses_theta_zero():
    seen = []

    def denoise(z, t, theta):
        seen.append((z.clone(), theta.clone()))
        return 0.1 * z + theta[:, :1, None, None].expand_as(z)

    cond = torch.randn(3, 64)
    sched = make_scheduler(WarpFaceConfig.from_name("tiny"))
    out = ddim_sample(denoise, cond, (8, 4, 4), sched, SampleSettings(steps=2, guidance=2.5,
                                                                       batch=3),
                      generator=torch.Generator().manual_seed(0))
    z0, theta = seen[0]
    assert torch.equal(z0[0], z0[1]) and torch.equal(z0[0], z0[3])       # shared initial noise
    assert torch.equal(theta[:3], cond) and torch.equal(theta[3:], torch.zeros(3, 64))
    same = ddim_sample(denoise, cond[:1].expand(3, -1), (8, 4, 4), sched,
                       SampleSettings(steps=2, guidance=2.5), generator=torch.Generator()
                       .manual_seed(0))
    assert torch.equal(same[0], same[2]) and not torch.equal(out[0], out[1])


def test_motion_conditions_absolute_and_relative():
    def code(theta_rs):
        return MotionCode(torch.zeros_like(theta_rs), theta_rs, torch.zeros(1), torch.zeros(1))

    src, drv = code(torch.randn(1, 64)), code(torch.randn(4, 64))
    torch.testing.assert_close(motion_conditions(src, drv), drv.theta_rs - src.theta_rs)
    rel = motion_conditions(src, drv, relative=True)
    torch.testing.assert_close(rel, drv.theta_rs - drv.theta_rs[:1])
    assert torch.equal(rel[0], torch.zeros(64))


def test_an_edit_of_subspace_k_changes_only_g_k():
    model = _model()
    code = encode_motion(model, torch.randn(1, 8, 16, 16))
    q = model.mgme.orthonormal_codebooks()
    values = [-2.0, 0.0, 1.5]
    cond = edit_conditions(code, q, 2, values).view(3, 4, 16)
    assert torch.equal(cond[:, [0, 1, 3]], torch.zeros(3, 3, 16))
    std = float(code.alpha[0, 2].std())
    for v, row in zip(values, cond[:, 2]):
        torch.testing.assert_close(row, q[2] @ torch.full((16,), v * std))
    one = edit_conditions(code, q, 1, [2.0], vector=5).view(4, 16)
    torch.testing.assert_close(one[1], 2.0 * float(code.alpha[0, 1].std()) * q[1][:, 5])
    assert torch.equal(one[[0, 2, 3]], torch.zeros(3, 16))
    with pytest.raises(ValueError, match="group must be in"):
        edit_conditions(code, q, 4, [1.0])
    assert torch.equal(canonical_condition(code), code.theta_sr[:1])


# ---- commands ----

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from avatar_models.data import procedural_faces as pf
    from avatar_models.data.patch_pca import PatchPCA
    from avatar_models.data.speech import speech_waveform
    from avatar_models.media import to_uint8_frames, write_image, write_video

    root = tmp_path_factory.mktemp("warpface")
    codec = PatchPCA.fit(pf.autoencoder_fit_frames(32), 8, patch=4)
    codec.save(root / "codec.safetensors")
    model = _model()
    save_checkpoint(root / "tiny.safetensors", model, system="warpface",
                    config=model.config.to_dict(),
                    extra={"codec": str(root / "codec.safetensors")})
    video = pf.make_video(pf.HELD_OUT_SEED_BASE + 1, 7, 4)["frames"] * 2 - 1
    write_image(root / "source.png", to_uint8_frames(video[0]))
    wave = speech_waveform(torch.rand(4), 25.0)
    write_video(root / "driving.mp4", to_uint8_frames(video), 25.0, audio=wave[None],
                sample_rate=16000)
    return root


def _common(files):
    return ["--checkpoint", str(files / "tiny.safetensors"), "--source",
            str(files / "source.png"), "--steps", "2", "--device", "cpu", "--no-progress",
            "--attention-backend", "ref", "--warp-backend", "ref"]


def test_sample_writes_a_reenacted_mp4_with_the_driving_audio(files):
    from avatar_models.media import read_video

    out = files / "out.mp4"
    assert main(["sample", "warpface", *_common(files), "--driving",
                 str(files / "driving.mp4"), "--out", str(out)]) == 0
    video = read_video(out)
    assert video.frames.shape == (4, 64, 64, 3) and video.audio is not None
    still = files / "still.mp4"
    assert main(["sample", "warpface", *_common(files), "--driving",
                 str(files / "source.png"), "--out", str(still), "--relative"]) == 0
    assert read_video(still).frames.shape[0] == 1


def test_edit_writes_the_sweep_and_the_motion_json(files):
    out = files / "edits"
    assert main(["edit", "warpface", *_common(files), "--group", "2", "--vector", "3",
                 "--count", "3", "--out-dir", str(out)]) == 0
    record = json.loads((out / "motion.json").read_text())
    assert record["values_std"] == [-2.0, 0.0, 2.0] and len(record["alpha"]) == 4
    assert len(record["theta_r_to_s"]) == 64
    assert all((out / name).is_file() for name in record["images"])
    assert main(["edit", "warpface", *_common(files), "--canonical", "--out-dir",
                 str(files / "canon")]) == 0
    assert (files / "canon" / "canonical.png").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--group", "9"], "--group must be in 1..4"),
    (["--group", "1", "--vector", "99"], "--vector must be in 1..16"),
    (["--canonical", "--vector", "2"], "--vector needs --group"),
    (["--group", "1", "--codec", "/nonexistent/codec.safetensors"], "file not found"),
])
def test_edit_checks_options_before_loading(files, extra, message, capsys, monkeypatch):
    import samplers.commands.warpface as command

    monkeypatch.setattr(command, "_load_model", lambda *a: pytest.fail("model loaded"))
    assert main(["edit", "warpface", *_common(files), *extra, "--out-dir",
                 str(files / "x")]) == 2
    assert message in capsys.readouterr().err


def test_train_checks_options_before_building(tmp_path, capsys, monkeypatch):
    import avatar_models.warpface as wf

    monkeypatch.setattr(wf, "WarpFace", lambda *a, **k: pytest.fail("model built"))
    assert main(["train", "warpface", "--out", str(tmp_path / "m.safetensors"), "--set",
                 "codebook_size=64"]) == 2
    assert "N_k=64, D_k=16" in capsys.readouterr().err
    assert main(["train", "warpface", "--out", str(tmp_path / "m.safetensors"), "--set",
                 "latent_size=24"]) == 2
    assert "latent_size" in capsys.readouterr().err


def test_train_and_sample_on_vae_latents(tiny_vae_dir, files, tmp_path):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.media import read_video

    ckpt = tmp_path / "vae.safetensors"
    assert main(["train", "warpface", "--vae", str(tiny_vae_dir), "--set", "in_channels=4",
                 "--steps", "1", "--batch-size", "2", "--ema-decay", "0", "--device", "cpu",
                 "--no-progress", "--out", str(ckpt)]) == 0
    assert load_checkpoint(ckpt).extra["vae"] == str(tiny_vae_dir.resolve())
    out = tmp_path / "out.mp4"
    assert main(["sample", "warpface", "--checkpoint", str(ckpt), "--source",
                 str(files / "source.png"), "--driving", str(files / "driving.mp4"),
                 "--steps", "1", "--device", "cpu", "--no-progress", "--max-frames", "2",
                 "--out", str(out)]) == 0
    assert read_video(out).frames.shape == (2, 128, 128, 3)             # 16 x 16 latents, f = 8


def test_vae_checkpoint_refuses_a_patch_pca_codec(tiny_vae_dir, files, tmp_path, capsys):
    ckpt = tmp_path / "vae_ckpt.safetensors"
    cfg = WarpFaceConfig.from_name("tiny", in_channels=4)
    save_checkpoint(ckpt, WarpFace(cfg), system="warpface", config=cfg.to_dict(),
                    extra={"vae": str(tiny_vae_dir)})
    assert main(["edit", "warpface", "--checkpoint", str(ckpt), "--source",
                 str(files / "source.png"), "--codec", str(files / "codec.safetensors"),
                 "--canonical", "--out-dir", str(tmp_path / "e")]) == 2
    assert "pass --vae, not --codec" in capsys.readouterr().err


@pytest.mark.parametrize("flags,attention,modulation", [
    ([], "warpca", True), (["--cross-attention"], "cross", True),
    (["--no-time-modulation"], "warpca", False)])
def test_train_arm_flags_set_the_config(tmp_path, flags, attention, modulation):
    from samplers.cli import build_parser
    from samplers.commands.warpface import validate_train_args

    argv = ["train", "warpface", "--out", str(tmp_path / "m.safetensors"), "--device", "cpu",
            *flags]
    cfg, train_cfg = validate_train_args(build_parser(argv).parse_args(argv))
    assert (cfg.motion_attention, cfg.time_modulation) == (attention, modulation)
    assert (train_cfg.lambda_sym, train_cfg.tau, train_cfg.epsilon) == (0.1, 0.5, 2.0)


def test_train_starts_both_unets_from_a_local_sd15_folder(tmp_path, capsys):
    """--sd15: a Stable Diffusion folder's unet/ (tiny random, tiny's shapes with SD's GEGLU and
    norm eps) loads into both UNets and the checkpoint records the folder; a config that does not
    match is refused before a model is built."""
    from diffusers import UNet2DConditionModel

    from avatar_models.checkpoint import load_checkpoint

    torch.manual_seed(0)
    levels = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                         block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=levels, up_block_types=("CrossAttnUpBlock2D",) * 2,
                         cross_attention_dim=24, attention_head_dim=2,
                         norm_num_groups=32).save_pretrained(tmp_path / "sd" / "unet")
    ckpt = tmp_path / "sd15.safetensors"
    shape = ["--set", "in_channels=4", "--set", "feed_forward=geglu", "--set",
             "transformer_norm_eps=1e-6"]
    assert main(["train", "warpface", "--sd15", str(tmp_path / "sd"), *shape, "--steps", "1",
                 "--batch-size", "2", "--device", "cpu", "--no-progress", "--out",
                 str(ckpt)]) == 0
    assert "loaded" in capsys.readouterr().err
    assert load_checkpoint(ckpt).extra["sd15"] == str((tmp_path / "sd" / "unet").resolve())
    assert main(["train", "warpface", "--sd15", str(tmp_path / "sd"), *shape[:2], "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "--sd15: SD1.5 weights need feed_forward='geglu'" in capsys.readouterr().err
