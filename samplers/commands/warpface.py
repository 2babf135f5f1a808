"""WarpFace's ``avatar-kernels`` verbs: ``train``, ``sample`` and ``edit``.

``samplers/cli.py`` finds this module through its SYSTEMS table.

    avatar-kernels train warpface --config tiny --out runs/warpface.safetensors
    avatar-kernels train warpface --cross-attention --out runs/ca.safetensors      # Table 3 row 2
    avatar-kernels train warpface --no-time-modulation --out runs/notime.safetensors  # row 4
    avatar-kernels sample warpface --checkpoint runs/warpface.safetensors --source face.png \\
        --driving talk.mp4 --out out.mp4 [--relative] [--steps 40 --guidance 2.5]
    avatar-kernels edit warpface --checkpoint runs/warpface.safetensors --source face.png \\
        --group 1 [--vector 37] --range -2 2 --count 9 --out-dir edits/
    avatar-kernels edit warpface ... --canonical --out-dir canonical/

train data: same-identity pairs of the procedural toy faces (:class:`WarpFacePairs`), encoded by
a patch-PCA codec (``--codec FILE``, or one fitted on toy frames at the start of the run and
saved as ``<out stem>.codec.safetensors``; its path is recorded in the checkpoint).

sample / edit: images and video frames are centre-cropped to a square and resized to the codec's
input (latent size x patch), encoded, reenacted by DDIM with CFG, decoded. ``sample`` writes an
mp4 at the driving video's frame rate with its audio when it has some (a still driving image
gives a one-frame mp4). ``edit`` writes one PNG per value and ``motion.json`` (theta and alpha).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from samplers.commands.train_options import (
    add_model_and_output_arguments,
    base_model_config,
    engine_config_from_args,
)
from samplers.commands.validation import (
    _IMAGE_SUFFIXES,
    OptionError,
    add_device_argument,
    check_checkpoint_file,
    check_model_folder,
    check_sd15_folder_option,
    check_video_file,
    dataclass_overrides,
    float_range,
    image_file,
    input_file,
    output_file,
    positive_int,
    print_note,
    probability,
    resolve_device,
)

DEFAULT_CONFIG = "tiny"
TOY_FPS = 25.0
CODEC_FIT_FRAMES = 512


def codec_path_for(out: Path) -> Path:
    return out.with_name(out.stem + ".codec.safetensors")


# ---- train ----

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from avatar_models.training.engine import EngineConfig
    from avatar_models.warpface import WarpFaceConfig, WarpFaceTrainConfig

    d = WarpFaceTrainConfig()
    arm = parser.add_argument_group("ablation arms (Table 3)")
    arm.add_argument("--cross-attention", action="store_true",
                     help="plain cross-attention of the same motion tokens instead of WarpCA "
                          "(row 2)")
    arm.add_argument("--no-time-modulation", action="store_true",
                     help="drop Eq. 9's timestep modulation of the motion (row 4)")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--lambda-sym", type=float_range(0.0), default=d.lambda_sym,
                      help="weight of the symmetry loss (Eq. 13)")
    loss.add_argument("--tau", type=float_range(0.0), default=d.tau,
                      help="adaptive weight floor tau (Eq. 12)")
    loss.add_argument("--epsilon", type=float_range(0.0), default=d.epsilon,
                      help="adaptive weight strength epsilon (Eq. 12)")
    loss.add_argument("--condition-drop", type=probability, default=d.condition_drop,
                      help="share of pairs trained with theta = 0 (the CFG unconditional "
                           "branch)")
    data = parser.add_argument_group("data")
    data.add_argument("--min-gap", type=positive_int, default=d.min_gap,
                      help="smallest source-driving distance in frames (6 > 0.2 s at 25 fps)")
    data.add_argument("--clip-frames", type=positive_int, default=d.clip_frames,
                      help="frames per toy clip the pairs are drawn from")
    data.add_argument("--jitter", type=float_range(0.0, 1.0), default=d.jitter,
                      help="appearance jitter of MGME's inputs (0: off)")
    codec = data.add_mutually_exclusive_group()
    codec.add_argument("--codec", type=input_file("a patch-PCA codec", (".safetensors",)),
                       help="patch-PCA codec file (default: fit one on toy frames and save it "
                            "beside --out)")
    codec.add_argument("--vae", type=Path, default=None,
                       help="encode with this diffusers AutoencoderKL folder instead (e.g. "
                            "SD's VAE; toy frames are resized to latent_size x 8)")
    # the toy trains from scratch (the paper fine-tunes SD1.5 at lr 2e-5, batch 72, 50k steps)
    m, t = add_model_and_output_arguments(
        parser, config_class=WarpFaceConfig, default_config=DEFAULT_CONFIG,
        engine_defaults=EngineConfig(steps=2000, batch_size=8, lr=1e-4, ema_decay=0.999,
                                     grad_clip=1.0), set_example="groups=2")
    m.add_argument("--init", type=input_file("a checkpoint", (".safetensors",)),
                   help="start from this warpface checkpoint's weights (its config is used)")
    m.add_argument("--sd15", type=Path, default=None,
                   help="start both UNets from a local Stable Diffusion 1.5 folder (its unet/, "
                        "diffusers UNet2DConditionModel weights; nothing downloads); needs "
                        "SD-shaped configs, e.g. --config paper --vae SD_DIR/vae")
    t.add_argument("--warp-backend", choices=("ref", "triton", "cuda"), default=None,
                   help="force one warp_occlusion backend")


def validate_train_args(args: argparse.Namespace):
    """Every check that needs no model: returns (model config, train config)."""
    from avatar_models.data import procedural_faces as pf
    from avatar_models.warpface import WarpFaceConfig, WarpFaceTrainConfig

    args.device = str(resolve_device(args.device))
    base, _ = base_model_config(args, "warpface", WarpFaceConfig, DEFAULT_CONFIG)
    overrides = dataclass_overrides(WarpFaceConfig, args.set, "--set", defaults=base)
    if args.cross_attention:
        overrides["motion_attention"] = "cross"
    if args.no_time_modulation:
        overrides["time_modulation"] = False
    try:
        cfg = WarpFaceConfig.from_dict({**base, **overrides})
        train = WarpFaceTrainConfig(
            lambda_sym=args.lambda_sym, tau=args.tau, epsilon=args.epsilon,
            condition_drop=args.condition_drop, min_gap=args.min_gap,
            clip_frames=args.clip_frames, jitter=args.jitter)
    except (TypeError, ValueError) as exc:
        raise OptionError(str(exc)) from None
    if args.sd15 is not None:
        check_sd15_option(args, cfg)
    if args.vae is not None:
        folder = check_model_folder(args.vae, "--vae", "vae")
        vae_cfg = json.loads((folder / "config.json").read_text())
        factor = 2 ** (len(vae_cfg.get("block_out_channels", (0,))) - 1)
        size = cfg.latent_size * factor
        if vae_cfg.get("latent_channels") != cfg.in_channels:
            raise OptionError(f"--vae gives {vae_cfg.get('latent_channels')} latent channels, "
                              f"the model takes in_channels={cfg.in_channels} (use --set "
                              f"in_channels=...)")
        if pf.SIZE % size and size % pf.SIZE:
            raise OptionError(f"--vae: latent_size {cfg.latent_size} x {factor} = {size} px "
                              f"must divide {pf.SIZE} or be a multiple of it (toy frames)")
        return cfg, train
    if pf.SIZE % cfg.latent_size:
        raise OptionError(f"the toy frames are {pf.SIZE} px: latent_size must divide it, got "
                          f"{cfg.latent_size}")
    patch = pf.SIZE // cfg.latent_size
    if cfg.in_channels > 3 * patch * patch:
        raise OptionError(f"a {patch}x{patch} patch-PCA codec has at most {3 * patch * patch} "
                          f"channels, the config asks for in_channels={cfg.in_channels}")
    if args.codec is not None:
        codec = load_codec(args.codec, "--codec")
        check_codec(codec, cfg, "--codec")
    return cfg, train


def check_sd15_option(args: argparse.Namespace, cfg) -> None:
    """--sd15: a UNet2DConditionModel folder whose config.json matches the model config."""
    from avatar_models.warpface_sd15 import check_sd15_config

    if args.init is not None:
        raise OptionError("--sd15 and --init both set the starting weights; pass one")
    check_sd15_folder_option(args.sd15, lambda sd_config, where: check_sd15_config(
        cfg, sd_config, where))


def load_codec(path: Path, option: str):
    from avatar_models.data.patch_pca import PatchPCA

    try:
        return PatchPCA.load(path)
    except (ValueError, OSError) as exc:
        raise OptionError(f"{option} {str(path)!r}: {exc}") from None


def load_vae(path: Path, device):
    from avatar_models.conditioning import FrameVAE, VAECodec

    return VAECodec(FrameVAE.from_pretrained(path, device=device))


def check_codec(codec, cfg, option: str) -> None:
    if codec.channels != cfg.in_channels:
        raise OptionError(f"{option}: the codec gives {codec.channels} channels, the model "
                          f"takes in_channels={cfg.in_channels}")


def run_train(args: argparse.Namespace) -> int:
    from avatar_models.data import procedural_faces as pf
    from avatar_models.data.patch_pca import PatchPCA
    from avatar_models.training.distributed import teardown_world
    from avatar_models.training.engine import train
    from avatar_models.warpface import WarpFace, WarpFacePairs, warpface_system

    cfg, tcfg = validate_train_args(args)
    codec_record = {}
    if args.vae is not None:
        codec = load_vae(args.vae, args.device)
        codec_record["vae"] = str(Path(args.vae).resolve())
    elif args.codec is not None:
        codec = load_codec(args.codec, "--codec")
        codec_record["codec"] = str(Path(args.codec).resolve())
    else:
        codec_path = codec_path_for(args.out)
        codec = PatchPCA.fit(pf.autoencoder_fit_frames(CODEC_FIT_FRAMES, seed=args.seed),
                             cfg.in_channels, patch=pf.SIZE // cfg.latent_size)
        if int(os.environ.get("RANK", "0")) == 0:
            codec.save(codec_path)
            print_note(f"fitted a patch-PCA codec on {CODEC_FIT_FRAMES} toy frames: "
                       f"{codec_path}")
        codec_record["codec"] = str(codec_path.resolve())
    dataset = WarpFacePairs(codec, size=cfg.latent_size * codec.patch, min_gap=tcfg.min_gap,
                            clip_frames=tcfg.clip_frames, jitter=tcfg.jitter, seed=args.seed)
    torch.manual_seed(args.seed)
    model = WarpFace(cfg, attention_backend=args.attention_backend,
                     warp_backend=args.warp_backend)
    if args.init is not None:
        from avatar_models.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(args.init, system="warpface").weights("ema"))
    sd15 = None
    if args.sd15 is not None:
        from avatar_models.warpface_sd15 import load_sd15_unets

        sd15 = load_sd15_unets(model, args.sd15)
        if int(os.environ.get("RANK", "0")) == 0:
            print_note(f"loaded {sd15['loaded']} SD1.5 tensors from {sd15['folder']} into "
                       f"ReferenceNet and DenoisingNet ({sd15['kept_init']} new UNet tensors "
                       f"keep their init)")
    if int(os.environ.get("RANK", "0")) == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"training warpface {cfg.name} ({params / 1e6:.2f}M parameters, "
              f"{cfg.motion_attention}, time modulation {cfg.time_modulation})")
    extra = {"data": {"kind": "toy", "fps": TOY_FPS}, **codec_record,
             "init": None if args.init is None else str(args.init),
             "sd15": None if sd15 is None else sd15["folder"]}
    try:
        train(warpface_system(model, dataset, tcfg, extra), engine_config_from_args(args),
              out=args.out, resume=args.resume)
    finally:
        teardown_world()
    return 0


# ---- shared by sample and edit ----

def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a `train warpface` checkpoint (.safetensors)")
    parser.add_argument("--source", type=image_file, required=True, help="source portrait")
    parser.add_argument("--codec", type=Path, default=None,
                        help="patch-PCA codec (default: the one the checkpoint records)")
    parser.add_argument("--vae", type=Path, default=None,
                        help="AutoencoderKL folder, for checkpoints trained on VAE latents "
                             "(default: the one the checkpoint records)")
    parser.add_argument("--steps", type=positive_int, default=40, help="DDIM steps")
    parser.add_argument("--guidance", type=float_range(0.0), default=2.5,
                        help="classifier-free guidance scale (1: off; unconditional: theta = 0)")
    parser.add_argument("--batch", type=positive_int, default=8, help="frames per batch")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="EMA or raw weights")
    parser.add_argument("--seed", type=int, default=0,
                        help="noise seed (one noise shared by every frame)")
    add_device_argument(parser)
    parser.add_argument("--attention-backend", choices=("ref", "triton", "cuda"), default=None,
                        help="force one attention backend")
    parser.add_argument("--warp-backend", choices=("ref", "triton", "cuda"), default=None,
                        help="force one warp_occlusion backend")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _validate_model_args(args: argparse.Namespace):
    """Checkpoint, config and codec, checked before any model loads: (config, codec)."""
    from avatar_models.warpface import WarpFaceConfig

    args.device = resolve_device(args.device)
    meta = check_checkpoint_file(args.checkpoint, "--checkpoint", "warpface")
    try:
        cfg = WarpFaceConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise OptionError(f"--checkpoint {str(args.checkpoint)!r}: bad model config: "
                          f"{exc}") from None
    recorded_vae = meta["extra"].get("vae")
    if recorded_vae is not None or args.vae is not None:
        if args.codec is not None:
            raise OptionError("this checkpoint works on VAE latents: pass --vae, not --codec")
        folder = check_model_folder(Path(args.vae or recorded_vae),
                                    "--vae" if args.vae else "the checkpoint's --vae", "vae")
        codec = load_vae(folder, args.device)
        check_codec(codec, cfg, "--vae")
        return cfg, codec
    option = "--codec"
    if args.codec is None:
        recorded = meta["extra"].get("codec")
        if recorded is None:
            raise OptionError("the checkpoint records no codec: pass --codec FILE")
        args.codec, option = Path(recorded), "the checkpoint's codec"
        beside = Path(args.checkpoint).parent / args.codec.name
        if not args.codec.is_file() and beside.is_file():   # a moved checkout: same folder
            args.codec = beside
    if not Path(args.codec).is_file():
        raise OptionError(f"{option} {str(args.codec)!r}: file not found (pass --codec FILE)")
    codec = load_codec(args.codec, option)
    check_codec(codec, cfg, option)
    return cfg, codec


def _load_model(args, cfg):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.warpface import WarpFace

    model = WarpFace(cfg, attention_backend=args.attention_backend,
                     warp_backend=args.warp_backend)
    model.load_state_dict(load_checkpoint(args.checkpoint, system="warpface")
                          .weights(args.weights))
    return model.to(args.device).eval()


def _encode(frames_uint8: torch.Tensor, cfg, codec) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> latents [..., C, h, w] (centre square crop, resize)."""
    from samplers.commands.anchored import resize_frames, square_crop

    square, _ = square_crop(frames_uint8)
    with torch.no_grad():
        return codec.encode(resize_frames(square, cfg.latent_size * codec.patch)).float()


