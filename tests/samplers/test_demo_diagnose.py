"""`python -m samplers.demo.diagnose`: the denoiser diagnostics behind docs/demo.md's
"Why the fidelity target is missed"."""
from __future__ import annotations

import json
import math

import pytest
import torch

from samplers.demo.diagnose import diagnose, format_table, main
from samplers.demo.metrics import masked_psnr


@pytest.fixture(autouse=True)
def _one_thread_reference_kernels():
    import kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with kernels.backend("ref"):
        yield
    torch.set_num_threads(threads)


def test_masked_psnr_reads_only_the_masked_pixels():
    truth = torch.zeros(2, 3, 4, 4)
    video = truth.clone()
    video[..., :2] = 0.1                       # inside the mask: MSE 0.01 -> 20 dB
    video[..., 2:] = 0.9                       # outside: ignored
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    assert masked_psnr(video, truth, mask) == pytest.approx(20.0, abs=1e-4)
    assert masked_psnr(video, truth, torch.ones_like(mask)) < 20.0


def test_diagnose_bundled_checkpoint_small(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["--pairs", "2", "--ddim-steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "G gap" in capsys.readouterr().out
    assert set(result["x0_psnr_db"]) == {"50", "150", "300", "500", "700", "900", "999"}
    assert len(result["eps_mse_by_channel_group"]["500"]) == 6        # 48 channels / 8
    # the codec alone reconstructs the ideal frames far better than any denoised estimate
    assert result["codec_psnr_db"] > 20.0
    for row in result["x0_psnr_db"].values():
        assert all(math.isfinite(v) for v in row.values())
        # G enters the model: another identity's G changes the prediction
        assert row["true"] != row["other_G"]
    # at low noise the one-step estimate is close to the clean latent, at t = 999 it is not
    assert result["x0_psnr_db"]["50"]["true"] > result["x0_psnr_db"]["999"]["true"] + 5
    assert "full DDIM" in format_table(result)


def test_sample_spread_readout():
    result = diagnose(pairs=2, timesteps=(999,), ddim_steps=2, progress=False, samples=3)
    r = result["samples"]
    assert r["count"] == 3 and len(r["per_pair"]["single"]) == 2
    for singles, of_mean in zip(r["per_pair"]["single"], r["per_pair"]["mean_of_samples"]):
        assert len(singles) == 3 and len(set(singles)) == 3        # different noise seeds
        # squared error is convex: the mean of the samples is no further from the truth than
        # their average distance, so never below the worst single sample
        assert of_mean >= min(singles)
    assert math.isfinite(r["between_samples_psnr_db"])
    assert "3 samples per pair" in format_table(result)
    assert "samples" not in diagnose(pairs=2, timesteps=(999,), ddim_steps=2, progress=False)


def test_diagnose_arguments_are_checked():
    with pytest.raises(ValueError, match="pairs"):
        diagnose(pairs=1)
    with pytest.raises(ValueError, match="timesteps"):
        diagnose(pairs=2, timesteps=(1000,))
    with pytest.raises(ValueError, match="samples"):
        diagnose(pairs=2, samples=0)


def test_pilot_continues_training_before_the_diagnostic():
    base = diagnose(pairs=2, timesteps=(500,), ddim_steps=1, progress=False)
    pilot = diagnose(pairs=2, timesteps=(500,), ddim_steps=1, progress=False,
                     continue_steps=2, mapping_lr_scale=1.0)
    assert base["pilot"] is None
    assert pilot["pilot"]["continue_steps"] == 2 and pilot["pilot"]["mapping_lr_scale"] == 1.0
    assert pilot["x0_psnr_db"]["500"]["true"] != base["x0_psnr_db"]["500"]["true"]
    with pytest.raises(ValueError, match="steps"):
        diagnose(pairs=2, timesteps=(500,), continue_steps=-1)
