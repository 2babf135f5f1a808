"""``python -m samplers`` is the ``avatar-kernels`` command."""

import sys

from samplers.cli import main

sys.exit(main())