def _decode(latents: torch.Tensor, codec) -> torch.Tensor:
    """latents [L, C, h, w] -> uint8 [L, H, W, 3]."""
    from avatar_models.media import to_uint8_frames

    with torch.no_grad():
        return to_uint8_frames(codec.decode(latents.float().cpu()).clamp(-1, 1))


def _settings(args):
    from samplers.warpface import SampleSettings

    return SampleSettings(steps=args.steps, guidance=args.guidance, batch=args.batch)


# ---- sample ----

def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--driving", type=Path, required=True,
                        help="driving image or video (reenacted frame by frame)")
    parser.add_argument("--out", type=output_file(".mp4"), required=True, help="output .mp4")
    parser.add_argument("--relative", action="store_true",
                        help="relative motion theta_(r->d_i) - theta_(r->d_1)")
    parser.add_argument("--max-frames", type=positive_int, default=None,
                        help="reenact only the first N driving frames")
    parser.add_argument("--fps", type=float_range(0.0, low_open=True), default=TOY_FPS,
                        help="frame rate for a still driving image")


def validate_sample_args(args: argparse.Namespace):
    cfg, codec = _validate_model_args(args)
    driving = Path(args.driving)
    if not driving.is_file():
        raise FileNotFoundError(f"--driving {str(driving)!r}: file not found")
    args.driving_is_image = driving.suffix.lower() in _IMAGE_SUFFIXES
    if not args.driving_is_image:
        check_video_file(driving, "--driving", min_frames=1)
    return cfg, codec


