"""bench/static_profile.py: the analysis functions on known inputs, and the tool end to end on the
CI subset (compile-only, no GPU)."""

from __future__ import annotations

import json

import pytest

from bench.static_profile import (
    analyse_ptx,
    analyse_sass,
    ctas_per_sm,
    markdown,
    parse_ptxas_log,
    sass_loops,
    trig_in_scf_loops,
)
from kernels.testing import run_compiled_mode

ROW_KEYS = {"op", "kernel", "variant", "dtype", "num_warps", "num_stages", "registers",
            "spill_store_bytes", "spill_load_bytes", "shared_bytes", "ctas_per_sm", "mma_kind",
            "mma_count", "vector_loads", "async_copies", "tma", "fences", "atomics",
            "trig_in_loop", "loop_instructions", "warnings"}


def test_ctas_per_sm_takes_the_tightest_limit():
    # registers: 255 -> 256 per thread, 8 warps -> 65536 registers: one CTA
    assert ctas_per_sm(90, 255, 0, 8) == 1
    # 128 registers x 128 threads = 16384: four CTAs by registers, smem 40 KB + 1 KB reserved: 5
    assert ctas_per_sm(90, 128, 40 * 1024, 4) == 4
    # shared memory: 131 KB per CTA leaves room for one on H100 (228 KB) and one on A100
    assert ctas_per_sm(90, 64, 131 * 1024, 4) == 1
    assert ctas_per_sm(80, 64, 100 * 1024, 4) == 1
    assert ctas_per_sm(80, 64, 60 * 1024, 4) == 2
    # warps: 16 warps per CTA, 64 per SM; the 32-CTA cap with tiny CTAs
    assert ctas_per_sm(90, 16, 0, 16) == 4
    assert ctas_per_sm(90, 16, 0, 1) == 32
    # more shared memory than one CTA may have: it cannot run
    assert ctas_per_sm(80, 32, 200 * 1024, 4) == 0


def test_parse_ptxas_log_reads_registers_spills_and_warnings():
    log = """ptxas info    : 0 bytes gmem
ptxas /tmp/tmpab12.ptx, line 2090; warning : Potential Performance Loss: wgmma.mma_async \
instructions are serialized due to insufficient register resources for the wgmma pipeline in the \
function '_k' (C7515)
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    1288 bytes stack frame, 1292 bytes spill stores, 1304 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1288 bytes cumulative stack size
"""
    got = parse_ptxas_log(log)
    spills = (got["spill_store_bytes"], got["spill_load_bytes"])
    assert got["registers"] == 255 and spills == (1292, 1304)
    assert len(got["warnings"]) == 1 and "C7515" in got["warnings"][0]
    assert got["warnings"][0].startswith("warning : Potential Performance Loss")  # no file name
    assert parse_ptxas_log("ptxas info    : Used 40 registers")["spill_store_bytes"] == 0
    # ptxas -v also reports serialisation as an "info" line: it counts as a warning
    info = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions "
            "are serialized due to non wgmma instructions defining accumulator registers")
    assert "(C7515)" in parse_ptxas_log(info)["warnings"][0]


_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/                   FFMA R2, R3, R4, R5 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   FMUL R6, R6, R7 ;
        /*0050*/                   FADD R8, R8, R9 ;
        /*0060*/               @P0 BRA 0x50 ;
        /*0070*/                   MUFU.SIN R10, R11 ;
        /*0080*/               @P1 BRA 0x20 ;
        /*0090*/                   HMMA.16816.F32.BF16 R12, R14, R16, R12 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0 ;
