"""`avatar-kernels demo mcdm` (samplers/demo/mcdm_demo.py): metrics and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from avatar_models.checkpoint import save_checkpoint
from avatar_models.data import procedural_faces as pf
from avatar_models.mcdm import MCDM, MCDMConfig
from samplers.cli import main
from samplers.demo import mcdm_demo
from samplers.demo.mcdm_demo import MouthProbe, held_out_pair, mouth_crops, ssim


def test_ssim_is_one_for_equal_frames_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    noisy = [ssim(x, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)).mean().item()
             for s in (0.05, 0.2, 0.5)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]
    # symmetric, and a constant shift of brightness costs less than noise of the same size
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(x, y), ssim(y, x))
    with pytest.raises(ValueError, match="equal shapes"):
        ssim(x, x[:, :2])
    with pytest.raises(ValueError, match="at least 7 px"):
        ssim(x[..., :5, :5], x[..., :5, :5])


def test_ssim_matches_the_formula_on_one_window():
    # a 7x7 frame has exactly one valid window: SSIM is the formula on the Gaussian-weighted
    # means, variances and covariance
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 1, 7, 7, generator=g), torch.rand(1, 1, 7, 7, generator=g)
    w = torch.exp(-(torch.arange(7.0) - 3) ** 2 / (2 * 1.5 ** 2)).double()
    w = (w[:, None] * w[None, :]) / w.sum() ** 2
    xd, yd = x[0, 0].double(), y[0, 0].double()
    mx, my = (w * xd).sum(), (w * yd).sum()
    vx, vy = (w * xd * xd).sum() - mx ** 2, (w * yd * yd).sum() - my ** 2
    cov = (w * xd * yd).sum() - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    want = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert torch.allclose(ssim(x, y)[0], want)


def test_mouth_crop_is_centred_on_the_mouth_landmarks():
    # a frame that is one bright pixel exactly at the mouth centre: the crop's centre sees it
    params = pf.sample_motion(5, 1)
    lm = pf.landmarks(params)
    centre = lm.view(1, pf.N_LANDMARKS, 2)[0, list(mcdm_demo.MOUTH_POINTS)].mean(0)
    frame = torch.zeros(1, 3, 16, 16)
    px = ((centre + 1) / 2 * 16 - 0.5).round().long()
    frame[0, :, px[1], px[0]] = 1.0
    crop = mouth_crops(frame, lm).view(3, 5, 5)
    k = mcdm_demo.MOUTH_CROP // 2
    assert crop[0].argmax() // 5 in (k - 1, k, k + 1) and crop[0].argmax() % 5 in (k - 1, k, k + 1)
    assert crop[0].max() > 0.2


def test_mouth_probe_reads_the_opening_of_held_out_ideal_frames():
    probe = MouthProbe.fit(16, 25.0)
    pair = held_out_pair(0, 48, 16, 25.0, 16000, 4)
    read = probe(pair["ideal"], pair["landmarks"])
    corr = torch.corrcoef(torch.stack([read, pair["mouth"].double()]))[0, 1]
    assert corr > 0.9
    # a frame with the mouth painted over by the skin colour reads as closed-ish
    shuffled = probe(pair["ideal"].flip(0), pair["landmarks"])
    assert torch.corrcoef(torch.stack([shuffled, pair["mouth"].double()]))[0, 1] < corr - 0.3


def test_held_out_pairs_use_identities_never_drawn_in_training():
    pair = held_out_pair(3, 12, 16, 25.0, 16000, 4)
    assert pair["ideal"].shape == (12, 3, 16, 16) and pair["audio"].shape == (12, 4)
    assert mcdm_demo.IDENTITY_SEED_BASE + 3 >= pf.HELD_OUT_SEED_BASE
    assert int(pair["regions"]["background"].sum()) >= 8


def test_options_validate():
    with pytest.raises(ValueError, match="arms must be"):
        mcdm_demo.MCDMDemoOptions(arms=("full", "bogus"))
    with pytest.raises(ValueError, match="frames must be >= 8"):
        mcdm_demo.MCDMDemoOptions(frames=4)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """Random-weight stand-ins for the shipped checkpoints (same names and metadata)."""
    folder = tmp_path_factory.mktemp("mcdm_assets")
    for name, overrides in (("s3_full", {}), ("s3_no_mta", {"memory": False,
                                                              "temporal": "softmax"})):
        cfg = MCDMConfig.from_name("tiny", **overrides)
        torch.manual_seed(0)
        model = MCDM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ema = {k: v.clone() for k, v in model.state_dict().items()}
        save_checkpoint(folder / f"{name}.safetensors", model, system="mcdm",
                        config=cfg.to_dict(), ema=ema,
                        extra={"train": {"stage": 3}, "data": {"fps": 25.0,
                                                               "sample_rate": 16000}})
    return folder


def test_demo_cli_smoke(tiny_assets, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "mcdm", "--assets", str(tiny_assets), "--pairs", "2", "--frames", "8",
                 "--steps", "1", "--prior-steps", "1", "--window", "4", "--out", str(out),
                 "--no-progress"]) == 0
    doc = json.loads((out / "mcdm_demo.json").read_text())
    assert doc["identity_seeds"] == [1_000_000, 1_000_001]
    s = doc["summary"]
    assert set(s) == {"full", "no_archive", "no_mta", "full_minus_no_archive",
                      "full_minus_no_mta"}
    for arm in ("full", "no_archive", "no_mta"):
        assert len(s[arm]["ssim_curve"]) == 2 and s[arm]["ssim"]["n"] == 2
    # the rolling archive and the held reference differ once a clip has been generated
    full, held = doc["per_pair"]["full"][0], doc["per_pair"]["no_archive"][0]
    assert full["ssim_curve"][0] == held["ssim_curve"][0]
    assert full["ssim_curve"][1] != held["ssim_curve"][1]
    assert "| full |" in capsys.readouterr().out
    partial = json.loads((out / "mcdm_demo.partial.json").read_text())
    assert partial["pairs_done"] == 2 and partial["per_pair"] == doc["per_pair"]


def test_demo_cli_errors_name_the_option(tmp_path, capsys):
    assert main(["demo", "mcdm", "--assets", str(tmp_path), "--arms", "full,nope"]) == 2
    assert "--arms" in capsys.readouterr().err
    assert main(["demo", "mcdm", "--assets", str(tmp_path), "--frames", "8"]) == 2
    assert "s3_full.safetensors" in capsys.readouterr().err


def test_training_recipe_chains_stages_and_sweeps_only_stage_3(tmp_path):
    from samplers.cli import build_parser
    from samplers.demo import mcdm_train

    names = list(mcdm_train.RUNS)
    for name in names:                                       # --init must name existing files
        (tmp_path / f"{name}.safetensors").touch()
    for name in names:
        args = mcdm_train.train_args(name, tmp_path)
        parsed = build_parser(args).parse_args(args)         # every run is a valid command
        init, stage = mcdm_train.RUNS[name][:2]
        assert parsed.stage == stage
        assert parsed.init == (None if init is None else tmp_path / f"{init}.safetensors")
    assert mcdm_train.train_args("s3_no_mta", tmp_path)[-5:-2] == ["--no-memory", "--temporal",
                                                                   "softmax"]
    sweep = mcdm_train.sweep_runs(tmp_path / "s2.safetensors", tmp_path)
    for args in sweep.values():
        parsed = build_parser(args).parse_args(args)
        assert parsed.stage == 3 and parsed.init == tmp_path / "s2.safetensors"