def run_sample(args: argparse.Namespace) -> int:
    from avatar_models.media import read_image, read_video, write_video
    from samplers.warpface import reenact

    cfg, codec = validate_sample_args(args)
    source = _encode(read_image(args.source), cfg, codec)                # [C, h, w]
    audio = rate = None
    fps = args.fps
    if args.driving_is_image:
        frames = read_image(args.driving)[None]                           # [1, H, W, 3]
    else:
        video = read_video(args.driving, mono=True)
        frames, fps, audio, rate = video.frames, video.fps, video.audio, video.sample_rate
    if args.max_frames is not None:
        frames = frames[: args.max_frames]
    driving = _encode(frames, cfg, codec)                                 # [L, C, h, w]
    model = _load_model(args, cfg)
    latents = reenact(model, source, driving, relative=args.relative, settings=_settings(args),
                      generator=torch.Generator().manual_seed(args.seed), device=args.device,
                      progress=not args.no_progress)
    if audio is not None:
        audio = audio[:, : int(round(frames.shape[0] / fps * rate))]
    write_video(args.out, _decode(latents, codec), fps, audio=audio, sample_rate=rate)
    print(f"wrote {args.out} ({frames.shape[0]} frames, {fps:g} fps"
          f"{', with audio' if audio is not None else ''})")
    return 0


