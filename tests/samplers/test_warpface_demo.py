"""``avatar-kernels demo warpface``: the evaluation on a tiny random checkpoint (smoke), and the
metrics it is built from (unit tests)."""

import json
import math

import pytest
import torch

from avatar_models.data import procedural_faces as pf
from samplers.demo import warpface as wd

SMALL = dict(in_channels=8, latent_size=16, channels=(16, 16), attention_levels=(True, True),
             heads=2, groups=2, codebook_size=4, group_dim=8, vit_depth=1, vit_width=16,
             vit_heads=2, group_hidden=8, flow_hidden=8)


def _write_checkpoint(folder, name, **overrides):
    from avatar_models.checkpoint import save_checkpoint
    from avatar_models.data.patch_pca import PatchPCA
    from avatar_models.warpface import WarpFace, WarpFaceConfig

    cfg = WarpFaceConfig.from_dict({**SMALL, **overrides})
    codec_path = folder / f"{name}.codec.safetensors"
    PatchPCA.fit(pf.autoencoder_fit_frames(16, seed=0), 8, patch=4).save(codec_path)
    torch.manual_seed(0)
    model = WarpFace(cfg)
    with torch.no_grad():   # move the zero-initialised outputs off zero so the smoke test sees
        for p in model.parameters():        # a model whose outputs depend on its inputs
            p.add_(0.02 * torch.randn_like(p))
    save_checkpoint(folder / f"{name}.safetensors", model, system="warpface",
                    config=cfg.to_dict(), extra={"codec": str(codec_path)})


