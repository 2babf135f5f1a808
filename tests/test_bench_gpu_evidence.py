"""The `make gpu-evidence` dry run (GPU_EVIDENCE_DRY_RUN=1) at its smallest: the test subset of
one file, the model rows' reduced sweep and one op's sanitizer launch (in Triton's interpreter),
with every file landing where a GPU run puts it. (The build step is `make build-cuda`, which CI
runs on its own where nvcc exists; `GPU_EVIDENCE_DRY_RUN=1 make gpu-evidence` runs it all.)"""

from __future__ import annotations

import json
import sys
import tarfile
import time

import torch

from bench import gpu_evidence

MAX_FILES, MAX_BYTES = 8, 16 << 20  # what the device machine sends back


def test_dry_run_writes_the_evidence_folder(tmp_path):
    start = time.monotonic()
    summary = gpu_evidence.evidence(tmp_path, dry_run=not torch.cuda.is_available(),
                                    python=sys.executable, ops=["models"],
                                    sanitize_only="^gated_residual$",
                                    steps_wanted=("tests", "bench", "sanitizer"),
                                    test_paths=("tests/kernels/test_performer.py",))
    elapsed = time.monotonic() - start
    failed = [s for s in summary["steps"] if not s["ok"]]
    logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("*.log")}
    assert not failed, (failed, logs)
    files = sorted(tmp_path.iterdir())
    assert len(files) <= MAX_FILES and all(p.is_file() for p in files)
    assert all(p.stat().st_size < MAX_BYTES for p in files)
    assert {p.name for p in files} == {"summary.json", "build.log", "tests.log", "bench.log",
                                       "sanitizer.log", "results.tar.gz"}
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is True
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = tar.getnames()
    results = [n for n in names if n.endswith(".json")]
    assert len(results) == 1 and results[0].endswith("/models.json"), names
    if summary["dry_run"]:
        assert results[0].split("/")[1].startswith("cpu-")  # never a GPU slug from a CPU
        assert "1 launches on cpu" in (tmp_path / "sanitizer.log").read_text()
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["build"]["note"].startswith("skipped")
    print(f"gpu-evidence dry run (smallest): {elapsed:.1f} s")
