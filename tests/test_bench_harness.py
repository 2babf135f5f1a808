"""The benchmark harness: result schema, roofline arithmetic, datasheet lookup, the reduced CPU
sweep, and the rule that CPU timings never land where GPU results belong. (CPU timings prove
nothing about GPU kernels; these tests only keep the wiring honest.)"""

from __future__ import annotations

import json

import pytest
import torch

from bench import __main__ as bench_cli
from bench import bench_adaln, harness


def _gpu_doc(rows=None) -> dict:
    row = {"workload": "w", "shape": {"N": 4}, "dtype": "bf16", "mode": "fwd",
           "provider": "triton", "ms_p50": 1.0, "ms_p20": 0.9, "ms_p80": 1.1, "tflops": None,
           "gbps": 2000.0, "pct_of_peak": 50.0, "pct_of_datasheet_peak": 41.7,
           "peak_mem_mib": 12.0, "timing": "do_bench"}
    return {"device": "NVIDIA H200", "device_slug": "nvidia-h200", "torch": "2.11.0",
            "triton": "3.6.0", "cuda": "13.0", "commit": "abc1234", "date": "2026-11-29T00:00:00",
            "peaks": {"copy_gbps": 4000.0, "bf16_matmul_tflops": 780.0},
            "datasheet": harness.datasheet_peaks("NVIDIA H200"), "smoke": False,
            "rows": [row] if rows is None else rows}


def test_smoke_run_covers_every_provider_and_writes_a_cpu_slug(tmp_path):
    options = harness.RunOptions(smoke=True, modes=("fwd", "bwd"), dtypes=("fp32",))
    rows, path = harness.run_op(bench_adaln.OP, bench_adaln.WORKLOADS[:1], bench_adaln.providers,
                                options=options, results_root=tmp_path, device="cpu")
    assert path.parent.name.startswith("cpu-") and path.parent.parent == tmp_path
    by_provider = {r["provider"]: r for r in rows}
    assert {"ref", "torch_eager", "torch_compile"} <= set(by_provider)
    assert "ms_p50" in by_provider["ref"] and "ms_p50" in by_provider["torch_eager"]
    assert "GPU runs only" in by_provider["torch_compile"]["skipped"]
    doc = json.loads(path.read_text())
    harness.validate_result(doc)
    assert doc["smoke"] is True and doc["device"] == "cpu" and doc["datasheet"] == {}
    timed = [r for r in doc["rows"] if "ms_p50" in r]
    # smoke shapes are not the workload's: no throughput, no percentage, no peak memory on a CPU
    assert all(r["tflops"] is None and r["gbps"] is None and r["pct_of_peak"] is None
               and r["peak_mem_mib"] is None for r in timed)


def test_cpu_timings_are_refused_outside_a_cpu_folder(tmp_path):
    cpu_doc = {**_gpu_doc(), "device": "cpu", "device_slug": "cpu-x86-64", "smoke": True}
    with pytest.raises(ValueError, match="refusing to write CPU/smoke timings"):
        harness.write_results(cpu_doc, tmp_path / "nvidia-h200", "adaln_modulate")
    # a smoke run is refused too, whatever device it names
    with pytest.raises(ValueError, match="GPU results belong there"):
        harness.write_results({**_gpu_doc(), "smoke": True}, tmp_path / "nvidia-h200", "x")
    with pytest.raises(ValueError, match="GPU timings of 'x' to the CPU folder"):
        harness.write_results(_gpu_doc(), tmp_path / "cpu-x86-64", "x")
    assert not (tmp_path / "nvidia-h200").exists()
    written = harness.write_results(cpu_doc, tmp_path / "cpu-x86-64", "adaln_modulate")
    assert json.loads(written.read_text())["rows"][0]["provider"] == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cli_on_cpu_writes_only_under_a_cpu_slug(tmp_path, capsys):
    assert bench_cli.main(["--op", "models", "--op", "adaln", "--mode", "fwd", "--out",
                           str(tmp_path), "--no-plots"]) == 0
    folders = [p.name for p in tmp_path.iterdir()]
    assert len(folders) == 1 and folders[0].startswith("cpu-"), folders
    assert sorted(p.name for p in (tmp_path / folders[0]).iterdir()) == [
        "adaln_modulate.json", "models.json"]
    models = json.loads((tmp_path / folders[0] / "models.json").read_text())
    providers = {r["provider"] for r in models["rows"] if "ms_p50" in r}
    assert {"fused_packed", "reference_sdpa_math"} <= providers
    assert "claims need GPU numbers" in capsys.readouterr().out


