"""The benchmark wiring runs end to end on tiny shapes (numbers on a CPU prove nothing and are not
written anywhere; this only keeps the harness and bench scripts working)."""

from __future__ import annotations

import json

import pytest

from bench import bench_adaln, harness


def test_smoke_run_covers_every_provider(tmp_path):
    rows = harness.main(bench_adaln.OP, bench_adaln.WORKLOADS[:1], bench_adaln.providers,
                        ["--smoke", "--dtype", "fp32", "--mode", "fwd", "--mode", "bwd",
                         "--out", str(tmp_path)])
    providers = {r["provider"] for r in rows}
    assert {"ref", "torch_eager", "torch_compile"} <= providers
    assert all("ms_p50" in r for r in rows), [r for r in rows if "ms_p50" not in r]
    doc = json.loads((tmp_path / "adaln_modulate.json").read_text())
    assert doc["smoke"] is True and doc["device"] == "cpu"
    for key in ("torch", "triton", "commit", "date", "rows"):
        assert key in doc
    assert all(r["tflops"] is None and r["gbps"] is None for r in doc["rows"])


def test_refuses_real_run_without_gpu():
    if harness.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        harness.main(bench_adaln.OP, bench_adaln.WORKLOADS[:1], bench_adaln.providers, [])
