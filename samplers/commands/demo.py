"""``avatar-kernels demo``: the bundled end-to-end demo (CPU, a few minutes).

    avatar-kernels demo --out out            # what `make demo` runs
    avatar-kernels demo --train              # what `make train-demo` runs (rewrites assets/demo/)

The demo reenacts a held-out procedural face with a 48-frame driving clip, once with Anchored
Diffusion and once with MultiDiffusion, using the tiny sDiT in ``assets/demo/``, and writes
``anchored.mp4``, ``multidiffusion.mp4``, ``contact_sheet.png``, ``metrics.json`` and
``consistency.png`` (consistency vs. video length: the toy-scale Figure 5 of the paper).
On a GPU machine the same command runs the fused kernels (the registry picks them; nothing to set).
See docs/demo.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected lengths >= 2, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from samplers.demo.pipeline import DemoOptions
    from samplers.demo.train import CHECKPOINT, DemoRecipe

    d, r = DemoOptions(), DemoRecipe()
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (out)")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                        help="demo model (default: the bundled assets/demo checkpoint); with "
                             "--train, where the trained model is written")
    parser.add_argument("--frames", type=int, default=d.frames, help="driving clip length")
    parser.add_argument("--steps", type=int, default=d.steps, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=d.guidance,
                        help="classifier-free guidance scale (1: off)")
    parser.add_argument("--lengths", type=_lengths, default=d.lengths,
                        help="video lengths of the consistency curve, e.g. 8,16,24,32,40,48")
    parser.add_argument("--curve-seeds", type=int, default=d.curve_seeds,
                        help="noise seeds averaged per consistency-curve point")
    parser.add_argument("--fit-steps", type=int, default=d.fit_steps,
                        help="iterations of the control estimator (generator fit)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    t = parser.add_argument_group("training the demo model (--train)")
    t.add_argument("--train", action="store_true",
                   help="train the demo model instead (writes --checkpoint, loss.json, loss.png)")
    t.add_argument("--train-steps", type=int, default=r.steps)
    t.add_argument("--batch-size", type=int, default=r.batch_size)
    t.add_argument("--lr", type=float, default=r.lr)
    t.add_argument("--train-seed", type=int, default=r.seed)


def run(args: argparse.Namespace) -> int:
    if args.train:
        from samplers.demo.train import DemoRecipe, train_demo

        recipe = DemoRecipe(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.train_seed)
        train_demo(recipe, args.checkpoint, progress=not args.no_progress)
        return 0

    from samplers.demo.pipeline import DemoOptions, run_demo

    if not args.checkpoint.is_file():
        raise SystemExit(f"demo checkpoint not found: {args.checkpoint} (run `make train-demo`, "
                         "or pass --checkpoint)")
    if args.frames < 2:
        raise SystemExit(f"--frames must be >= 2, got {args.frames}")
    opts = DemoOptions(frames=args.frames, steps=args.steps, guidance=args.guidance,
                       lengths=args.lengths, curve_seeds=args.curve_seeds,
                       fit_steps=args.fit_steps, seed=args.seed, checkpoint=args.checkpoint,
                       device=args.device, progress=not args.no_progress)
    paths = run_demo(opts, args.out)
    print(f"\ndemo done in {opts.timings['total_seconds']:.0f} s; wrote:")
    for name, path in paths.items():
        print(f"  {name:15s} {path}")
    return 0