def test_schema_rejects_malformed_documents():
    harness.validate_result(_gpu_doc())
    doc = _gpu_doc()
    del doc["commit"]
    with pytest.raises(ValueError, match="missing keys \\['commit'\\]"):
        harness.validate_result(doc)
    both = {**_gpu_doc()["rows"][0], "skipped": "why"}
    with pytest.raises(ValueError, match="exactly one of"):
        harness.validate_result(_gpu_doc([both]))
    unordered = {**_gpu_doc()["rows"][0], "ms_p20": 1.5}
    with pytest.raises(ValueError, match="ms_p20 <= ms_p50 <= ms_p80"):
        harness.validate_result(_gpu_doc([unordered]))
    no_pct = {k: v for k, v in _gpu_doc()["rows"][0].items() if k != "pct_of_datasheet_peak"}
    with pytest.raises(ValueError, match="pct_of_datasheet_peak"):
        harness.validate_result(_gpu_doc([no_pct]))
    with pytest.raises(ValueError, match="mode must be one of"):
        harness.validate_result(_gpu_doc([{**_gpu_doc()["rows"][0], "mode": "both"}]))


def test_roofline_percentage_takes_the_binding_ceiling():
    # 1 TFLOP at 1000 TFLOP/s = 1 ms; 1 GB at 2000 GB/s = 0.5 ms: compute bound, 2 ms measured
    assert harness.roofline_pct(1e12, 1e9, 2.0, 1000.0, 2000.0) == 50.0
    # memory bound: 4 GB at 2000 GB/s = 2 ms, measured 2.5 ms
    assert harness.roofline_pct(1e12, 4e9, 2.5, 1000.0, 2000.0) == 80.0
    assert harness.roofline_pct(0.0, 4e9, 2.5, None, 2000.0) == 80.0
    assert harness.roofline_pct(1e12, 0.0, 2.0, None, None) is None


def test_fp32_rows_are_held_against_bandwidth_only():
    # 1 TFLOP (1 ms at the GEMM rate) and 0.5 GB (0.5 ms at the copy rate), measured 2 ms
    wl = harness.Workload("w", {}, lambda *a: {}, flops=lambda m: 1e12, bytes=lambda m: 5e8)
    peaks = {"copy_gbps": 1000.0, "bf16_matmul_tflops": 1000.0}
    bf16 = harness._throughput_fields(wl, "fwd", "bf16", 2.0, False, peaks, {})
    fp32 = harness._throughput_fields(wl, "fwd", "fp32", 2.0, False, peaks, {})
    assert bf16["pct_of_peak"] == 50.0 and fp32["pct_of_peak"] == 25.0
    assert bf16["tflops"] == pytest.approx(500.0) and bf16["gbps"] == pytest.approx(250.0)
    smoke = harness._throughput_fields(wl, "fwd", "bf16", 2.0, True, peaks, {})
    assert smoke["tflops"] is None and smoke["pct_of_peak"] is None


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"), ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
])
def test_datasheet_lookup(name, expected):
    spec = harness.datasheet_peaks(name)
    assert spec["name"] == expected and spec["bf16_tflops"] > 300 and spec["hbm_gbps"] > 1500


def test_datasheet_lookup_unknown_device_is_empty():
    assert harness.datasheet_peaks("NVIDIA GeForce RTX 4090") == {}


def test_time_budget_turns_remaining_rows_into_skips():
    options = harness.RunOptions(smoke=True, modes=("fwd",), dtypes=("fp32",), budget_s=-1.0)
    rows = harness.run(bench_adaln.OP, bench_adaln.WORKLOADS[:1],
                       bench_adaln.providers("cpu"), device="cpu", options=options, peaks={})
    assert rows and all("time budget" in r["skipped"] or "GPU runs only" in r["skipped"]
                        for r in rows)


def test_every_quick_workload_exists():
    import importlib

    for module_name in bench_cli.BENCHES.values():
        module = importlib.import_module(module_name)
        names = {w.name for w in module.WORKLOADS}
        assert module.QUICK and set(module.QUICK) <= names, module_name