# ---- edit ----

def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--group", type=positive_int, default=None,
                      help="subspace G_k to sweep, 1..K (all its coefficients, or --vector)")
    what.add_argument("--canonical", action="store_true",
                      help="render theta = theta_(s->r), the canonical pose (appendix E)")
    parser.add_argument("--vector", type=positive_int, default=None,
                        help="sweep only vector V_n of the group, 1..N_k")
    parser.add_argument("--range", type=float, nargs=2, default=(-2.0, 2.0),
                        metavar=("LOW", "HIGH"), help="sweep range in units of std(alpha_k)")
    parser.add_argument("--count", type=positive_int, default=9, help="images in the sweep")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="folder for the PNGs and motion.json")


def validate_edit_args(args: argparse.Namespace):
    cfg, codec = _validate_model_args(args)
    if args.group is not None and args.group > cfg.groups:
        raise OptionError(f"--group must be in 1..{cfg.groups}, got {args.group}")
    if args.vector is not None:
        if args.group is None:
            raise OptionError("--vector needs --group")
        if args.vector > cfg.codebook_size:
            raise OptionError(f"--vector must be in 1..{cfg.codebook_size}, got {args.vector}")
    low, high = args.range
    if not low <= high:
        raise OptionError(f"--range LOW HIGH needs LOW <= HIGH, got {low} {high}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise OptionError(f"--out-dir {str(args.out_dir)!r} is a file; expected a folder")
    return cfg, codec


def run_edit(args: argparse.Namespace) -> int:
    from avatar_models.media import read_image, write_image
    from avatar_models.warpface import motion_json
    from samplers.warpface import (
        canonical_condition,
        edit_conditions,
        encode_motion,
        render_conditions,
    )

    cfg, codec = validate_edit_args(args)
    source = _encode(read_image(args.source), cfg, codec)                # [C, h, w]
    model = _load_model(args, cfg)
    code = encode_motion(model, source[None].to(args.device))
    if args.canonical:
        values, conditions = [], canonical_condition(code)
        names = ["canonical"]
    else:
        values = torch.linspace(args.range[0], args.range[1], args.count).tolist()
        with torch.no_grad():
            conditions = edit_conditions(code, model.mgme.orthonormal_codebooks(),
                                         args.group - 1, values,
                                         None if args.vector is None else args.vector - 1)
        tag = f"G{args.group}" + ("" if args.vector is None else f"V{args.vector}")
        names = [f"{tag}_{i:03d}_{v:+.2f}std" for i, v in enumerate(values)]
    latents = render_conditions(model, source, conditions, _settings(args),
                                generator=torch.Generator().manual_seed(args.seed),
                                device=args.device, progress=not args.no_progress)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in zip(names, _decode(latents, codec)):
        write_image(args.out_dir / f"{name}.png", frame)
    record = {**motion_json(code), "group": args.group, "vector": args.vector,
              "values_std": values, "canonical": bool(args.canonical),
              "images": [f"{n}.png" for n in names]}
    (args.out_dir / "motion.json").write_text(json.dumps(record))
    print(f"wrote {len(names)} image(s) and motion.json to {args.out_dir}")
    return 0


# ---- demo ----

def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from samplers.demo.warpface import ASSETS, ArmRecipe, EvalOptions

    d = EvalOptions()
    parser.add_argument("--assets", type=Path, default=ASSETS,
                        help="folder of the <arm>_s<seed>.safetensors checkpoints (with --train: "
                             "where they are written)")
    parser.add_argument("--out", type=Path, default=Path("out/warpface"),
                        help="folder for metrics.json and the plots")
    parser.add_argument("--pairs", type=positive_int, default=d.pairs,
                        help="held-out identity pairs (intervals over pairs)")
    parser.add_argument("--frames", type=positive_int, default=d.frames,
                        help="driving frames per pair and mode, 5 frames apart (the issue's full "
                             "protocol: 20)")
    parser.add_argument("--steps", type=positive_int, default=d.steps, help="DDIM steps")
    parser.add_argument("--guidance", type=float_range(0.0), default=d.guidance,
                        help="classifier-free guidance scale (1: off)")
    parser.add_argument("--fit-steps", type=positive_int, default=d.fit_steps,
                        help="iterations of the pose / expression fit")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="skip the K x parameter sensitivity sweeps")
    parser.add_argument("--seed", type=int, default=d.seed, help="noise seed")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="quiet")
    parser.add_argument("--train", action="store_true",
                        help="train every arm and seed of the toy recipe into --assets instead "
                             "(`make train-warpface`)")
    parser.add_argument("--train-steps", type=positive_int, default=ArmRecipe().steps,
                        help="with --train: optimiser steps per run (the shipped recipe's "
                             "default; more than the CPU budget gives better-trained arms)")
    parser.add_argument("--runs", default=None,
                        help="with --train: only these runs, comma-separated <arm>_s<seed> (e.g. "
                             "warpca_s0,cross_s1; default: every arm and seed); each writes its "
                             "entry into the folder's training.json")


