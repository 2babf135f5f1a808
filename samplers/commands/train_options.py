"""The training-engine options every ``avatar-kernels train <system>`` shares.

The engine (:mod:`avatar_models.training.engine`) owns precision, accumulation, EMA, schedule,
DDP/FSDP2 and checkpoints, so its options are declared once here and every system's train
command gets the same spelling, validation and help. A system passes its own defaults as an
:class:`~avatar_models.training.engine.EngineConfig` and adds only its own hyperparameters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from samplers.commands.validation import (
    float_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def add_engine_arguments(optimisation: argparse._ArgumentGroup, output: argparse._ArgumentGroup,
                         defaults) -> None:
    """Adds the engine's options: optimisation ones to ``optimisation``, checkpointing ones to
    ``output``. ``defaults`` is the system's EngineConfig (its values become the defaults)."""
    d = defaults
    t = optimisation
    t.add_argument("--steps", type=positive_int, default=d.steps, help="optimiser steps")
    t.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="global batch size (over all torchrun processes and --grad-accum "
                        "micro-steps; must divide evenly)")
    t.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate")
    t.add_argument("--warmup-steps", type=non_negative_int, default=d.warmup_steps,
                   help="linear warm-up steps, then cosine decay")
    t.add_argument("--ema-decay", type=float_range(0.0, 1.0, high_open=True),
                   default=d.ema_decay, help="0 disables the EMA")
    t.add_argument("--grad-clip", type=non_negative_float, default=d.grad_clip,
                   help="gradient-norm clip (0: off)")
    t.add_argument("--amp", choices=("auto", "bf16", "off"), default=d.amp,
                   help="mixed precision (auto: bf16 on CUDA)")
    t.add_argument("--grad-accum", type=positive_int, default=d.grad_accum,
                   help="micro-steps per optimiser step (--batch-size is the global batch: "
                        "all processes and micro-steps)")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimiser state with "
                        "FSDP2 (default: DDP)")
    t.add_argument("--seed", type=int, default=d.seed, help="random seed")
    o = output
    o.add_argument("--checkpoint-every", "--save-every", dest="checkpoint_every",
                   type=non_negative_int, default=d.checkpoint_every, metavar="K",
                   help="steps between resumable checkpoints (0: only at the end)")
    o.add_argument("--keep-last", type=positive_int, default=d.keep_last, metavar="N",
                   help="resumable checkpoints kept")
    o.add_argument("--resume", type=Path, metavar="DIR_OR_FILE",
                   help="continue a run: its --out file, its <out>.checkpoints directory or one "
                        "step directory; restores model, EMA, optimiser, LR schedule, RNG and "
                        "data position (a damaged newest checkpoint falls back to the previous "
                        "good one); this command's optimisation options apply")


def engine_config_from_args(args: argparse.Namespace, **system_values):
    """The EngineConfig of a parsed train command line; ``system_values`` sets the fields the
    engine options do not cover (e.g. weight_decay, min_lr_ratio, num_workers)."""
    from avatar_models.training.engine import EngineConfig

    return EngineConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, grad_clip=args.grad_clip,
        amp=args.amp, grad_accum=args.grad_accum,
        activation_checkpointing=args.activation_checkpointing, fsdp=args.fsdp, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
        progress=not getattr(args, "no_progress", False), device=getattr(args, "device", None),
        **system_values)


def add_model_and_output_arguments(parser: argparse.ArgumentParser, *, config_class: type,
                                   default_config: str, engine_defaults, set_example: str):
    """The groups every system's train command shares: model (``--config``, ``--set``),
    optimisation (``--attention-backend`` and the engine's options) and output (``--out``, the
    checkpoint cadence, ``--resume``, ``--device``, ``--no-progress``). Returns the model and
    optimisation groups so that a system adds its own options beside them."""
    from samplers.commands.validation import add_device_argument, output_file

    m = parser.add_argument_group("model")
    m.add_argument("--config", choices=sorted(config_class.NAMED), default=None,
                   help=f"named config (default: {default_config}; with --init: its config)")
    m.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"override a {config_class.__name__} field, e.g. --set {set_example}")
    t = parser.add_argument_group("optimisation")
    t.add_argument("--attention-backend", choices=("ref", "triton", "cuda"), default=None,
                   help="force one attention backend")
    o = parser.add_argument_group("output")
    o.add_argument("--out", type=output_file(".safetensors"), required=True,
                   help="checkpoint path (.safetensors)")
    add_engine_arguments(t, o, engine_defaults)
    add_device_argument(o)
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return m, t


def base_model_config(args: argparse.Namespace, system: str, config_class: type,
                      default_config: str) -> tuple[dict, dict | None]:
    """(config fields before ``--set``, the ``--init`` checkpoint's metadata or None): an
    ``--init`` checkpoint fixes the config, otherwise ``--config`` (default ``default_config``)
    names it."""
    from samplers.commands.validation import OptionError, check_checkpoint_file

    if getattr(args, "init", None) is not None:
        meta = check_checkpoint_file(args.init, "--init", system)
        if args.config is not None:
            raise OptionError("--init fixes the model config; drop --config (use --set for fields "
                              "that do not change the weights' shapes)")
        return meta["config"], meta
    name = args.config or default_config
    return {**config_class.NAMED[name], "name": name}, None