def test_demo_smoke_on_tiny_random_checkpoints(tmp_path):
    from samplers.cli import main

    _write_checkpoint(tmp_path, "warpca_s0")
    _write_checkpoint(tmp_path, "cross_s0", motion_attention="cross")
    out = tmp_path / "out"
    rc = main(["demo", "warpface", "--assets", str(tmp_path), "--out", str(out), "--pairs", "2",
               "--frames", "1", "--steps", "2", "--fit-steps", "3", "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["checkpoints"]) == {"warpca_s0", "cross_s0"}
    for entry in result["checkpoints"].values():
        for mode in ("self", "cross"):
            for key in ("apd_px", "apd_roll_deg", "aed", "psnr_db", "identity_sim"):
                assert entry[mode][key]["n"] == 2 and math.isfinite(entry[mode][key]["mean"])
        assert "leakage_sim" in entry["cross"] and "leakage_sim" not in entry["self"]
        assert entry["semantic_collapse"]["theta_dim"] == 16
    assert len(result["checkpoints"]["warpca_s0"]["denoising"]["eps_mse"]) == 6
    assert "sensitivity" in result["checkpoints"]["warpca_s0"]
    assert len(result["checkpoints"]["warpca_s0"]["sensitivity"]["table"]) == 2   # K groups
    assert "warpca-cross" in result["differences"]
    assert set(result["modulation_trends"]) == {"timesteps", "warpca_s0", "cross_s0"}
    assert (out / "gamma_delta.png").stat().st_size > 0 and (out / "samples.png").is_file()
    assert "| arm warpca (1 seeds) |" in (out / "results.md").read_text()


def test_demo_refuses_a_folder_without_checkpoints(tmp_path):
    from samplers.cli import main

    with pytest.raises(FileNotFoundError, match="make train-warpface"):
        main(["demo", "warpface", "--assets", str(tmp_path), "--out", str(tmp_path / "o"),
              "--debug"])


def test_train_arguments_are_accepted_by_the_train_command(tmp_path):
    from samplers.cli import build_parser
    from samplers.commands.warpface import validate_train_args

    recipe = wd.ArmRecipe()
    assert recipe.runs()[:3] == [("warpca", 0), ("cross", 0), ("notime", 0)]
    for arm, flag in (("cross", "cross_attention"), ("notime", "no_time_modulation")):
        argv = recipe.train_arguments(arm, 1, tmp_path / "x.safetensors")
        args = build_parser(argv).parse_args(argv)
        assert getattr(args, flag) and args.seed == 1 and args.steps == recipe.steps
        cfg, _ = validate_train_args(args)
        assert cfg.latent_size >= 16
    with pytest.raises(ValueError, match="arm must be one of"):
        recipe.train_arguments("keypoints", 0, tmp_path / "x.safetensors")


def test_train_runs_option_picks_runs(tmp_path, capsys):
    from samplers.cli import main
    from samplers.commands.validation import OptionError
    from samplers.commands.warpface import parse_runs

    assert parse_runs("warpca_s0, cross_s1") == [("warpca", 0), ("cross", 1)]
    for bad in ("keypoints_s0", "warpca_sx", "warpca"):
        with pytest.raises(OptionError, match=f"--runs: '{bad}' must be <arm>_s<seed>"):
            parse_runs(bad)
    assert main(["demo", "warpface", "--runs", "warpca_s0", "--assets", str(tmp_path)]) == 2
    assert "--runs needs --train" in capsys.readouterr().err


def test_motion_errors_units():
    target = torch.zeros(1, 8)
    fitted = torch.zeros(1, 8)
    fitted[0, 0], fitted[0, 1] = 0.5, 0.75          # 3 px right, 3 px down
    fitted[0, 2] = math.radians(2.0) / 0.25         # roll = 0.25 tilt rad: 2 degrees
    fitted[0, 3:] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    err = wd.motion_errors(fitted, target)
    assert err["apd_px"].item() == pytest.approx(math.hypot(3, 3))
    assert err["apd_roll_deg"].item() == pytest.approx(2.0, rel=1e-5)
    assert err["aed"].item() == pytest.approx(0.3)


def test_ideal_frames_score_perfectly_and_copy_source_does_not():
    pair = wd.make_pairs(1, 2)[0]
    for mode in ("self", "cross"):
        ideal = pair.ideal_frames[mode]
        m = wd.frame_metrics(ideal, pair.drive_params[mode], pair, mode)
        assert m["apd_px"] == 0 and m["aed"] == 0 and m["psnr_db"] > 100
        assert m["identity_sim"] == pytest.approx(1.0)
        copy = wd.frame_metrics(pair.source_frame[None].expand(2, -1, -1, -1),
                                pair.source_params[None].expand(2, -1), pair, mode)
        assert copy["apd_px"] + copy["aed"] > 0 and copy["psnr_db"] < m["psnr_db"]
    cross = wd.frame_metrics(pair.ideal_frames["cross"], pair.drive_params["cross"], pair,
                             "cross")
    driving = wd.frame_metrics(pair.driving_frames["cross"], pair.drive_params["cross"], pair,
                               "cross")
    # the ideal (source identity) resembles the driver less than the driver itself does
    assert cross["leakage_sim"] < driving["leakage_sim"] == pytest.approx(1.0)
    assert driving["identity_sim"] < cross["identity_sim"]


def test_held_out_pairs_use_held_out_identities_and_spaced_frames():
    pairs = wd.make_pairs(2, 3)
    seeds = {p.source_ident.seed for p in pairs} | {p.driving_ident.seed for p in pairs}
    assert min(seeds) >= pf.HELD_OUT_SEED_BASE and len(seeds) == 4
    own = pf.sample_motion(wd.SOURCE_MOTION, 50)
    assert torch.equal(pairs[0].drive_params["self"], own[[5, 10, 15]])
    assert torch.equal(pairs[0].source_params, own[0])


def test_effective_rank_and_ridge_r2():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    assert wd.effective_rank(x[:, :1] * torch.arange(1.0, 7.0)) == pytest.approx(1.0)
    assert 5.0 < wd.effective_rank(x) <= 6.0
    w = torch.randn(6, 3, generator=gen)
    r2 = wd.ridge_r2(x[:150], x[:150] @ w, x[150:], x[150:] @ w)
    assert (r2 > 0.99).all()
    noise = torch.randn(200, 3, generator=gen)
    assert (wd.ridge_r2(x[:150], noise[:150], x[150:], noise[150:]) < 0.2).all()


def test_sensitivity_table_concentration():
    fitted = torch.zeros(4, 8)                     # K = 2: rows -2 std, +2 std per group
    fitted[1, 5] = 0.5                             # group 0 moves only mouth_open
    fitted[3, :] = torch.tensor([0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.2, 0.1])   # group 1: all equal
    table = wd.sensitivity_table([fitted], 2)
    assert table["table"][0][5] == pytest.approx(0.5)
    assert table["concentration"][0] == pytest.approx(1.0)
    assert table["concentration"][1] == pytest.approx(1 / 8)


def test_arm_summary_pairs_the_differences():
    per_pair = {name: {m: [{"aed": v + i} for i in range(3)] for m in ("self", "cross")}
                for name, v in (("warpca_s0", 0.0), ("warpca_s1", 2.0), ("cross_s0", 5.0))}
    arms, diffs = wd.arm_summary(per_pair)
    assert arms["warpca"]["seeds"] == 2 and arms["warpca"]["self"]["aed"]["mean"] == 2.0
    d = diffs["warpca-cross"]["self"]["aed"]
    assert d["mean"] == -4.0 and d["low"] == d["high"] == -4.0   # the same gap in every pair


def test_edit_finds_the_codec_beside_a_moved_checkpoint(tmp_path):
    from avatar_models.checkpoint import load_checkpoint, save_checkpoint
    from avatar_models.media import write_image
    from samplers.cli import main

    _write_checkpoint(tmp_path, "warpca_s0")
    moved = tmp_path / "moved"
    moved.mkdir()
    ckpt = load_checkpoint(tmp_path / "warpca_s0.safetensors")
    (tmp_path / "warpca_s0.codec.safetensors").rename(moved / "warpca_s0.codec.safetensors")
    save_checkpoint(moved / "warpca_s0.safetensors", ckpt.model, system="warpface",
                    config=ckpt.config, extra=ckpt.extra)    # still records the old path
    frame = (pf.render(pf.sample_identity(1_000_000), pf.sample_motion(0, 1))[0][0] * 255)
    write_image(tmp_path / "src.png", frame.round().byte().permute(1, 2, 0))
    rc = main(["edit", "warpface", "--checkpoint", str(moved / "warpca_s0.safetensors"),
               "--source", str(tmp_path / "src.png"), "--canonical", "--steps", "1",
               "--out-dir", str(tmp_path / "edit"), "--device", "cpu", "--no-progress"])
    assert rc == 0 and (tmp_path / "edit" / "canonical.png").is_file()
