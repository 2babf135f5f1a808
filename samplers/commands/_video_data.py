"""Real-video training data for ``train anchored --data DIR`` (built on avatar_models.conditioning
and avatar_models.data)."""

from __future__ import annotations

import argparse


def video_training_dataset(args: argparse.Namespace):
    raise SystemExit("--data needs the conditioning/data modules (issue 7), not merged yet; use "
                     "--dataset MODULE:FACTORY or --synthetic N")
