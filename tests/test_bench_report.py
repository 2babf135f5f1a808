"""docs/PERFORMANCE.md is generated from result files: the generator on a fixture, the import of a
gpu-evidence folder, and the committed document matching the committed results."""

from __future__ import annotations

import json
import tarfile

import pytest

from bench import harness, report


def _row(provider: str, ms: float, **extra) -> dict:
    return {"workload": "sdit_xl2_b8_t4", "shape": {"N": 1024}, "dtype": "bf16", "mode": "fwd",
            "provider": provider, "ms_p50": ms, "ms_p20": ms * 0.95, "ms_p80": ms * 1.05,
            "tflops": 2.0 / ms, "gbps": None, "pct_of_peak": 25.0 / ms,
            "pct_of_datasheet_peak": 20.0 / ms, "peak_mem_mib": 100.0, "timing": "do_bench",
            **extra}


def _doc(device: str, slug: str, rows: list[dict], smoke: bool = False) -> dict:
    return {"device": device, "device_slug": slug, "torch": "2.11.0", "triton": "3.6.0",
            "cuda": "13.0", "commit": "abc1234", "date": "2026-11-29T00:00:00+00:00",
            "peaks": {} if smoke else {"copy_gbps": 4100.0, "bf16_matmul_tflops": 780.0},
            "datasheet": harness.datasheet_peaks(device), "smoke": smoke, "rows": rows}


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    gpu_rows = [_row("triton", 0.5), _row("sdpa_flash", 1.0), _row("ref", 4.0),
                {**{k: v for k, v in _row("sdpa_cudnn", 1).items() if k in harness.ROW_KEYS},
                 "error": "RuntimeError: no kernel"},
                {**{k: v for k, v in _row("xformers", 1).items() if k in harness.ROW_KEYS},
                 "skipped": "not importable"}]
    (root / "nvidia-h200").mkdir(parents=True)
    (root / "nvidia-h200" / "attention3d.json").write_text(
        json.dumps(_doc("NVIDIA H200", "nvidia-h200", gpu_rows)))
    (root / "cpu-x86-64").mkdir()
    (root / "cpu-x86-64" / "attention3d.json").write_text(json.dumps(
        _doc("cpu", "cpu-x86-64", [_row("ref", 98765.0)], smoke=True)))
    static = tmp_path / "static"
    static.mkdir()
    (static / "sm_90.md").write_text("| kernel | regs |\n|---|---|\n| _attn_fwd | 168 |\n")
    return root, static, tmp_path / "docs" / "PERFORMANCE.md"


def test_generator_renders_gpu_rows_speedups_static_table_and_plots(results):
    root, static, doc_path = results
    path = report.regenerate(root, static, doc_path)
    text = path.read_text()
    assert "## NVIDIA H200 (`nvidia-h200`)" in text and "H200 SXM" in text
    assert "commit `abc1234`".lower() in text.lower() and "2026-11-29" in text
    lines = {line.split("|")[4].strip(): line for line in text.splitlines()
             if line.startswith("| sdit_xl2_b8_t4 |")}
    assert set(lines) == {"**triton**", "sdpa_flash", "ref", "sdpa_cudnn", "xformers"}
    assert lines["sdpa_flash"].rstrip().endswith("| 2.00x |")   # 1.0 ms vs ours' 0.5 ms
    assert lines["ref"].rstrip().endswith("| 8.00x |")
    assert "| 50.0 |" in lines["**triton**"] and "| 40.0 |" in lines["**triton**"]
    assert "error: RuntimeError: no kernel" in lines["sdpa_cudnn"]
    assert "skipped: not importable" in lines["xformers"]
    # CPU results are named, never tabled; the static profile sits beside the tables
    assert "98765" not in text and "cpu-x86-64" not in text
    assert "| _attn_fwd | 168 |" in text
    png = root / "nvidia-h200" / "attention3d.png"
    assert png.exists() and png.stat().st_size > 1000
    assert "](../results/nvidia-h200/attention3d.png)" in text


def test_generator_says_no_claim_stands_without_gpu_results(tmp_path):
    (tmp_path / "cpu-x86-64").mkdir()
    (tmp_path / "cpu-x86-64" / "warp.json").write_text(json.dumps(
        _doc("cpu", "cpu-x86-64", [_row("ref", 1.0)], smoke=True)))
    text = report.render(tmp_path, tmp_path / "no-static", tmp_path / "PERFORMANCE.md")
    assert "No GPU results have been committed yet" in text
    assert "No static profile" in text


def test_generator_rejects_a_malformed_result_file(tmp_path):
    (tmp_path / "nvidia-h200").mkdir()
    (tmp_path / "nvidia-h200" / "x.json").write_text(json.dumps({"device": "NVIDIA H200"}))
    with pytest.raises(ValueError, match="x.json: result document is missing keys"):
        report.render(tmp_path, tmp_path, tmp_path / "PERFORMANCE.md")


def test_check_flags_a_hand_edited_document(results):
    root, static, doc_path = results
    report.regenerate(root, static, doc_path, plots=False)
    argv = ["--results", str(root), "--static", str(static), "--out", str(doc_path), "--check"]
    assert report.main(argv) == 0
    doc_path.write_text(doc_path.read_text() + "\nfaster than anything\n")
    assert report.main(argv) == 1


def _evidence_folder(tmp_path, slug: str):
    folder = tmp_path / "evidence"
    staging = tmp_path / "staging" / "results" / slug
    staging.mkdir(parents=True)
    device = "NVIDIA H200" if not slug.startswith("cpu-") else "cpu"
    (staging / "warp_occlusion.json").write_text(json.dumps(
        _doc(device, slug, [_row("triton", 0.1)], smoke=slug.startswith("cpu-"))))
    folder.mkdir()
    with tarfile.open(folder / "results.tar.gz", "w:gz") as tar:
        tar.add(staging.parent, arcname="results")
    (folder / "summary.json").write_text(json.dumps({"ok": True, "dry_run": False}))
    (folder / "sanitizer.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    return folder


def test_import_evidence_files_results_and_logs(tmp_path):
    folder = _evidence_folder(tmp_path, "nvidia-h200")
    root = tmp_path / "results"
    copied = report.import_evidence(folder, root)
    assert (root / "nvidia-h200" / "warp_occlusion.json") in copied
    assert (root / "nvidia-h200" / "evidence" / "sanitizer.log").exists()
    text = report.render(root, tmp_path / "static", tmp_path / "docs" / "PERFORMANCE.md")
    assert "### warp_occlusion" in text and "evidence/sanitizer.log" in text


def test_import_evidence_refuses_a_dry_run(tmp_path):
    folder = _evidence_folder(tmp_path, "cpu-x86-64")
    with pytest.raises(ValueError, match="CPU \\(dry-run\\) results are not evidence"):
        report.import_evidence(folder, tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_committed_performance_doc_matches_committed_results():
    expected = report.render()
    assert report.DOC.exists(), "docs/PERFORMANCE.md is missing: run `python -m bench.report`"
    assert report.DOC.read_text() == expected, "docs/PERFORMANCE.md is stale or hand-edited: " \
                                               "run `python -m bench.report`"