def parse_runs(text: str) -> list[tuple[str, int]]:
    """``warpca_s0,cross_s1`` -> [("warpca", 0), ("cross", 1)]; OptionError naming a bad item."""
    from samplers.demo.warpface import ARM_FLAGS

    runs = []
    for item in text.split(","):
        arm, sep, seed = item.strip().rpartition("_s")
        if not sep or arm not in ARM_FLAGS or not seed.isdigit():
            raise OptionError(f"--runs: {item!r} must be <arm>_s<seed> with arm one of "
                              f"{tuple(ARM_FLAGS)} and an integer seed (e.g. warpca_s0)")
        runs.append((arm, int(seed)))
    return runs


def run_demo(args: argparse.Namespace) -> int:
    from samplers.demo.warpface import ArmRecipe, EvalOptions, evaluate, train_arms

    if args.runs is not None and not args.train:
        raise OptionError("--runs needs --train")
    if args.train:
        recipe = ArmRecipe(steps=args.train_steps)
        runs = None if args.runs is None else parse_runs(args.runs)
        record = train_arms(recipe, folder=args.assets, runs=runs)
        print(f"trained {len(record['runs'])} runs into {args.assets} "
              f"({record['total_train_seconds']:.0f} s of training)")
        return 0
    if args.pairs < 2:
        raise OptionError(f"--pairs must be >= 2 (intervals over pairs), got {args.pairs}")
    options = EvalOptions(pairs=args.pairs, frames=args.frames, steps=args.steps,
                          guidance=args.guidance, seed=args.seed, fit_steps=args.fit_steps,
                          sensitivity=not args.no_sensitivity)
    evaluate(args.assets, args.out, options, device=resolve_device(args.device),
             progress=not args.no_progress)
    return 0
