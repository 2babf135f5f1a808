"""`avatar-kernels demo lookahead` on tiny random checkpoints made here (smoke test), and the
demo's parameter readout."""

from __future__ import annotations

import json

import torch

from avatar_models.checkpoint import save_checkpoint
from avatar_models.data import procedural_faces as pf
from avatar_models.lookahead import LookaheadConfig, LookaheadDiT
from samplers.cli import main
from samplers.demo import lookahead_demo as LD


def _checkpoint(path, stage: str, seed: int):
    torch.manual_seed(seed)
    cfg = LookaheadConfig.from_name("tiny", input_height=16, input_width=16, patch=4, frames=8,
                                    hidden=32, depth=1, heads=2)
    model = LookaheadDiT(cfg)
    with torch.no_grad():      # adaLN-Zero starts at a zero output: make the arms differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(path, model, system="lookahead", config=cfg.to_dict(), ema=None,
                    extra={"train": {"stage": stage, "anchor": "uniform", "d_max": 8,
                                     "distance": 4, "starting_frames": 2},
                           "data": {"kind": "toy", "fps": 25.0, "sample_rate": 16000,
                                    "audio": "energy"}})
    return path


def test_demo_smoke(tmp_path):
    paths = {name: _checkpoint(tmp_path / f"{name}.safetensors", stage, i)
             for i, (name, stage) in enumerate((("lookahead", "lookahead"),
                                                ("baseline", "base"), ("base", "base")))}
    out = tmp_path / "out"
    assert main(["demo", "lookahead", "--lookahead", str(paths["lookahead"]), "--baseline",
                 str(paths["baseline"]), "--base", str(paths["base"]), "--identities", "2",
                 "--segments", "4", "--sweep-segments", "3", "--distances", "4,12",
                 "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    for name in ("drift.png", "sweep.png", "pilot.png"):
        assert (out / name).stat().st_size > 1000
    assert set(result["checks"]) == set("abcd")
    assert all(isinstance(result["checks"][k]["passed"], bool) for k in "abcd")
    assert set(result["sweep"]) == {"4", "12", "baseline"}
    assert result["setup"]["frames_drift"] == 8 + 3 * 6
    assert result["setup"]["frames_sweep"] == 8 + 2 * 6
    look = result["per_identity"]["lookahead"]
    assert len(look) == 2 and len(look[0]["consistency"]["to_reference"]) == 2  # 26 frames / 25
    assert result["arms"]["lookahead"]["drift"]["n"] == 2
    assert result["comparison"]["lip_sync_lookahead_minus_baseline"]["mean"] != 0.0
    # held-out identities and the pilot's distances
    base = pf.HELD_OUT_SEED_BASE
    assert f"seeds {base}...{base + 1}," in result["about"]["identities"]
    assert set(result["pilot"]["base"]) == {str(k) for k in LD.PILOT_DISTANCES}


def test_demo_missing_checkpoint(tmp_path, capsys):
    assert main(["demo", "lookahead", "--lookahead", str(tmp_path / "none.safetensors"),
                 "--out", str(tmp_path)]) == 2
    assert "--lookahead" in capsys.readouterr().err


def test_param_readout_reads_the_generator():
    clip = LD.make_clip(0, 40, 16, 4, 25.0, 16000)
    readout = LD.ParamReadout(clip.ident, 16)
    params = readout(clip.ideal)
    mouth = params[:, LD.MOUTH]
    truth = clip.params[:, LD.MOUTH]
    assert torch.corrcoef(torch.stack([mouth, truth]))[0, 1] > 0.9
    assert (params[:, :3] - clip.params[:, :3]).abs().mean() < 0.05   # head pose
    assert clip.background.sum() >= 8


def test_shipped_assets_follow_the_recipe():
    """assets/lookahead holds the three models of `make train-lookahead` (docs/lookahead.md)."""
    from avatar_models.checkpoint import load_checkpoint

    ckpts = {name: load_checkpoint(LD.ASSETS / f"{name}.safetensors", system="lookahead")
             for name in ("base", "lookahead", "baseline")}
    for name, ckpt in ckpts.items():
        cfg = LookaheadConfig.from_dict(ckpt.config)
        assert (cfg.input_height, cfg.patch, cfg.frames, cfg.hidden, cfg.depth) == \
            (16, 4, 8, 96, 4), name
        assert ckpt.extra["train"]["d_max"] == 24 and ckpt.extra["train"]["starting_frames"] == 2
        assert not ckpt.model and all(v.dtype == torch.float16 for v in ckpt.ema.values()
                                      if v.is_floating_point())
    assert ckpts["base"].extra["step"] == 600 and ckpts["base"].extra["init"] is None
    for name, stage in (("lookahead", "lookahead"), ("baseline", "base")):
        extra = ckpts[name].extra
        assert extra["train"]["stage"] == stage and extra["step"] == 300
        assert extra["init"].endswith("base.safetensors")
