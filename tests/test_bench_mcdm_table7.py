"""MCDM Table 7 script (bench/mcdm_table7.py) at tiny lengths: runs in seconds on a CPU."""

import json

import pytest
import torch

from bench import mcdm_table7


def test_arms_differ_only_in_the_temporal_attention():
    performer, softmax = mcdm_table7.build_arms("tiny", "cpu")
    assert performer.config.temporal == "performer" and softmax.config.temporal == "softmax"
    a, b = performer.config.to_dict(), softmax.config.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"temporal"}
    sa, sb = performer.state_dict(), softmax.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_smoke_run_writes_both_arms_share_and_crossover(tmp_path):
    out = tmp_path / "t7.json"
    assert mcdm_table7.main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["label"].startswith("CPU run")
    assert doc["temporal_sequence_length"] == 2 * doc["clip_frames"]
    for arm in ("performer", "softmax"):
        rows = doc["end_to_end"][arm]
        assert [r["frames"] for r in rows] == [4, 8]
        for r in rows:
            assert r["temporal_calls"] > 0 and 0 < r["temporal_share"] < 1
    shapes = mcdm_table7.temporal_shapes("tiny")
    assert len(doc["kernel"]) == len(shapes)
    for k in doc["kernel"]:
        assert [r["T"] for r in k["rows"]] == [8, 16, 32, 64]
        assert k["backends"] == {"performer": "ref", "softmax": "ref"}
        assert k["crossover_T"] in (None, 8, 16, 32, 64)
    assert len(doc["summary"]["performer_over_softmax_end_to_end"]) == 2


def test_crossover_is_the_first_length_from_which_performer_stays_faster(monkeypatch):
    # fake timings: performer 10 ms everywhere, softmax T/4 ms: faster from T = 64 on, but a
    # spurious win at T = 8 must not count
    calls = iter([10, 11, 10, 4, 10, 8, 10, 16, 10, 32])
    monkeypatch.setattr(mcdm_table7, "_kernel_ms", lambda fn, device: next(calls))
    shape = {"level": 0, "batch": 4, "heads": 2, "head_dim": 16, "features": 8}
    res = mcdm_table7.crossover(shape, [8, 16, 32, 64, 128], "cpu", torch.float32)
    assert res["crossover_T"] == 64


def test_paper_seconds_per_frame_falls_with_length():
    # the puzzle the docs report: the paper's MCDM time per frame is not constant
    doc = {"end_to_end": {"performer": [], "softmax": []}, "temporal_sequence_length": 8,
           "kernel": [], "paper_table7_minutes": {
               "frames": [30, 300, 1800, 3600, 7200],
               "vanilla": [0.97, 8.6, 54.1, 122.5, 264.6],
               "mcdm": [0.75, 5.7, 27.3, 46.9, 74.5]}}
    per_frame = mcdm_table7.summarize(doc)["paper_seconds_per_frame"]["mcdm"]
    assert per_frame == sorted(per_frame, reverse=True)


def test_bad_frames_option_is_rejected():
    with pytest.raises(SystemExit):
        mcdm_table7.main(["--frames", "0,4"])


def test_kernel_only_skips_the_end_to_end_rows(tmp_path):
    out = tmp_path / "k.json"
    assert mcdm_table7.main(["--kernel-only", "--lengths", "8,16", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["end_to_end"] == {"performer": [], "softmax": []}
    assert [r["T"] for r in doc["kernel"][0]["rows"]] == [8, 16]
    assert doc["kernel_lengths"] == [8, 16] and "B' / sequences_timed" in doc["kernel_reduction"]


def test_a_small_budget_times_a_subset_of_sequences_and_scales_it():
    shape = {"level": 0, "batch": 64, "heads": 2, "head_dim": 8, "features": 8}
    res = mcdm_table7.crossover(shape, [8, 32], "cpu", torch.float32, score_budget=2048)
    # budget // (H T max(T, M)): 2048 // (2 * 8 * 8) = 16 of 64 sequences at T = 8, 1 at T = 32
    assert [(r["sequences_timed"], r["scale"]) for r in res["rows"]] == [(16, 4.0), (1, 64.0)]


def test_paper_shapes_are_sd15_levels():
    shapes = mcdm_table7.temporal_shapes("paper")
    assert [(s["batch"], s["heads"], s["head_dim"]) for s in shapes] == [
        (4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)]
    assert {s["features"] for s in shapes} == {148}
