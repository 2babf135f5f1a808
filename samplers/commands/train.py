"""``avatar-kernels train anchored ...``: train an Anchored Diffusion sDiT.

Data sources (one of):
    --data DIR             a folder of face videos (non-uniform sequences + farthest source frame,
                           VAE latents, CLIP source embedding, MediaPipe landmarks; needs --vae,
                           --clip)
    --dataset MOD:FN       a Python factory returning samples in the training format (see
                           avatar_models.training.anchored), called with the --dataset-arg
                           key=value pairs (values parsed as JSON when they parse)
    --synthetic N          N procedural blob clips (smoke runs, no files)
Model size comes from --config (a named config) plus --set field=value overrides; the data's
shape fields (in_channels, input_size, frames, control_dim, global_dim) are read from the first
sample unless set explicitly.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

SYSTEMS = ("anchored",)
DATA_FIELDS = ("in_channels", "input_size", "frames", "control_dim", "global_dim")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from avatar_models.training.anchored import TrainConfig

    d = TrainConfig()
    parser.add_argument("system", choices=SYSTEMS, help="which system to train")
    src = parser.add_argument_group("data (one of)")
    src.add_argument("--data", type=Path, help="folder of training videos")
    src.add_argument("--dataset", metavar="MODULE:FACTORY",
                     help="Python factory returning a dataset of sample dicts")
    src.add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="keyword argument for the --dataset factory (repeatable)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N procedural clips")
    parser.add_argument("--vae", type=Path, help="diffusers AutoencoderKL folder (--data)")
    parser.add_argument("--clip", type=Path, help="CLIP vision model folder (--data)")
    parser.add_argument("--resolution", type=int, default=256, help="frame size for --data")
    parser.add_argument("--conditioner", metavar="SPEC",
                        help="how `sample anchored` builds G and L_t from a source image and a "
                             "driving video: 'clip-landmarks' (default with --data) or "
                             "MODULE:FUNCTION (recorded in the checkpoint)")
    m = parser.add_argument_group("model")
    m.add_argument("--config", default="sdit-xl/2", help="named sDiT config (default sdit-xl/2)")
    m.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an SDiTConfig field, e.g. --set frames=8 (repeatable)")
    m.add_argument("--resume", type=Path, help="start from this checkpoint's raw weights")
    t = parser.add_argument_group("optimisation (paper defaults)")
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--mapping-lr-scale", type=float, default=d.mapping_lr_scale,
                   help="mapping-network lr = lr * this (paper: 0.1)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    t.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    t.add_argument("--lambda-ex", type=float, default=d.lambda_ex,
                   help="extra loss weight on expressive regions (weight 1 + lambda_ex)")
    t.add_argument("--cond-drop", type=float, default=d.cond_drop,
                   help="probability of dropping the conditions (for classifier-free guidance)")
    t.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 disables the EMA")
    t.add_argument("--grad-clip", type=float, default=d.grad_clip)
    t.add_argument("--amp", choices=("auto", "bf16", "off"), default=d.amp)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--num-workers", type=int, default=d.num_workers)
    t.add_argument("--attention-backend", choices=("ref", "triton", "cuda"), default=None)
    t.add_argument("--num-train-timesteps", type=int, default=d.schedule.num_train_timesteps)
    t.add_argument("--beta-schedule", choices=("linear", "scaled_linear"),
                   default=d.schedule.beta_schedule)
    o = parser.add_argument_group("output")
    o.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors)")
    o.add_argument("--save-every", type=int, default=d.save_every)
    o.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    o.add_argument("--no-progress", action="store_true")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: list[str], what: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what} expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = _parse_value(value)
    return out


def load_factory(spec: str):
    module, sep, name = spec.partition(":")
    if not sep:
        raise SystemExit(f"--dataset expects MODULE:FACTORY, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def infer_data_fields(sample: dict) -> dict:
    """SDiTConfig fields implied by one training sample."""
    frames = sample["frames"]
    if frames.dim() != 4 or frames.shape[-1] != frames.shape[-2]:
        raise SystemExit(f"sample 'frames' must be [T, C, H, W] with H == W, got "
                         f"{list(frames.shape)}")
    return {"frames": frames.shape[0], "in_channels": frames.shape[1],
            "input_size": frames.shape[-1], "control_dim": sample["control"].shape[-1],
            "global_dim": sample["global"].shape[-1]}


def build_dataset(args: argparse.Namespace):
    """(dataset, extra metadata describing how conditions were built)."""
    chosen = [x for x in (args.data, args.dataset, args.synthetic) if x is not None]
    if len(chosen) != 1:
        raise SystemExit("give exactly one of --data, --dataset, --synthetic")
    if args.synthetic is not None:
        from avatar_models.training.synthetic import BlobSequences

        over = _pairs(args.set, "--set")
        kw = {k: over[k] for k in ("frames", "control_dim", "global_dim") if k in over}
        if "in_channels" in over:
            kw["channels"] = over["in_channels"]
        if "input_size" in over:
            kw["size"] = over["input_size"]
        spec = args.conditioner or "avatar_models.training.synthetic:stats_conditioner"
        return BlobSequences(args.synthetic, seed=args.seed, **kw), {"conditioner": spec}
    if args.dataset is not None:
        kwargs = _pairs(args.dataset_arg, "--dataset-arg")
        return load_factory(args.dataset)(**kwargs), {
            "conditioner": args.conditioner, "dataset": args.dataset, "dataset_args": kwargs}
    from samplers.commands._anchored_io import video_training_dataset

    return video_training_dataset(args)


def run(args: argparse.Namespace) -> int:
    import torch

    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.training.anchored import TrainConfig, train_anchored
    from avatar_models.training.diffusion import DiffusionSchedule

    dataset, extra = build_dataset(args)
    overrides = _pairs(args.set, "--set")
    from torch.utils.data import IterableDataset

    indexable = hasattr(dataset, "__getitem__") and not isinstance(dataset, IterableDataset)
    first = dataset[0] if indexable else next(iter(dataset))
    inferred = infer_data_fields(first)
    cfg = SDiTConfig.from_name(args.config, **{**inferred, **overrides})
    model = None
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume, system="anchored")
        cfg = SDiTConfig.from_dict(ckpt.config)
        model = SDiT(cfg, attention_backend=args.attention_backend)
        model.load_state_dict(ckpt.weights("model"))
    schedule = DiffusionSchedule(num_train_timesteps=args.num_train_timesteps,
                                 beta_schedule=args.beta_schedule)
    train = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        mapping_lr_scale=args.mapping_lr_scale, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, lambda_ex=args.lambda_ex,
        cond_drop=args.cond_drop, ema_decay=args.ema_decay, grad_clip=args.grad_clip,
        amp=args.amp, seed=args.seed, save_every=args.save_every, num_workers=args.num_workers,
        attention_backend=args.attention_backend, schedule=schedule)
    params = sum(p.numel() for p in (model or SDiT(cfg)).parameters())
    print(f"training anchored {cfg.name} ({params / 1e6:.2f}M parameters): {cfg}")
    torch.manual_seed(args.seed)
    train_anchored(cfg, dataset, train, device=args.device, out=args.out, extra=extra,
                   model=model, progress=not args.no_progress)
    return 0
