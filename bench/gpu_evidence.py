"""``make gpu-evidence``: everything a GPU window must produce, in one command, within 9 minutes.

Steps, each under its own time limit so that one slow step cannot starve the others:

1. ``build``: compile ``csrc/`` into ``kernels/_cuda*.so`` (sm_90 only, the H200's arch);
2. ``tests``: the GPU-lane subset: every ``@pytest.mark.gpu`` test of ``tests/kernels`` (every
   op and backend at the papers' shapes) plus the adaLN Triton tests, which run on CUDA there;
   the full lane stays ``make test-gpu``;
3. ``bench``: ``python -m bench --quick`` (every op's QUICK workloads, every provider, fwd / bwd /
   fwd+bwd) and the end-to-end model rows, under one wall-clock budget shared among the ops;
4. ``sanitizer``: ``python -m bench.sanitize_launch`` once to compile and autotune (Triton's
   autotuning cache on), then under ``compute-sanitizer`` memcheck and racecheck.

Everything lands in ``$OUT`` (at most 8 files, each well under 16 MiB): ``summary.json``,
``build.log``, ``tests.log``, ``bench.log``, ``sanitizer.log`` and ``results.tar.gz`` (the result
JSON files, ``<device-slug>/<op>.json``, and plots when matplotlib is there). ``make
import-evidence DIR=<that folder>`` files them under ``bench/results/`` and regenerates
``docs/PERFORMANCE.md``.

``GPU_EVIDENCE_DRY_RUN=1`` runs every step at smoke size on a CPU: the build as on the GPU (when
nvcc exists), the test subset (which skips without a GPU: it checks collection and imports), the
reduced CPU sweep (written under a ``cpu-*`` slug, never a GPU one), and the sanitizer launches in
Triton's interpreter without compute-sanitizer. ``GPU_EVIDENCE_OPS=adaln,models`` and
``GPU_EVIDENCE_SANITIZE=<regex>`` narrow the bench and sanitizer steps and
``GPU_EVIDENCE_STEPS=tests,bench,sanitizer`` picks steps (the CI test uses all three; CI's own
``make build-cuda`` is the build step's command). Limits are 4x looser in a dry run (Triton's
interpreter on a shared CPU). ``GPU_EVIDENCE_INTERPRET=0`` keeps the dry run out of Triton's
interpreter (the GPU-image rehearsal: Triton 3.6's interpreter fails with numpy >= 2.4,
triton-lang/triton#9171, which the compiled GPU path never meets); Triton rows are then skipped
with the registry's reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG_LIMIT_BYTES = 4 << 20  # a log is cut to its last 4 MiB: the files that come back are < 16 MiB
# Seconds per step on the H200 (sum 540 s: the 9-minute target). The sanitizer runs start torch
# and a CUDA context under instrumentation, which alone takes tens of seconds.
LIMITS = {"build": 90, "tests": 120, "bench": 180, "sanitizer_warm": 30, "memcheck": 60,
          "racecheck": 60}
# The sweep's own budget, shared among the ops as it goes (an op that finishes early leaves its
# time to the next; 7 ops); 30 s are left for the last rows that overrun and for the plots.
BENCH_BUDGET_S = 150
# The dry run runs Triton in its interpreter on a shared CPU: same steps, looser limits.
DRY_RUN_LIMIT_FACTOR = 4
STEPS = ("build", "tests", "bench", "sanitizer")


@dataclass
class StepResult:
    name: str
    returncode: int | None
    seconds: float
    limit_s: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _run(name: str, cmd: list[str], log, limit_s: float, env: dict) -> StepResult:
    """Run ``cmd`` in its own process group, output appended to ``log``; killed at the limit."""
    log.write(f"\n### {name}: {' '.join(cmd)}\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=limit_s)
        note = ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc, note = None, f"killed at its {limit_s:.0f} s limit"
    seconds = time.monotonic() - start
    log.write(f"### {name}: rc={rc} in {seconds:.1f} s {note}\n")
    log.flush()
    return StepResult(name, rc, round(seconds, 1), limit_s, note)


def _skipped(name: str, why: str) -> StepResult:
    return StepResult(name, 0, 0.0, 0.0, f"skipped: {why}")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    fallback = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return found or (str(fallback) if fallback.exists() else None)


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    fallback = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer"
    return found or (str(fallback) if fallback.exists() else None)


def _trim(path: Path) -> None:
    if path.exists() and path.stat().st_size > LOG_LIMIT_BYTES:
        data = path.read_bytes()[-LOG_LIMIT_BYTES:]
        path.write_bytes(b"[... cut to the last 4 MiB ...]\n" + data)


def evidence(out: Path, *, dry_run: bool, python: str, ops: list[str] | None = None,
             sanitize_only: str | None = None, steps_wanted: tuple[str, ...] = STEPS,
             test_paths: tuple[str, ...] = ("tests/kernels",)) -> dict:
    unknown = sorted(set(steps_wanted) - set(STEPS))
    if unknown:
        raise ValueError(f"GPU_EVIDENCE_STEPS must be among {STEPS}, got {unknown}")
    out.mkdir(parents=True, exist_ok=True)
    factor = DRY_RUN_LIMIT_FACTOR if dry_run else 1
    limits = {name: seconds * factor for name, seconds in LIMITS.items()}
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if dry_run and os.environ.get("GPU_EVIDENCE_INTERPRET", "1") != "0":
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels run in the interpreter on the CPU
    if dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    steps: list[StepResult] = []
    staging = Path(tempfile.mkdtemp(prefix="gpu-evidence-"))
    results_root = staging / "results"

    # 1. build
    with open(out / "build.log", "w") as log:
        if "build" not in steps_wanted:
            steps.append(_skipped("build", "not in GPU_EVIDENCE_STEPS"))
        elif _nvcc() is None:
            steps.append(_skipped("build", "no nvcc on this machine"))
        else:
            build_env = {**env, "AVATAR_KERNELS_REQUIRE_CUDA_BUILD": "1",
                         "AVATAR_KERNELS_CUDA_ARCHS": env.get("AVATAR_KERNELS_CUDA_ARCHS", "90")}
            steps.append(_run("build", [python, "setup.py", "-q", "build_ext", "--inplace"], log,
                              limits["build"], build_env))

    # 2. GPU-lane test subset. Without a GPU the gpu-marked tests skip: the step then checks that
    # every test module imports and collects in this environment.
    with open(out / "tests.log", "w") as log:
        # -v: a test's name and outcome are logged as it ends, so a killed step still tells
        pytest = [python, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider"]
        if "tests" not in steps_wanted:
            steps.append(_skipped("tests", "not in GPU_EVIDENCE_STEPS"))
        else:
            steps.append(_run("tests", pytest + ["-m", "gpu", *test_paths], log,
                              limits["tests"] * 0.75, env))
            if not dry_run:  # on a CPU these are the CPU lane's, which CI runs already
                steps.append(_run("tests_adaln", pytest + ["tests/kernels/test_adaln.py"], log,
                                  limits["tests"] * 0.25, env))

    # 3. quick sweep + end-to-end rows
    with open(out / "bench.log", "w") as log:
        cmd = [python, "-m", "bench", "--quick", "--out", str(results_root)]
        if not dry_run:
            cmd += ["--total-budget-s", str(BENCH_BUDGET_S)]
        for op in ops or []:
            cmd += ["--op", op]
        if "bench" not in steps_wanted:
            steps.append(_skipped("bench", "not in GPU_EVIDENCE_STEPS"))
        else:
            steps.append(_run("bench", cmd, log, limits["bench"], env))

    # 4. compute-sanitizer on one small launch of every kernel
    with open(out / "sanitizer.log", "w") as log:
        launch = [python, "-m", "bench.sanitize_launch"]
        if sanitize_only:
            launch += ["--only", sanitize_only]
        warm_env = {**env, "TRITON_CACHE_AUTOTUNING": "1"}
        wanted = "sanitizer" in steps_wanted
        if wanted:
            steps.append(_run("sanitizer_warm", launch, log, limits["sanitizer_warm"], warm_env))
        tool = _sanitizer()
        for check in ("memcheck", "racecheck"):
            if not wanted:
                steps.append(_skipped(check, "not in GPU_EVIDENCE_STEPS"))
            elif dry_run or tool is None:
                why = "dry run (no GPU)" if dry_run else "compute-sanitizer not found"
                steps.append(_skipped(check, why))
                continue
            cmd = [tool, "--tool", check, "--error-exitcode", "9", "--print-limit", "50"] + launch
            steps.append(_run(check, cmd, log, limits[check], warm_env))

    # results: one archive (the JSON files are small; plots when matplotlib exists)
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        if results_root.exists():
            tar.add(results_root, arcname="results")
    shutil.rmtree(staging, ignore_errors=True)
    for name in ("build.log", "tests.log", "bench.log", "sanitizer.log"):
        _trim(out / name)

    summary = {
        "dry_run": dry_run,
        "python": python,
        "seconds": round(time.monotonic() - started, 1),
        "ok": all(s.ok for s in steps),
        "steps": [s.__dict__ | {"ok": s.ok} for s in steps],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> int:
    out = Path(os.environ.get("OUT") or ROOT / "out" / "gpu-evidence")
    dry_run = os.environ.get("GPU_EVIDENCE_DRY_RUN", "0") not in ("", "0")
    ops = [o for o in os.environ.get("GPU_EVIDENCE_OPS", "").split(",") if o] or None
    steps = tuple(s for s in os.environ.get("GPU_EVIDENCE_STEPS", ",".join(STEPS)).split(",") if s)
    summary = evidence(out, dry_run=dry_run, python=os.environ.get("GPU_PYTHON", sys.executable),
                       ops=ops, sanitize_only=os.environ.get("GPU_EVIDENCE_SANITIZE") or None,
                       steps_wanted=steps)
    for step in summary["steps"]:
        status = "ok" if step["ok"] else f"FAILED (rc={step['returncode']})"
        print(f"gpu-evidence: {step['name']:<15} {status:<20} {step['seconds']:7.1f} s "
              f"(limit {step['limit_s']:.0f} s) {step['note']}")
    kind = "dry run (CPU, smoke size)" if dry_run else "GPU run"
    print(f"gpu-evidence: {kind} finished in {summary['seconds']:.1f} s; files in {out}: "
          f"{', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
