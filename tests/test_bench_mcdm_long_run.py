"""bench/mcdm_long_run.py: the 7200-frame check's harness, run on 8 frames (seconds)."""

import io
import json
import sys

import pytest

from bench import mcdm_long_run


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_short_run_records_rss_and_checks_the_mp4(tmp_path):
    out = tmp_path / "r.json"
    assert mcdm_long_run.main(["--frames", "8", "--steps", "1", "--prior-steps", "1",
                               "--interval", "0.2", "--work", str(tmp_path / "w"),
                               "--out", str(out), "--plot", str(tmp_path / "rss.png")]) == 0
    doc = json.loads(out.read_text())
    check = doc["output"]
    assert check["frames_decoded"] == 8 and check["frames_ok"] and check["audio_ok"]
    assert abs(check["audio_seconds"] - 8 / 25) < 0.05
    assert doc["rss_timeline"] and doc["peak_rss_mib"] >= max(
        s["rss_mib"] for s in doc["rss_timeline"]) > 0
    assert "--frames 8" in doc["command"] and doc["steps"] == doc["prior_steps"] == 1
    assert (tmp_path / "rss.png").stat().st_size > 0
    (tmp_path / "rss.png").unlink()
    assert mcdm_long_run.main(["--replot", "--out", str(out), "--work", str(tmp_path),
                               "--plot", str(tmp_path / "rss.png")]) == 0
    assert (tmp_path / "rss.png").stat().st_size > 0


def test_progress_reader_keeps_the_latest_clip_count_and_other_lines():
    text = b"loading\nclips:  10%|#  | 3/30 [00:01<00:09]\rclips:  13%|#  | 4/30 [00:01<00:08]\n"
    reader = mcdm_long_run.ProgressReader(io.BufferedReader(io.BytesIO(text)))
    reader.run()
    assert reader.clips == 4 and reader.other == ["loading"]


def test_rss_at_frames_takes_the_first_sample_past_each_mark():
    timeline = [{"frames": f, "rss_mib": r} for f, r in ((0, 1), (280, 2), (320, 3), (400, 4))]
    assert mcdm_long_run.rss_at_frames(timeline, [300, 500]) == {"300": timeline[2]}


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        mcdm_long_run.main(["--frames", "0", "--work", str(tmp_path), "--out",
                            str(tmp_path / "r.json")])
    with pytest.raises(SystemExit):
        mcdm_long_run.main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--work",
                            str(tmp_path), "--out", str(tmp_path / "r.json")])
