"""Every public op is reachable as a function from `kernels`, whatever was imported first."""

from __future__ import annotations

import subprocess
import sys

PUBLIC = ["adaln_modulate", "gated_residual", "attention3d", "Anchor", "rope3d",
          "warp_occlusion", "warp", "orthogonal_features", "performer_attention",
          "frame_causal_attention"]


def test_public_names_resolve_after_importing_internals_first():
    import kernels

    assert sorted(PUBLIC) == sorted(kernels._LAZY)
    refs = sorted({m.rsplit(".", 1)[0] + ".ref" for m in kernels._LAZY.values()})
    code = ("import importlib, types, kernels\n"
            f"for m in {refs!r}: importlib.import_module(m)\n"
            f"for n in {PUBLIC!r}:\n"
            "    obj = getattr(kernels, n)\n"
            "    assert callable(obj) and not isinstance(obj, types.ModuleType), (n, obj)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