"""


def test_sass_loops_find_the_main_loop_past_a_nested_scalar_loop():
    # loop [0x20, 0x80] holds an HGMMA; the nested loop [0x50, 0x60] holds none, so the main
    # loop is the one reported; BRA-to-itself after EXIT is not a loop
    from bench.static_profile import parse_sass
    instructions = parse_sass(_SASS)
    assert len(instructions) == 12
    assert sass_loops(instructions) == [{"instructions": 7, "mma": 1, "trig": 1}]
    got = analyse_sass(_SASS)
    assert got["mma_kind"] == "wgmma" and got["mma_count"] == 3
    assert got["mma_sync_count"] == 1  # the HMMA beside the HGMMAs is counted apart
    assert got["loop_instructions"] == 7 and got["sass_trig_in_loop"] == 1
    # without tensor-core instructions the innermost loop is reported
    plain = _SASS.replace("HGMMA.64x64x16.F32.BF16", "FFMA").replace("HMMA.16816.F32.BF16", "FFMA")
    got = analyse_sass(plain)
    assert got["mma_kind"] == "none" and got["loop_instructions"] == 2


def test_trig_in_scf_loops_counts_only_inside_loops():
    ttir = """tt.func public @k(%arg0: f32) {
    %0 = math.sin %arg0 : f32
    %1 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %0) -> (f32) : i32 {
      %2 = math.cos %a : f32
      %3 = scf.if %p -> (f32) {
        %4 = math.sin %2 : f32
        scf.yield %4 : f32
      } else {
        scf.yield %2 : f32
      }
      scf.yield %3 : f32
    }
    %5 = math.cos %1 : f32
    tt.return
  }"""
    assert trig_in_scf_loops(ttir) == 2


def test_analyse_ptx_counts_load_kinds_fences_and_atomics():
    ptx = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];
    ld.global.b16 %rs1, [ %rd3 + 0 ];
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
    cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r9], [%rd5];
    fence.proxy.async.shared::cta;
    membar.gl;
    wgmma.fence.sync.aligned;
    @%p2 atom.global.gpu.acq_rel.add.f32 %f1, [ %rd6 + 0 ], %f2;
    red.global.gpu.relaxed.add.f32 [ %rd7 + 0 ], %f3;
    red.global.gpu.relaxed.add.f32 [ %rd8 + 0 ], %f4;
    """
    got = analyse_ptx(ptx)
    assert (got["vector_loads"], got["scalar_loads"], got["async_copies"], got["tma"]) == \
        (2, 1, 1, 1)
    assert got["fences"] == {"fence.proxy.async.shared::cta": 1, "membar.gl": 1}
    assert got["atomics"] == {"atom.global.gpu.acq_rel.add.f32": 1,
                              "red.global.gpu.relaxed.add.f32": 2}


def test_fp16_twins_of_bf16_launches_are_left_out_and_others_kept():
    from bench.static_profile import Job, fp16_twins

    def job(dtype, flag, warps=4):
        return Job(op="op", module="m", kernel="_k", variant="v", dtype=dtype,
                   signature={"x_ptr": f"*{dtype}", "scale": "fp32", "FLAG": "constexpr"},
                   constexprs=[([2], flag)], attrs=[], options={"num_warps": warps})

    bf16, same, other_flag, other_warps = (job("bf16", True), job("fp16", True),
                                           job("fp16", False), job("fp16", True, 8))
    kept, left_out = fp16_twins([bf16, same, other_flag, other_warps], 90)
    assert left_out == [same] and kept == [bf16, other_flag, other_warps]
    # an fp32 job is never a twin, and without a bf16 launch nothing is left out
    assert fp16_twins([job("fp32", True), same], 90) == ([job("fp32", True), same], [])


_RUN = "import sys; from bench.static_profile import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_static_profile_quick_on_hopper(tmp_path):
    """The tool end to end on the CI subset (attention3d and adaln, bf16, the first autotune
    config): the schema, and facts the kernels are built for: the attention forward and
    backward use wgmma on sm_90a, the forward has its 2 tl.dot ops and no trig in its loop, adaLN
    has no tensor-core work."""
    done = run_compiled_mode(_RUN, "--arch", "90", "--ops", "attention3d", "adaln", "--quick",
                             "--out", str(tmp_path), "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "sm_90a.json").read_text())
    assert report["arch"] == "sm_90a"
    assert {"arch", "triton", "cuda", "commit", "date", "rows"} <= set(report)
    rows = report["rows"]
    assert [r for r in rows if "error" in r] == []
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["registers"] > 0 and row["ctas_per_sm"] >= 1
        # issue 15's target: no spills in a bf16 launch configuration at D <= 128
        assert row["spill_store_bytes"] == 0, row
    by_kernel = {}
    for row in rows:
        by_kernel.setdefault(row["kernel"], []).append(row)
    fwd = by_kernel["_attention3d_fwd_kernel"]
    bwd = by_kernel["_attention3d_bwd_kernel"]
    assert all(r["mma_kind"] == "wgmma" and r["mma_count"] > 0 for r in fwd + bwd)
    assert {r["dot_ops"] for r in fwd} == {2}
    assert all(r["loop_instructions"] and r["trig_in_loop"] == 0 for r in fwd)
    assert all(r["mma_kind"] == "none" for op in ("_adaln_fwd_kernel", "_adaln_bwd_kernel")
               for r in by_kernel[op])
    text = (tmp_path / "sm_90a.md").read_text()
    assert text.startswith("# Static profile, sm_90a") and "| _attention3d_fwd_kernel |" in text
    assert markdown(report) == text
