"""LaVieID's ``avatar-kernels`` verbs: ``train``, ``sample`` and ``demo``.

``samplers/cli.py`` finds this module through its SYSTEMS table.

    avatar-kernels train lavieid --stage base --config tiny --out base.safetensors
    avatar-kernels train lavieid --stage modules --init base.safetensors \\
        --out both.safetensors                        # router + TAM (Table 2 "both")
    avatar-kernels train lavieid --stage modules --init base.safetensors --no-tam ...  # router
    avatar-kernels train lavieid --stage modules --init base.safetensors --no-router ... # TAM
    avatar-kernels train lavieid --stage base --init base.safetensors ...  # baseline arm, same
                                                                          # extra budget
    avatar-kernels sample lavieid --checkpoint both.safetensors --reference face.png \\
        --prompt "a person smiling, blinking, talking and nodding" --out out.mp4

train data: the toy world (:class:`avatar_models.data.face_parts.PartFaces`: procedural faces
with per-part labels, prompts from a small vocabulary mapped to a motion program, the reference
in another pose). Text: the toy's weight-free encoder, or ``--t5 DIR`` (a local T5 folder).

sample: pixel-space (toy) checkpoints. Part crops of the reference come from ``--parts
canonical`` (the toy's usual part positions) or ``--parts landmarks`` (MediaPipe landmarks and
``conditioning.face_regions``; no hair class there, so the hair crop is zero: M = 5 on real data).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from samplers.commands.train_options import (
    add_model_and_output_arguments,
    base_model_config,
    engine_config_from_args,
)
from samplers.commands.validation import (
    OptionError,
    add_device_argument,
    check_checkpoint_file,
    dataclass_overrides,
    float_range,
    image_file,
    input_file,
    non_negative_float,
    output_file,
    positive_float,
    positive_int,
    print_note,
    probability,
    resolve_device,
)

DEFAULT_CONFIG = "tiny"
TOY_FPS = 8.0


def _check_t5(folder: Path | None, option: str = "--t5") -> None:
    if folder is not None and not (folder / "config.json").is_file():
        raise OptionError(f"{option} {str(folder)!r}: expected a local transformers T5 folder "
                          f"with config.json")


def text_encoder_for(cfg, t5: Path | None, device="cpu"):
    from avatar_models.lavieid import T5TextEncoder, ToyTextEncoder

    if t5 is not None:
        return T5TextEncoder(t5, tokens=cfg.text_tokens, device=device)
    return ToyTextEncoder(cfg.text_dim, cfg.text_tokens)


# ---- train ----

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from avatar_models.lavieid import LaVieIDConfig, LaVieIDTrainConfig
    from avatar_models.training.engine import EngineConfig

    d = LaVieIDTrainConfig()
    parser.add_argument("--stage", choices=("base", "modules"), required=True,
                        help="base: train the identity-preserving baseline (router and TAM off); "
                             "modules: freeze it, train the local encoder, router and TAM")
    parser.add_argument("--no-router", action="store_true", help="Table 2: router off")
    parser.add_argument("--no-tam", action="store_true", help="Table 2: TAM off")
    parser.add_argument("--lambda-diff", type=non_negative_float, default=d.lambda_diff)
    parser.add_argument("--lambda-route", type=non_negative_float, default=d.lambda_route)
    parser.add_argument("--lambda-tam", type=non_negative_float, default=d.lambda_tam,
                        help="weight of the assumed TAM term (TAM(x0-hat) vs z0)")
    parser.add_argument("--text-drop", type=probability, default=d.text_drop,
                        help="probability of the null text (classifier-free guidance)")
    parser.add_argument("--init", type=input_file("a checkpoint", (".safetensors",)),
                        help="start from this lavieid checkpoint's weights (its config is used)")
    parser.add_argument("--t5", type=Path, default=None,
                        help="local T5 encoder folder (default: the toy's weight-free encoder)")
    parser.add_argument("--window", type=positive_int, default=64,
                        help="toy frames: side (px) of the square around the face centre that is "
                             "resampled to the model's size (64: the whole frame)")
    # the paper's recipe: AdamW, lr 3e-6, batch 1, 10K steps
    add_model_and_output_arguments(
        parser, config_class=LaVieIDConfig, default_config=DEFAULT_CONFIG,
        engine_defaults=EngineConfig(steps=10000, batch_size=1, lr=3e-6, ema_decay=0.0,
                                     grad_clip=1.0), set_example="beta=0.2")


def validate_train_args(args: argparse.Namespace):
    """Every check that needs no model: (model config, train config)."""
    from avatar_models.lavieid import LaVieIDConfig, LaVieIDTrainConfig

    args.device = str(resolve_device(args.device))
    _check_t5(args.t5)
    base, _ = base_model_config(args, "lavieid", LaVieIDConfig, DEFAULT_CONFIG)
    overrides = dataclass_overrides(LaVieIDConfig, args.set, "--set", defaults=base)
    switches = {"router": args.stage == "modules" and not args.no_router,
                "tam": args.stage == "modules" and not args.no_tam}
    if args.stage == "base" and (args.no_router or args.no_tam):
        raise OptionError("--no-router / --no-tam apply to --stage modules (the base stage "
                          "trains neither)")
    if args.stage == "modules" and args.no_router and args.no_tam:
        raise OptionError("--no-router with --no-tam leaves nothing to train in --stage modules; "
                          "the baseline arm is --stage base --init BASE")
    try:
        cfg = LaVieIDConfig.from_dict({**base, **overrides, **switches})
        train = LaVieIDTrainConfig(stage=args.stage, lambda_diff=args.lambda_diff,
                                   lambda_route=args.lambda_route, lambda_tam=args.lambda_tam,
                                   text_drop=args.text_drop)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if cfg.in_channels != 3 or cfg.input_height != cfg.input_width or 64 % cfg.input_height:
        raise OptionError(f"the toy data is square RGB pixels of a size dividing 64; config "
                          f"{cfg.name!r} has in_channels={cfg.in_channels}, "
                          f"{cfg.input_height}x{cfg.input_width}")
    from avatar_models.data.face_parts import window_view

    try:
        window_view(torch.zeros(1, 1, 64, 64), args.window, cfg.input_height)
    except ValueError as exc:
        raise OptionError(f"--window {args.window}: {exc}") from None
    if args.stage == "modules" and args.init is None:
        print_note("--stage modules without --init freezes an untrained baseline; train one "
                   "with --stage base first")
    return cfg, train


def run_train(args: argparse.Namespace) -> int:
    from avatar_models.data.face_parts import PartFaces
    from avatar_models.lavieid import LaVieIDDiT, lavieid_system
    from avatar_models.training.distributed import teardown_world
    from avatar_models.training.engine import train

    cfg, tcfg = validate_train_args(args)
    dataset = PartFaces(frames=cfg.frames, size=cfg.input_height, crop_size=cfg.crop_size,
                        seed=args.seed, text_encoder=text_encoder_for(cfg, args.t5),
                        window=args.window)
    torch.manual_seed(args.seed)
    model = LaVieIDDiT(cfg, attention_backend=args.attention_backend)
    if args.init is not None:
        from avatar_models.checkpoint import load_checkpoint

        init = load_checkpoint(args.init, system="lavieid")
        # a compact (EMA-only) checkpoint has no raw weights: start from what it stores
        model.load_state_dict(init.weights("model" if init.model else "ema"))
    if int(os.environ.get("RANK", "0")) == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"training lavieid --stage {tcfg.stage} {cfg.name} ({params / 1e6:.2f}M "
              f"parameters, router={cfg.router}, tam={cfg.tam})")
    extra = {"data": {"kind": "toy", "fps": TOY_FPS, "world": dataset.world,
                      "window": args.window, "text": "t5" if args.t5 else "toy"},
             "init": None if args.init is None else str(args.init)}
    try:
        train(lavieid_system(model, dataset, tcfg, args.lr, extra),
              engine_config_from_args(args), out=args.out, resume=args.resume)
    finally:
        teardown_world()
    return 0


# ---- sample ----

def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a `train lavieid` checkpoint (.safetensors)")
    parser.add_argument("--reference", type=image_file, required=True, help="reference face")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--out", type=output_file(".mp4"), required=True, help="output .mp4")
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float_range(0.0), default=6.0, help="CFG scale")
    parser.add_argument("--parts", choices=("canonical", "landmarks"), default="canonical",
                        help="where the part crops come from (see the module help)")
    parser.add_argument("--t5", type=Path, default=None,
                        help="local T5 folder (checkpoints trained with --t5)")
    parser.add_argument("--fps", type=positive_float, default=TOY_FPS, help="output frame rate")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    add_device_argument(parser)
    parser.add_argument("--attention-backend", choices=("ref", "triton", "cuda"), default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def validate_sample_args(args: argparse.Namespace) -> dict:
    from avatar_models.lavieid import LaVieIDConfig

    args.device = resolve_device(args.device)
    meta = check_checkpoint_file(args.checkpoint, "--checkpoint", "lavieid")
    try:
        cfg = LaVieIDConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise OptionError(f"--checkpoint {str(args.checkpoint)!r}: bad model config: {exc}") \
            from None
    if not args.prompt.strip():
        raise OptionError("--prompt must not be empty")
    if cfg.in_channels != 3 or cfg.input_height != cfg.input_width:
        raise OptionError(f"--checkpoint: sampling takes square pixel-space (toy) models, this "
                          f"one has in_channels={cfg.in_channels}, "
                          f"{cfg.input_height}x{cfg.input_width}")
    if meta["extra"].get("data", {}).get("text") == "t5" and args.t5 is None:
        raise OptionError("this checkpoint was trained on T5 text: pass --t5 DIR")
    _check_t5(args.t5)
    return meta


def reference_inputs(path: Path, cfg, parts: str, window: int = 64):
    """(reference [3, S, S], identity [48], crops [M, 3, c, c]) in [-1, 1] from an image;
    ``window``: the toy's zoom (the checkpoint's data window), applied to the reference."""
    from avatar_models.data import face_parts
    from avatar_models.data import procedural_faces as pf
    from avatar_models.media import read_image
    from samplers.commands.anchored import resize_frames, square_crop

    image, _ = square_crop(read_image(path))                                # [S, S, 3] uint8
    big = (resize_frames(image, pf.SIZE) + 1) / 2                           # [3, 64, 64] [0, 1]
    if parts == "landmarks":
        from avatar_models.conditioning.face_regions import face_part_labels
        from avatar_models.conditioning.landmarks import detect_landmarks

        ids = face_part_labels(detect_landmarks(image), pf.SIZE)            # [64, 64]
        # FACE_PARTS order (background, skin, eyebrows, eyes, nose, mouth) -> PARTS; no hair
        rows = {"brows": 2, "eyes": 3, "mouth": 5, "nose": 4, "skin": 1}
        labels = torch.stack([(ids == rows[p]).float() if p in rows else torch.zeros_like(
            ids, dtype=torch.float) for p in face_parts.PARTS])
    else:
        labels = face_parts.canonical_part_labels()
    crops = face_parts.part_crops(big, labels, cfg.crop_size) * 2 - 1
    reference = face_parts.window_view(big[None], window, cfg.input_height)[0] * 2 - 1
    return reference, pf.identity_embedding(big), crops


def run_sample(args: argparse.Namespace) -> int:
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.lavieid import LaVieIDConfig, LaVieIDDiT
    from avatar_models.media import to_uint8_frames, write_video
    from samplers.lavieid import LaVieIDSettings, lavieid_sample

    meta = validate_sample_args(args)
    cfg = LaVieIDConfig.from_dict(meta["config"])
    reference, identity, crops = reference_inputs(
        args.reference, cfg, args.parts, meta["extra"].get("data", {}).get("window", 64))
    text = text_encoder_for(cfg, args.t5, args.device)([args.prompt])
    model = LaVieIDDiT(cfg, attention_backend=args.attention_backend)
    model.load_state_dict(load_checkpoint(args.checkpoint, system="lavieid").weights(args.weights))
    model = model.to(args.device).eval()
    latent = lavieid_sample(
        model, text=text, reference=reference[None], identity=identity[None],
        crops=crops[None] if cfg.router else None,
        latent_shape=(cfg.frames, cfg.in_channels, cfg.input_height, cfg.input_width),
        encode_parts=model.part_tokens if cfg.router else None, enhance=model.enhance,
        settings=LaVieIDSettings(args.steps, args.guidance),
        generator=torch.Generator().manual_seed(args.seed), device=args.device,
        progress=not args.no_progress)
    frames = to_uint8_frames(latent[0].float().cpu().clamp(-1, 1))
    write_video(args.out, frames, args.fps, pad_to_even=True)
    print(f"wrote {args.out} ({frames.shape[0]} frames, {args.fps:g} fps, router={cfg.router}, "
          f"tam={cfg.tam})")
    return 0


# ---- demo ----

def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from samplers.demo.lavieid_table import TableOptions
    from samplers.demo.lavieid_train import ASSETS

    d = TableOptions()
    parser.add_argument("--out", type=Path, default=Path("out-lavieid"), help="output folder")
    parser.add_argument("--checkpoints", type=Path, default=ASSETS,
                        help="folder of the toy models (default: the shipped assets/lavieid); "
                             "with --train, where they are written")
    parser.add_argument("--identities", type=positive_int, default=d.identities,
                        help="held-out identities (seeds >= 1,000,000; intervals over them)")
    parser.add_argument("--noise-seeds", type=positive_int, default=d.noise_seeds,
                        help="sampling noise seeds per identity and checkpoint")
    parser.add_argument("--steps", type=positive_int, default=d.steps, help="DDIM steps")
    parser.add_argument("--guidance", type=float_range(0.0), default=d.guidance,
                        help="classifier-free guidance scale")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress messages")
    t = parser.add_argument_group("training the toy models (--train)")
    t.add_argument("--train", action="store_true",
                   help="train the toy models instead (make train-lavieid): base, then the "
                        "four arms per seed, all with `avatar-kernels train lavieid`")
    t.add_argument("--train-only", default=None, metavar="base|seed:N",
                   help="run only the base, or only the four arms of one fine-tuning seed")


def run_demo(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    if args.train:
        from samplers.demo.lavieid_train import LaVieIDRecipe, train_lavieid

        seeds = LaVieIDRecipe().seeds
        allowed = ["base", *[f"seed:{s}" for s in seeds]]
        if args.train_only is not None and args.train_only not in allowed:
            raise OptionError(f"--train-only: expected one of {', '.join(allowed)}, got "
                              f"{args.train_only!r}")
        train_lavieid(out_dir=args.checkpoints, only=args.train_only)
        return 0
    from samplers.demo.lavieid_table import TableOptions, run_table

    opts = TableOptions(identities=args.identities, noise_seeds=args.noise_seeds,
                        steps=args.steps, guidance=args.guidance, device=device,
                        progress=not args.no_progress)
    paths = run_table(args.checkpoints, args.out, opts)
    print("wrote:")
    for name, path in paths.items():
        print(f"  {name:10s} {path}")
    return 0
