"""bench.mcdm_fig5: the demo's per-window curves read at the windows fixed before the run."""

import json

import pytest

from bench import mcdm_fig5


def _pair(ssim, identity, scalar):
    return {"ssim_curve": ssim, "identity_curve": identity,
            "identity_curve_ideal": [0.0] * len(ssim), "ssim": scalar,
            "identity_distance": scalar, "lip_sync": scalar, "mouth_corr": scalar,
            "seam_ratio": scalar}


def _per_pair():
    # 3 identities, 4 windows of 16 frames; no_archive = full + (pair index + 1) * 0.1 on SSIM
    full = [_pair([0.1 * w + i for w in range(4)], [1.0 + w for w in range(4)], float(i))
            for i in range(3)]
    held = [_pair([0.1 * w + i + 0.1 * (i + 1) for w in range(4)], [1.0] * 4, float(i))
            for i in range(3)]
    return {"full": full, "no_archive": held}


def test_at_windows_reads_the_chosen_windows_and_pairs_the_differences():
    out = mcdm_fig5.at_windows(_per_pair(), 16, starts=(0, 48))
    assert set(out) == {"0", "48"}
    w3 = out["48"]
    assert w3["full"]["ssim"]["mean"] == pytest.approx(0.3 + 1.0)          # mean of 0.3 + i
    assert w3["full"]["identity_distance"]["mean"] == pytest.approx(4.0)
    diff = w3["full_minus_no_archive"]
    assert diff["ssim"]["mean"] == pytest.approx(-0.2)                      # -(i + 1) * 0.1
    assert diff["ssim"]["low"] < -0.2 < diff["ssim"]["high"] and diff["ssim"]["n"] == 3
    assert diff["identity_distance"]["mean"] == pytest.approx(3.0)
    assert out["0"]["full_minus_no_archive"]["identity_distance"]["mean"] == pytest.approx(0.0)


@pytest.mark.parametrize("starts", [(8,), (64,), (-16,)])
def test_at_windows_rejects_starts_off_the_window_grid(starts):
    with pytest.raises(ValueError, match="starts: expected multiples of window=16"):
        mcdm_fig5.at_windows(_per_pair(), 16, starts=starts)


def test_rounded_keeps_significant_digits_and_structure():
    assert mcdm_fig5.rounded({"a": [0.123456789, 12345.678], "n": 3}, 3) == {
        "a": [0.123, 12300.0], "n": 3}


def test_cli_on_a_partial_demo_file_writes_the_windows_and_a_plot(tmp_path):
    partial = tmp_path / "mcdm_demo.partial.json"
    partial.write_text(json.dumps({"pairs_done": 3, "elapsed_seconds": 1.0,
                                   "per_pair": _per_pair()}))
    out, png = tmp_path / "r.json", tmp_path / "f.png"
    assert mcdm_fig5.main([str(partial), "--out", str(out), "--plot", str(png),
                           "--note", "a note", "--starts", "0,48"]) == 0
    doc = json.loads(out.read_text())
    assert doc["partial"] and doc["pairs_done"] == 3 and doc["notes"] == ["a note"]
    assert doc["window_starts"] == [0, 16, 32, 48]
    assert doc["fig5_windows"]["48"]["full_minus_no_archive"]["ssim"]["mean"] == pytest.approx(
        -0.2)
    assert doc["summary"]["full_minus_no_archive"]["ssim_curve"][3]["mean"] == pytest.approx(
        -0.2)
    assert png.stat().st_size > 1000
