"""Fused 3D attention with anchor-token override and in-kernel 3D RoPE.

The package shares its name with the public function ``kernels.attention3d``. Importing a submodule
(``kernels.attention3d.ref``) makes Python set the attribute ``kernels.attention3d`` to this
package, which would shadow the lazily exported function. Two guards keep
``kernels.attention3d(q, k, v, ...)`` working whatever was imported first: ``op.py`` rebinds the
attribute to the function when it loads, and this package module is itself callable (it forwards
to :func:`kernels.attention3d.op.attention3d`).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from kernels.attention3d.op import attention3d

        return attention3d(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
