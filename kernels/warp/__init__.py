"""Flow warping with occlusion (WarpFace's WarpCA): see README.md.

The public function ``kernels.warp(h, flow)`` shares its name with this package. Importing
``kernels.warp.op`` rebinds ``kernels.warp`` to the function; until then (say, after
``import kernels.warp.ref``) ``kernels.warp`` is this package, which is made callable so that
``kernels.warp(h, flow, ...)`` works either way.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from kernels.warp.op import warp

        return warp(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
