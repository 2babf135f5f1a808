"""Table 8 / Fig. 7 sweep (samplers/demo/mcdm_train.py --sweep, samplers/demo/mcdm_sweep.py):
the aggregation on known numbers, and train + evaluate end to end at a tiny size."""

from __future__ import annotations

import json
import shutil

import pytest

from samplers.demo import mcdm_sweep, mcdm_train
from samplers.demo.mcdm_sweep import SweepEvalOptions, run_name, summarize


def _row(value: float) -> dict:
    return {k: value for k in mcdm_sweep.METRICS} | {c: [value, value]
                                                      for c in mcdm_sweep.CURVES}


def test_summary_averages_seeds_per_identity_and_pairs_differences_on_identity():
    options = SweepEvalOptions(pairs=2, seeds=(3, 4, 5), settings=("a2", "no_mta"))
    # metric = setting offset + seed + 10 * identity; seed 5 lacks a2, so it is left out
    offset = {"a2": 1.0, "no_mta": 0.0}
    runs = {run_name(s, d): {"per_pair": [_row(offset[s] + d + 10 * i) for i in range(2)]}
            for s in offset for d in (3, 4)}
    runs[run_name("no_mta", 5)] = {"per_pair": [_row(100.0), _row(100.0)]}
    summary = summarize({"runs": runs}, options)
    assert summary["complete_seeds"] == [3, 4]
    ssim = summary["settings"]["a2"]["ssim"]
    # per identity, mean over seeds 3 and 4: 1 + 3.5 + 0 = 4.5 and 14.5
    assert ssim["mean"] == pytest.approx(9.5) and ssim["n"] == 2
    assert summary["settings"]["a2"]["per_seed"]["4"]["ssim"] == pytest.approx(1 + 4 + 5)
    diff = summary["differences"]["a2_minus_no_mta"]["seam_ratio"]
    assert diff["mean"] == pytest.approx(1.0) and diff["low"] == pytest.approx(1.0)
    assert summarize({"runs": {}}, options)["complete_seeds"] == []


def test_sweep_recipe_trains_the_default_once_and_the_baseline_per_seed(tmp_path):
    from samplers.cli import build_parser

    (tmp_path / "s2.safetensors").touch()                 # --init must name an existing file
    sweep = mcdm_train.sweep_runs(tmp_path / "s2.safetensors", tmp_path)
    per_seed = len(mcdm_train.SWEEP_ARCHIVED) + len(mcdm_train.SWEEP_ALPHA) - 1
    assert len(sweep) == 3 * per_seed + 2
    assert "alpha0.1_seed4" not in sweep and "no_mta_seed3" not in sweep
    assert list(sweep)[:per_seed] == [n for n in sweep if n.endswith("_seed3")]
    parsed = build_parser(sweep["no_mta_seed5"]).parse_args(sweep["no_mta_seed5"])
    assert parsed.seed == 5 and parsed.temporal == "softmax"
    assert mcdm_train.sweep_checkpoint("alpha0.1", 4, tmp_path).name == "a4_seed4.safetensors"
    assert mcdm_train.sweep_checkpoint("no_mta", 3, tmp_path).name == "s3_no_mta.safetensors"
    for setting in mcdm_sweep.SETTINGS:                  # every evaluated setting is trained
        for seed in mcdm_train.SWEEP_SEEDS:
            path = mcdm_train.sweep_checkpoint(setting, seed, tmp_path)
            assert path.stem in sweep or path.parent == mcdm_train.ASSETS


def test_options_validate():
    with pytest.raises(ValueError, match="settings must be"):
        SweepEvalOptions(settings=("a2",))
    with pytest.raises(ValueError, match="frames must be >= 8"):
        SweepEvalOptions(frames=4)


def test_sweep_trains_evaluates_resumes_and_checks_settings(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    assert mcdm_train.main(["--sweep", "--out", str(sweep_dir), "--steps", "2",
                            "--only", "a2_seed4,no_mta_seed4"]) == 0
    record = json.loads((sweep_dir / "sweep_record.json").read_text())
    assert len(record["a2_seed4"]["loss"]) == 2
    out = tmp_path / "table8.json"
    args = ["--sweep-dir", str(sweep_dir), "--out", str(out), "--pairs", "1", "--frames", "8",
            "--steps", "1", "--prior-steps", "1", "--window", "4", "--seeds", "4",
            "--settings", "a2,no_mta", "--plot", str(tmp_path / "fig.png")]
    assert mcdm_sweep.main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["complete_seeds"] == [4] and doc["device"] == "cpu"
    assert set(doc["runs"]) == {"a2_seed4", "no_mta_seed4"}
    assert doc["summary"]["settings"]["a2"]["ssim"]["n"] == 1
    assert len(doc["summary"]["settings"]["a2"]["ssim_curve"]) == 2
    assert "a2_minus_no_mta" in doc["summary"]["differences"]
    assert (tmp_path / "fig.png").stat().st_size > 1000
    assert "| a = 2 (alpha = 0.1) |" in capsys.readouterr().out
    # a rerun evaluates nothing again; other options refuse to mix into the same file
    assert mcdm_sweep.main(args) == 0
    assert "evaluated)" not in capsys.readouterr().out
    assert json.loads(out.read_text())["runs"] == doc["runs"]
    with pytest.raises(ValueError, match="other options"):
        mcdm_sweep.main([*args[:-2], "--frames", "9"])
    # a checkpoint whose config is not its setting's is refused
    shutil.copy(sweep_dir / "a2_seed4.safetensors", sweep_dir / "a8_seed4.safetensors")
    with pytest.raises(ValueError, match="not setting 'a8'"):
        mcdm_sweep.main([*args[:-4], "--settings", "a8,no_mta", "--out",
                         str(tmp_path / "other.json")])
