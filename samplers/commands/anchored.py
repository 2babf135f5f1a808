"""Anchored Diffusion's ``avatar-kernels`` verbs: ``train``, ``sample``, ``eval`` and ``demo``.

``samplers/cli.py`` finds this module through its SYSTEMS table and calls
``add_<verb>_arguments(parser)`` and ``run_<verb>(args) -> int``.

    avatar-kernels train anchored --data videos/ --vae DIR --clip DIR --out ckpt.safetensors
    avatar-kernels sample anchored --checkpoint ckpt.safetensors --source face.png \\
        --driving drive.mp4 --out out.mp4 [--strategy anchored|multidiffusion] \\
        [--sampler ddim|ddpm] [--steps 50] [--guidance 1.0] [--vae DIR] [--clip DIR]
        [--prompt TEXT (instead of --source) | --edit SOURCE_TEXT TARGET_TEXT [--edit-strength S]]
    avatar-kernels eval anchored --generated out.mp4 --driving drive.mp4 \\
        [--source face.png] [--clip DIR] [--json metrics.json]
    avatar-kernels demo [anchored] --out out   # what `make demo` runs
    avatar-kernels demo --train                # what `make train-demo` runs (rewrites assets/demo/)

train, data sources (one of):
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

sample: the checkpoint's metadata says how its conditions were built (``conditioner``; override
with --conditioner) and whether frames are VAE latents (then --vae is needed) or pixels.
A conditioner is ``fn(source uint8 [H, W, 3], driving uint8 [N, H, W, 3], *, global_dim,
control_dim) -> (global [G], control [N, L])``. Built in: ``clip-landmarks`` (CLIP image
embedding of the source, normalised MediaPipe landmarks of the driving frames); any other is
named ``MODULE:FUNCTION``.

eval: LMSE and Expressive-LMSE (MediaPipe landmarks of generated vs. driving frames) always; with
--clip also Self-CSIM (generated vs. driving), and CSIM when --source is given. A metric that
cannot be computed is null in the JSON, with the reason under ``skipped``.

Driving videos are centre-cropped to a square (:func:`square_crop`) everywhere: conditioning,
training, the contact sheet and eval's landmarks.

demo: reenacts a held-out procedural face with a 48-frame driving clip, once with Anchored
Diffusion and once with MultiDiffusion, using the tiny sDiT in ``assets/demo/``, and writes
``anchored.mp4``, ``multidiffusion.mp4``, ``contact_sheet.png``, ``metrics.json`` and
``consistency.png`` (consistency vs. video length: the toy-scale Figure 5 of the paper).
On a GPU machine the same command runs the fused kernels (the registry picks them). See
docs/demo.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
from pathlib import Path

import torch

from samplers.commands.train_options import add_engine_arguments
from samplers.commands.validation import (
    OptionError,
    add_device_argument,
    check_checkpoint_file,
    check_model_folder,
    check_video_file,
    dataclass_overrides,
    float_range,
    image_file,
    int_range,
    non_negative_float,
    non_negative_int,
    output_file,
    parse_assignments,
    positive_float,
    positive_int,
    print_note,
    probability,
    resolve_device,
)

MISSING_FACES_HELP = ("what to do with frames where MediaPipe finds no face: 'error' stops "
                      "naming the file and frame; '{other}' {effect} and reports how many")

# ---- conditioning and real-file plumbing (square crops, video transform) ----

def square_crop(frames: torch.Tensor, landmarks: torch.Tensor | None = None):
    """Centre square crop of uint8 [..., H, W, 3] frames; landmarks [..., 478, 3] (normalised to
    the uncropped frame) are re-normalised to the crop."""
    h, w = frames.shape[-3:-1]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    out = frames[..., top:top + s, left:left + s, :]
    if landmarks is None:
        return out, None
    lm = landmarks.clone().float()
    lm[..., 0] = (lm[..., 0] * w - left) / s
    lm[..., 1] = (lm[..., 1] * h - top) / s
    lm[..., 2] = lm[..., 2] * w / s
    return out, lm


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [..., S, S, 3] -> float [..., 3, size, size] in [-1, 1] (antialiased)."""
    from avatar_models.media import to_model_frames

    x = to_model_frames(frames)
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic",
                                            antialias=True, align_corners=False).clamp(-1, 1)
    return x.reshape(*lead, 3, size, size)


def check_faces(landmarks: torch.Tensor, where: str, *, allow: bool, option: str) -> int:
    """Number of frames of ``landmarks`` [N, 478, 3] without a face (NaN). When ``allow`` is
    False the first one raises NoFaceFoundError naming ``where`` and the frame."""
    from avatar_models.conditioning.landmarks import NoFaceFoundError

    missing = (~torch.isfinite(landmarks).flatten(1).all(1)).nonzero().flatten()
    if len(missing) and not allow:
        raise NoFaceFoundError(int(missing[0]), landmarks.shape[0], path=where,
                               hint=f"use a clip where the face is visible, or pass "
                                    f"{option} to go on without those frames")
    return len(missing)


def fill_missing(landmarks: torch.Tensor) -> torch.Tensor:
    """NaN frames (no face) take the nearest frame with a face (all NaN: unchanged)."""
    ok = torch.isfinite(landmarks).flatten(1).all(1)
    if bool(ok.all()) or not bool(ok.any()):
        return landmarks
    good = ok.nonzero().flatten()
    near = good[(torch.arange(len(ok))[:, None] - good[None]).abs().argmin(1)]
    return landmarks[near]


class VideoTransform:
    """VideoFolderDataset sample -> training dict (frames, control, global, mask)."""

    def __init__(self, resolution: int, vae=None, clip=None, latent_factor: int = 8):
        self.resolution, self.vae, self.clip, self.factor = resolution, vae, clip, latent_factor

    @torch.no_grad()
    def __call__(self, sample: dict) -> dict:
        from avatar_models.anchored_diffusion import landmark_control
        from avatar_models.conditioning.face_regions import EXPRESSIVE_REGIONS, region_masks

        frames, lm = square_crop(sample["frames"], sample["landmarks"])
        source, _ = square_crop(sample["source"])
        x = resize_frames(frames, self.resolution)                         # [T, 3, R, R]
        size = self.resolution
        if self.vae is not None:
            x = self.vae.encode(x[None].to(self.vae.device, self.vae.dtype))[0].float().cpu()
            size = x.shape[-1]
        glob = self.clip.encode_images(source).float().cpu()[0]
        mask = region_masks(lm, size, EXPRESSIVE_REGIONS).any(dim=-3)      # [T, h, w]
        return {"frames": x, "control": landmark_control(fill_missing(lm)), "global": glob,
                "mask": mask[:, None].float()}


def video_training_dataset(args: argparse.Namespace):
    from avatar_models.conditioning import CLIPEncoder, FrameVAE
    from avatar_models.data import VideoFolderDataset
    from avatar_models.data.video_folder import load_or_compute_landmarks

    frames = int(parse_assignments(args.set, "--set").get("frames", 4))
    dataset = VideoFolderDataset(args.data, frames, mode="nonuniform", with_landmarks=True)
    missing = total = 0
    for info in dataset.videos:  # landmarks are cached beside each video; training reuses them
        lms = torch.from_numpy(load_or_compute_landmarks(info.path)[0])
        missing += check_faces(lms, info.path, allow=args.missing_faces == "fill",
                               option="--missing-faces fill")
        total += lms.shape[0]
    if missing:
        print_note(f"{missing} of {total} frames in --data {args.data} have no face: they take "
                   f"the nearest frame's landmarks (zero control where a video has none)")
    vae = None if args.vae is None else FrameVAE.from_pretrained(args.vae)
    clip = CLIPEncoder.from_pretrained(args.clip)
    dataset.transform = VideoTransform(args.resolution, vae=vae, clip=clip)
    return dataset, {"conditioner": args.conditioner or "clip-landmarks", "vae": vae is not None,
                     "resolution": args.resolution}


def clip_landmarks_conditioner(clip_dir, device="cpu", *, driving_name: str = "driving video",
                               allow_missing_faces: bool = False, prompt: str | None = None,
                               edit: tuple[str, str] | None = None, edit_strength: float = 1.0):
    """G = the CLIP image embedding of the source; with ``prompt`` the CLIP text embedding of
    the prompt instead (text-to-video, paper section 4.4; the source may then be None); with
    ``edit`` = (source text, target text) the image embedding moved along the text direction
    (:func:`avatar_models.conditioning.clip.edit_embedding`, ``edit_strength``)."""
    from avatar_models.anchored_diffusion import landmark_control
    from avatar_models.conditioning import CLIPEncoder, detect_landmarks
    from avatar_models.conditioning.clip import edit_embedding

    if clip_dir is None:
        raise OptionError("this checkpoint's conditioner is clip-landmarks: pass --clip DIR")
    clip = CLIPEncoder.from_pretrained(clip_dir, device=device)

    @torch.no_grad()
    def conditioner(source, driving, *, global_dim, control_dim):
        drv, _ = square_crop(driving)
        if prompt is not None:
            g = clip.encode_text([prompt]).float().cpu()[0]
        else:
            g = clip.encode_images(square_crop(source)[0]).float().cpu()[0]
        if edit is not None:
            texts = clip.encode_text(list(edit)).float().cpu()
            g = edit_embedding(g, texts[0], texts[1], edit_strength)
        lm = detect_landmarks(drv, video_mode=True, on_missing="nan")
        missing = check_faces(lm, driving_name, allow=allow_missing_faces,
                              option="--missing-faces fill")
        if missing:
            print_note(f"{missing} of {lm.shape[0]} frames of {driving_name} have no face: they "
                       f"take the nearest frame's landmarks (zero control if none has a face)")
        return g, landmark_control(fill_missing(lm))

    return conditioner


def find_function(spec: str, option: str):
    """``MODULE:FUNCTION`` -> the function; OptionError naming ``option`` when it is not there."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise OptionError(f"{option} expects MODULE:FUNCTION, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise OptionError(f"{option} {spec}: module {exc.name!r} not found") from None
    except AttributeError:
        raise OptionError(f"{option} {spec}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise OptionError(f"{option} {spec}: {name!r} is not callable")
    return fn


def load_conditioner(spec: str, clip_dir=None, device="cpu", **clip_options):
    if spec == "clip-landmarks":
        return clip_landmarks_conditioner(clip_dir, device, **clip_options)
    return find_function(spec, "--conditioner")


# ---- train ----

DATA_FIELDS = ("in_channels", "input_size", "frames", "control_dim", "global_dim")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from avatar_models.anchored_diffusion import NAMED_CONFIGS
    from avatar_models.training.anchored import TrainConfig
    from avatar_models.training.diffusion import PREDICTION_TYPES

    d = TrainConfig()
    src = parser.add_argument_group("data (one of)")
    src.add_argument("--data", type=Path, help="folder of training videos")
    src.add_argument("--dataset", metavar="MODULE:FACTORY",
                     help="Python factory returning a dataset of sample dicts")
    src.add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="keyword argument for the --dataset factory (repeatable)")
    src.add_argument("--synthetic", type=positive_int, metavar="N", help="N procedural clips")
    parser.add_argument("--vae", type=Path, help="diffusers AutoencoderKL folder (--data)")
    parser.add_argument("--codec", type=Path, metavar="FILE",
                        help="patch-PCA codec (.safetensors, avatar_models.data.patch_pca) the "
                             "--dataset's latents come from; recorded in the checkpoint (relative "
                             "to its folder) so that `sample anchored` decodes with it")
    parser.add_argument("--clip", type=Path, help="CLIP vision model folder (--data)")
    parser.add_argument("--resolution", type=positive_int, default=256,
                        help="frame size for --data")
    parser.add_argument("--missing-faces", choices=("error", "fill"), default="error",
                        help=MISSING_FACES_HELP.format(
                            other="fill", effect="gives such frames the nearest frame's landmarks"))
    parser.add_argument("--conditioner", metavar="SPEC",
                        help="how `sample anchored` builds G and L_t from a source image and a "
                             "driving video: 'clip-landmarks' (default with --data) or "
                             "MODULE:FUNCTION (recorded in the checkpoint; required with "
                             "--dataset, where 'none' says the model is sampled by other code)")
    m = parser.add_argument_group("model")
    m.add_argument("--config", default=None, choices=sorted(NAMED_CONFIGS),
                   help="named sDiT config (default: sdit-xl/2; with --resume: the "
                        "checkpoint's)")
    m.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an SDiTConfig field, e.g. --set frames=8 (repeatable); with "
                        "--resume it applies on top of the checkpoint's config when the weights "
                        "still fit, else it is an error")
    t = parser.add_argument_group("optimisation (paper defaults)")
    t.add_argument("--mapping-lr-scale", type=non_negative_float, default=d.mapping_lr_scale,
                   help="mapping-network lr = lr * this (paper: 0.1)")
    t.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay,
                   help="AdamW weight decay")
    t.add_argument("--min-lr-ratio", type=probability, default=d.min_lr_ratio,
                   help="the cosine schedule decays to lr * this")
    t.add_argument("--lambda-ex", type=non_negative_float, default=d.lambda_ex,
                   help="extra loss weight on expressive regions (weight 1 + lambda_ex)")
    t.add_argument("--cond-drop", type=probability, default=d.cond_drop,
                   help="probability of dropping the conditions (for classifier-free guidance)")
    t.add_argument("--num-workers", type=non_negative_int, default=d.num_workers,
                   help="DataLoader workers")
    t.add_argument("--attention-backend", choices=("ref", "triton", "cuda"), default=None,
                   help="force one attention backend (default: the registry's choice)")
    t.add_argument("--num-train-timesteps", type=positive_int,
                   default=d.schedule.num_train_timesteps, help="diffusion timesteps")
    t.add_argument("--beta-schedule", choices=("linear", "scaled_linear"),
                   default=d.schedule.beta_schedule, help="diffusion beta schedule")
    t.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   default=d.schedule.prediction_type,
                   help="what the model predicts: epsilon (the paper's) or v_prediction; "
                        "recorded in the checkpoint's schedule, which the samplers follow")
    o = parser.add_argument_group("output")
    o.add_argument("--out", type=output_file(".safetensors"), required=True,
                   help="checkpoint path (.safetensors)")
    add_engine_arguments(t, o, d.engine_config())
    add_device_argument(o)
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def validate_train_args(args: argparse.Namespace) -> dict:
    """Every check that needs no model: returns the --set overrides (checked against the
    named config's field types). Raises OptionError / FileNotFoundError naming the option."""
    from avatar_models.anchored_diffusion import NAMED_CONFIGS, SDiTConfig

    args.device = str(resolve_device(args.device))
    chosen = [x for x in (args.data, args.dataset, args.synthetic) if x is not None]
    if len(chosen) != 1:
        raise OptionError("give exactly one of --data, --dataset, --synthetic")
    overrides = dataclass_overrides(SDiTConfig, args.set, "--set",
                                    defaults=NAMED_CONFIGS[args.config or DEFAULT_CONFIG])
    if args.dataset is not None:
        if not args.conditioner:
            raise OptionError("--dataset needs --conditioner MODULE:FUNCTION (how `sample "
                              "anchored` turns a source image and a driving video into this "
                              "dataset's conditions; it is recorded in the checkpoint), or "
                              "--conditioner none for a model sampled by other code")
        find_function(args.dataset, "--dataset")
        parse_assignments(args.dataset_arg, "--dataset-arg")
    if args.conditioner not in (None, "clip-landmarks", "none"):
        find_function(args.conditioner, "--conditioner")
    if args.data is not None:
        if not args.data.is_dir():
            raise FileNotFoundError(f"--data {str(args.data)!r}: folder not found")
        if args.clip is None:
            raise OptionError("--data needs --clip DIR (CLIP embedding of the source frame)")
        check_model_folder(args.clip, "--clip", "clip")
        if args.vae is not None:
            check_model_folder(args.vae, "--vae", "vae")
    if args.codec is not None:
        if args.vae is not None:
            raise OptionError("--codec and --vae are two latent codecs: give one")
        check_codec_file(args.codec, "--codec")
    return overrides


def check_codec_file(path: Path, option: str) -> None:
    """A patch-PCA codec file (FileNotFoundError / OptionError naming ``option``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {str(path)!r}: patch-PCA codec file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise OptionError(f"{option} {str(path)!r}: not a safetensors file ({exc})") from None
    if fmt != "avatar-kernels/patch-pca-1":
        raise OptionError(f"{option} {str(path)!r}: expected a patch-PCA codec (format "
                          f"'avatar-kernels/patch-pca-1'), got format {fmt!r}")


def codec_entry(codec: Path, checkpoint: Path) -> dict:
    """The checkpoint's ``codec`` entry: the file relative to the checkpoint's folder."""
    import os

    rel = os.path.relpath(Path(codec).resolve(), Path(checkpoint).resolve().parent)
    return {"kind": "patch-pca", "file": rel}


DEFAULT_CONFIG = "sdit-xl/2"


def resumed_config(args: argparse.Namespace, overrides: dict):
    """The model config of a --resume run: the checkpoint's, with --set applied where the
    weights still fit (a field no parameter shape depends on, e.g. frames); anything else raises
    OptionError naming the field. --config must be the checkpoint's."""
    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.training.run_state import find_checkpoint

    try:
        found = find_checkpoint(args.resume)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError(str(err)) from None
    if found.state.get("system") != "anchored":
        raise OptionError(f"--resume {str(args.resume)!r} is a {found.state.get('system')!r} "
                          f"run, expected 'anchored'")
    saved = SDiTConfig.from_dict(found.state["config"])
    if args.config is not None and args.config != saved.name:
        raise OptionError(f"--config {args.config}: --resume {str(args.resume)!r} trains "
                          f"{saved.name!r}; drop --config (the checkpoint's applies)")
    cfg = SDiTConfig.from_dict({**saved.to_dict(), **overrides})

    def shapes(c):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in SDiT(c).state_dict().items()}

    if overrides and shapes(cfg) != shapes(saved):
        changed = {k: (getattr(saved, k), v) for k, v in overrides.items()
                   if getattr(saved, k) != v}
        asked = ", ".join(f"{k}={new}" for k, (_, new) in changed.items())
        had = ", ".join(f"{k}={old}" for k, (old, _) in changed.items())
        raise OptionError(f"--set with --resume: {asked} changes the model's weight shapes (the "
                          f"checkpoint has {had}); resume without it or start a new run")
    for k, v in overrides.items():
        if getattr(saved, k) != v:
            print_note(f"--set {k}={v} applies on resume (the checkpoint had {k}="
                       f"{getattr(saved, k)}; the weights fit)")
    return cfg


def infer_data_fields(sample: dict) -> dict:
    """SDiTConfig fields implied by one training sample."""
    frames = sample["frames"]
    if frames.dim() != 4 or frames.shape[-1] != frames.shape[-2]:
        raise OptionError(f"the dataset's sample 'frames' must be [T, C, H, W] with H == W, got "
                          f"{list(frames.shape)}")
    return {"frames": frames.shape[0], "in_channels": frames.shape[1],
            "input_size": frames.shape[-1], "control_dim": sample["control"].shape[-1],
            "global_dim": sample["global"].shape[-1]}


def build_dataset(args: argparse.Namespace):
    """(dataset, extra metadata describing how conditions were built)."""
    if args.synthetic is not None:
        from avatar_models.training.synthetic import BlobSequences

        over = parse_assignments(args.set, "--set")
        kw = {k: over[k] for k in ("frames", "control_dim", "global_dim") if k in over}
        if "in_channels" in over:
            kw["channels"] = over["in_channels"]
        if "input_size" in over:
            kw["size"] = over["input_size"]
        spec = args.conditioner or "avatar_models.training.synthetic:stats_conditioner"
        return BlobSequences(args.synthetic, seed=args.seed, **kw), {"conditioner": spec}
    if args.dataset is not None:
        kwargs = parse_assignments(args.dataset_arg, "--dataset-arg")
        return find_function(args.dataset, "--dataset")(**kwargs), {
            "conditioner": None if args.conditioner == "none" else args.conditioner,
            "dataset": args.dataset, "dataset_args": kwargs}
    return video_training_dataset(args)


def run_train(args: argparse.Namespace) -> int:
    """Train on the engine (:mod:`avatar_models.training.engine`); under ``torchrun`` every
    process runs this same function (DDP, or FSDP2 with --fsdp)."""
    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.training.anchored import TrainConfig, train_anchored
    from avatar_models.training.diffusion import DiffusionSchedule
    from avatar_models.training.distributed import teardown_world

    overrides = validate_train_args(args)
    resumed = None if args.resume is None else resumed_config(args, overrides)
    dataset, extra = build_dataset(args)
    if args.codec is not None:
        extra["codec"] = codec_entry(args.codec, args.out)
    from torch.utils.data import IterableDataset

    indexable = hasattr(dataset, "__getitem__") and not isinstance(dataset, IterableDataset)
    first = dataset[0] if indexable else next(iter(dataset))
    inferred = infer_data_fields(first)
    if resumed is None:
        cfg = SDiTConfig.from_name(args.config or DEFAULT_CONFIG, **{**inferred, **overrides})
    else:
        cfg = resumed
        wrong = {k: (v, getattr(cfg, k)) for k, v in inferred.items()
                 if (v > cfg.frames if k == "frames" else v != getattr(cfg, k))}
        if wrong:
            raise OptionError(f"--resume: the dataset's samples do not fit the checkpoint's "
                              f"model (field: data, model): {wrong}")
    schedule = DiffusionSchedule(num_train_timesteps=args.num_train_timesteps,
                                 beta_schedule=args.beta_schedule,
                                 prediction_type=args.prediction_type)
    train = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        mapping_lr_scale=args.mapping_lr_scale, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, lambda_ex=args.lambda_ex,
        cond_drop=args.cond_drop, ema_decay=args.ema_decay, grad_clip=args.grad_clip,
        amp=args.amp, seed=args.seed, save_every=args.checkpoint_every,
        keep_last=args.keep_last,
        grad_accum=args.grad_accum, activation_checkpointing=args.activation_checkpointing,
        fsdp=args.fsdp, num_workers=args.num_workers,
        attention_backend=args.attention_backend, schedule=schedule)
    with torch.device("meta"):
        params = sum(p.numel() for p in SDiT(cfg).parameters())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"training anchored {cfg.name} ({params / 1e6:.2f}M parameters): {cfg}")
    try:
        train_anchored(cfg, dataset, train, device=args.device, out=args.out, extra=extra,
                       progress=not args.no_progress, resume=args.resume)
    finally:
        teardown_world()
    return 0


# ---- sample ----

def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a `train anchored` checkpoint (.safetensors); its metadata names "
                             "the conditioner and whether it works on VAE latents")
    parser.add_argument("--source", type=image_file, default=None,
                        help="source image (required unless --prompt)")
    parser.add_argument("--prompt", metavar="TEXT", default=None,
                        help="text-to-video: G = the CLIP text embedding of TEXT instead of the "
                             "source's image embedding (clip-landmarks checkpoints; --clip with "
                             "a tokenizer)")
    parser.add_argument("--edit", nargs=2, metavar=("SOURCE_TEXT", "TARGET_TEXT"), default=None,
                        help="CLIP-guided editing: G = normalize(CLIP(source) + S * (CLIP(TARGET"
                             "_TEXT) - CLIP(SOURCE_TEXT))), e.g. --edit 'a photo of a woman' "
                             "'a photo of a woman with glasses'")
    parser.add_argument("--edit-strength", type=non_negative_float, default=None, metavar="S",
                        help="S of --edit (default 1.0)")
    parser.add_argument("--driving", type=Path, required=True,
                        help="driving video (at least 2 frames)")
    parser.add_argument("--out", type=output_file(".mp4"), required=True, help="output .mp4")
    parser.add_argument("--strategy", choices=("anchored", "multidiffusion"), default="anchored",
                        help="long-video strategy")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim",
                        help="diffusion sampler")
    parser.add_argument("--steps", type=positive_int, default=50, help="inference steps")
    parser.add_argument("--eta", type=probability, default=0.0, help="DDIM eta")
    parser.add_argument("--guidance", type=float_range(0.0), default=1.0,
                        help="classifier-free guidance scale (1: off)")
    parser.add_argument("--frames", type=int_range(2), default=None,
                        help="T per sequence, 2 to the model's T (default: the model's)")
    parser.add_argument("--mode", choices=("random", "strided"), default="random",
                        help="non-uniform sequence layout (anchored)")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="window stride, 1 to T (multidiffusion; default T//2)")
    parser.add_argument("--max-frames", type=int_range(2), default=None,
                        help="use the first N frames of the driving video (default: all)")
    parser.add_argument("--vae", type=Path, default=None,
                        help="AutoencoderKL folder (checkpoints trained on latents)")
    parser.add_argument("--clip", type=Path, default=None, help="CLIP folder (clip-landmarks)")
    parser.add_argument("--conditioner", default=None,
                        help="MODULE:FUNCTION or clip-landmarks (default: the checkpoint's)")
    parser.add_argument("--missing-faces", choices=("error", "fill"), default="error",
                        help=MISSING_FACES_HELP.format(
                            other="fill", effect="gives such frames the nearest frame's landmarks"))
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="EMA or raw weights")
    parser.add_argument("--fps", type=positive_float, default=None,
                        help="output frame rate (default: the driving video's)")
    parser.add_argument("--sheet", type=output_file(".png"), default=None,
                        help="also write a contact sheet (driving over generated) PNG")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    add_device_argument(parser)
    parser.add_argument("--attention-backend", choices=("ref", "triton", "cuda"), default=None,
                        help="force one attention backend (default: the registry's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--parallel", action="store_true",
                        help="anchor-parallel sampling under torchrun: the anchored sequences "
                             "are split over the processes, the anchor frame's hidden states "
                             "broadcast in every layer; rank 0 writes the video (same result "
                             "as one process)")


def validate_sample_args(args: argparse.Namespace) -> dict:
    """Every check that needs no model, from the options, the checkpoint's header and the
    driving video's header; returns the checkpoint metadata. Sets ``args.device``."""
    args.device = resolve_device(args.device)
    if getattr(args, "parallel", False) and args.strategy != "anchored":
        raise OptionError("--parallel splits the anchored sequences over processes: it needs "
                          "--strategy anchored")
    meta = check_checkpoint_file(args.checkpoint, "--checkpoint", "anchored")
    model_frames = int(meta["config"]["frames"])
    t = args.frames or model_frames
    if t > model_frames:
        raise OptionError(f"--frames {t}: this checkpoint's model has frames={model_frames} (its "
                          f"temporal position table); use --frames 2 to {model_frames}")
    if args.stride is not None:
        if args.strategy != "multidiffusion":
            raise OptionError("--stride is the window stride of --strategy multidiffusion; "
                              "drop it or add --strategy multidiffusion")
        if args.stride > t:
            raise OptionError(f"--stride {args.stride}: windows of T={t} frames must overlap or "
                              f"touch; use --stride 1 to {t}")
    check_video_file(args.driving, "--driving", min_frames=2)
    check_text_options(args)
    spec = args.conditioner or meta["extra"].get("conditioner")
    if not spec:
        raise OptionError(f"--checkpoint {str(args.checkpoint)!r} does not record a conditioner "
                          f"(trained with --conditioner none): pass --conditioner "
                          f"MODULE:FUNCTION")
    if spec == "clip-landmarks":
        if args.clip is None:
            raise OptionError("this checkpoint's conditioner is clip-landmarks: pass --clip DIR")
        folder = check_model_folder(args.clip, "--clip", "clip")
        if (args.prompt or args.edit) and not any(
                (folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise OptionError(f"--{'prompt' if args.prompt else 'edit'} needs a CLIP tokenizer: "
                              f"--clip {str(args.clip)!r} has no tokenizer.json or vocab.json")
    else:
        if args.prompt or args.edit:
            raise OptionError(f"--{'prompt' if args.prompt else 'edit'} needs a checkpoint whose "
                              f"G is a CLIP embedding (conditioner clip-landmarks); this one's "
                              f"conditioner is {spec!r}")
        find_function(spec, "--conditioner")
    codec = sample_codec(args.checkpoint, meta["extra"])
    if codec is not None:
        if args.vae is not None:
            raise OptionError(f"--checkpoint {str(args.checkpoint)!r} decodes with its patch-PCA "
                              f"codec ({codec}): drop --vae")
        check_codec_file(codec, "the codec of --checkpoint")
    elif meta["extra"].get("vae") or meta["config"].get("in_channels") != 3:
        if args.vae is None:
            raise OptionError(f"--checkpoint {str(args.checkpoint)!r} works on VAE latents: pass "
                              f"--vae DIR")
        check_model_folder(args.vae, "--vae", "vae")
    return meta


def check_text_options(args: argparse.Namespace) -> None:
    """--source / --prompt / --edit / --edit-strength combinations."""
    if args.prompt is not None and args.edit is not None:
        raise OptionError("--prompt and --edit exclude each other: --prompt replaces the "
                          "source's G, --edit moves it")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise OptionError("--prompt: expected a non-empty text")
        if args.source is not None:
            raise OptionError("--prompt replaces --source (G comes from the text): drop one")
    elif args.source is None:
        raise OptionError("give --source IMAGE (or --prompt TEXT for text-to-video)")
    if args.edit is not None and not all(t.strip() for t in args.edit):
        raise OptionError(f"--edit: expected two non-empty texts, got {args.edit}")
    if args.edit_strength is not None and args.edit is None:
        raise OptionError("--edit-strength is the strength of --edit: add --edit SOURCE_TEXT "
                          "TARGET_TEXT or drop it")


def sample_codec(checkpoint: Path, extra: dict) -> Path | None:
    """The patch-PCA codec file a checkpoint records (``codec``, or the demo's older
    ``autoencoder`` entry), resolved against the checkpoint's folder; None for VAE or pixel
    checkpoints."""
    codec = extra.get("codec") or {}
    name = codec.get("file") if codec.get("kind") == "patch-pca" else extra.get("autoencoder")
    return None if name is None else Path(checkpoint).parent / name


def load_model(path: Path, weights: str = "ema", device="cpu", attention_backend=None):
    """(SDiT in eval mode, checkpoint) from a ``train anchored`` checkpoint."""
    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, system="anchored")
    model = SDiT(SDiTConfig.from_dict(ckpt.config), attention_backend=attention_backend)
    model.load_state_dict(ckpt.weights(weights))
    return model.to(device).eval(), ckpt


def generate(args: argparse.Namespace, meta: dict):
    """Returns (video float [N, 3, h, w] in [-1, 1], driving uint8 [N, H, W, 3], fps).
    ``args`` and ``meta`` come from :func:`validate_sample_args`."""
    from avatar_models.anchored_diffusion import Conditions
    from avatar_models.media import read_image, read_video
    from samplers.anchored import (
        anchored_sample,
        decode_video,
        sdit_denoiser,
        sharded_sdit_denoiser,
    )
    from samplers.multidiffusion import multidiffusion_sample, uniform_windows
    from samplers.nonuniform import gather_frames, nonuniform_plan
    from samplers.schedules import make_scheduler

    device = args.device
    spec = args.conditioner or meta["extra"]["conditioner"]
    text = {} if spec != "clip-landmarks" else dict(
        prompt=args.prompt, edit=None if args.edit is None else tuple(args.edit),
        edit_strength=1.0 if args.edit_strength is None else args.edit_strength)
    conditioner = load_conditioner(spec, args.clip, device, driving_name=str(args.driving),
                                   allow_missing_faces=args.missing_faces == "fill", **text)
    source = None if args.source is None else read_image(args.source)
    driving, fps = read_video(args.driving, with_audio=False)[:2]
    if args.max_frames:
        driving = driving[: args.max_frames]
    n = driving.shape[0]
    cfg_dims = meta["config"]
    g, control = conditioner(source, driving, global_dim=cfg_dims["global_dim"],
                             control_dim=cfg_dims["control_dim"])
    model, ckpt = load_model(args.checkpoint, args.weights, device, args.attention_backend)
    cfg = model.config
    g, control = g.to(device, torch.float32), control.to(device, torch.float32)
    t = args.frames or cfg.frames
    latent = (cfg.in_channels, cfg.input_size, cfg.input_size)
    decode = None
    codec = sample_codec(args.checkpoint, ckpt.extra)
    if codec is not None:
        from avatar_models.data.patch_pca import PatchPCA

        pca = PatchPCA.load(codec)
        decode = lambda z: pca.decode(z.float().cpu()).to(z.device)
    elif ckpt.extra.get("vae") or cfg.in_channels != 3:
        from avatar_models.conditioning import FrameVAE

        vae = FrameVAE.from_pretrained(args.vae, device=device)
        decode = lambda z: vae.decode(z[None].to(vae.dtype))[0].float()
    gen = torch.Generator().manual_seed(args.seed)
    sched = make_scheduler(args.sampler, ckpt.extra.get("diffusion"), args.steps, eta=args.eta)
    amp = device.type == "cuda"
    progress = not args.no_progress
    if args.strategy == "anchored":
        plan = nonuniform_plan(n, t, mode=args.mode, generator=gen)
        cond = Conditions(g[None].expand(plan.batch, -1), gather_frames(control, plan))
        make_denoiser = sharded_sdit_denoiser if args.parallel else sdit_denoiser
        den = make_denoiser(model, cond, guidance=args.guidance, amp=amp)
        lat = anchored_sample(den, sched, plan, latent, generator=gen, device=device,
                              progress=progress)
        if args.parallel and torch.distributed.get_rank() != 0:
            return None, driving, args.fps or fps          # rank 0 decodes and writes
        with torch.no_grad():
            video = decode_video(lat, plan, decode)
    else:
        windows = uniform_windows(n, t, args.stride)
        cond = Conditions(g[None].expand(windows.shape[0], -1), control[windows.to(device)])
        den = sdit_denoiser(model, cond, guidance=args.guidance, amp=amp)
        lat = multidiffusion_sample(den, sched, windows, n, latent, generator=gen, device=device,
                                    progress=progress)
        with torch.no_grad():
            video = lat if decode is None else torch.cat(
                [decode(lat[i:i + 8]) for i in range(0, n, 8)])
    return video.clamp(-1, 1).cpu(), driving, args.fps or fps


def driving_sheet_row(driving: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] driving frames -> [N, height, width, 3]: the same centre square crop
    the conditioning sees (:func:`square_crop`), then area-resized."""
    square, _ = square_crop(driving)
    x = torch.nn.functional.interpolate(square.permute(0, 3, 1, 2).float(),
                                        size=(height, width), mode="area")
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous()


def run_sample(args: argparse.Namespace) -> int:
    from avatar_models.media import contact_sheet, to_uint8_frames, write_video

    meta = validate_sample_args(args)
    if args.parallel:
        from avatar_models.training.distributed import setup_world, teardown_world

        world = setup_world(args.device)      # cuda:LOCAL_RANK for each process
        args.device = world.device
        if not world.distributed:
            print_note("--parallel: one process (not started by torchrun), nothing to split")
            args.parallel = False
        args.no_progress = args.no_progress or not world.is_main
        try:
            video, driving, fps = generate(args, meta)
        finally:
            teardown_world()
        if not world.is_main:
            return 0
    else:
        video, driving, fps = generate(args, meta)
    frames = to_uint8_frames(video)                                   # [N, h, w, 3]
    path = write_video(args.out, frames, fps, pad_to_even=True)
    print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
          f"{fps:g} fps)")
    if args.sheet is not None:
        drv = driving_sheet_row(driving, *frames.shape[1:3])
        contact_sheet([drv, frames], labels=["driving", args.strategy], path=args.sheet)
        print(f"wrote {args.sheet}")
    return 0


# ---- eval ----

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generated", type=Path, required=True, help="generated video")
    parser.add_argument("--driving", type=Path, required=True, help="driving video")
    parser.add_argument("--source", type=image_file, default=None,
                        help="source image (CSIM; needs --clip)")
    parser.add_argument("--clip", type=Path, default=None, help="CLIP folder (CSIM, Self-CSIM)")
    parser.add_argument("--max-frames", type=positive_int, default=None,
                        help="use the first N frames (default: all)")
    parser.add_argument("--no-landmarks", action="store_true", help="skip LMSE metrics")
    parser.add_argument("--missing-faces", choices=("error", "skip"), default="error",
                        help=MISSING_FACES_HELP.format(
                            other="skip", effect="leaves such frames out of the LMSE metrics"))
    parser.add_argument("--json", type=output_file(".json"), default=None,
                        help="also write the metrics here (strict JSON: null for a metric "
                             "that could not be computed)")
    add_device_argument(parser)


def validate_eval_args(args: argparse.Namespace) -> None:
    args.device = resolve_device(args.device)
    check_video_file(args.generated, "--generated", min_frames=1)
    check_video_file(args.driving, "--driving", min_frames=1)
    if args.source is not None and args.clip is None:
        raise OptionError("--source is only used for CSIM, which needs --clip DIR: add --clip or "
                          "drop --source")
    if args.clip is not None:
        check_model_folder(args.clip, "--clip", "clip")


def evaluate(args: argparse.Namespace) -> dict:
    """The metrics dict; metrics that could not be computed are None, with the reason in
    ``result["skipped"][name]``."""
    from avatar_models import metrics
    from avatar_models.media import read_image, read_video

    gen = read_video(args.generated, with_audio=False).frames
    drv = read_video(args.driving, with_audio=False).frames
    n = min(gen.shape[0], drv.shape[0], args.max_frames or 1 << 30)
    # the generated frames are square; the driving ones get the crop the conditioning used
    gen, drv = square_crop(gen[:n])[0], square_crop(drv[:n])[0]
    out: dict = {"frames": n}
    skipped: dict[str, str] = {}
    if not args.no_landmarks:
        from avatar_models.conditioning import detect_landmarks

        allow = args.missing_faces == "skip"
        lg = detect_landmarks(gen, on_missing="nan")
        ld = detect_landmarks(drv, on_missing="nan")
        check_faces(lg, str(args.generated), allow=allow, option="--missing-faces skip")
        check_faces(ld, str(args.driving), allow=allow, option="--missing-faces skip")
        ok = (lg.isfinite().flatten(1).all(1) & ld.isfinite().flatten(1).all(1))
        out["landmark_frames"] = int(ok.sum())
        if int(ok.sum()) < n:
            print_note(f"LMSE metrics skip {n - int(ok.sum())} of {n} frames without a face in "
                       f"the generated or the driving video")
        out["lmse"] = metrics.lmse(lg, ld)
        out["expressive_lmse"] = metrics.expressive_lmse(lg, ld)
        if not ok.any():
            skipped["lmse"] = skipped["expressive_lmse"] = "no frame has a face in both videos"
    if args.clip is not None:
        from avatar_models.conditioning import CLIPEncoder

        clip = CLIPEncoder.from_pretrained(args.clip, device=args.device)
        eg = clip.encode_images(gen).float().cpu()
        ed = clip.encode_images(drv).float().cpu()
        if n >= 2:
            out["self_csim"] = metrics.self_csim(eg, ed)
        else:
            out["self_csim"] = None
            skipped["self_csim"] = f"needs at least 2 frames, the videos have {n}"
        if args.source is not None:
            es = clip.encode_images(read_image(args.source)).float().cpu()[0]
            out["csim"] = metrics.csim(es, eg)
    else:
        print_note("CSIM and Self-CSIM need --clip DIR: not computed")
    for name, value in out.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[name] = None
            skipped.setdefault(name, "not finite")
    if skipped:
        out["skipped"] = skipped
    return out


def run_eval(args: argparse.Namespace) -> int:
    validate_eval_args(args)
    result = evaluate(args)
    for key, value in result.items():
        if key == "skipped":
            continue
        if value is None:
            value = f"n/a ({result['skipped'][key]})"
        print(f"{key:>16}: {value:.6g}" if isinstance(value, float) else f"{key:>16}: {value}")
    for key, why in result.get("skipped", {}).items():
        if key not in result:
            print_note(f"{key} not computed: {why}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, allow_nan=False))
    return 0


# ---- demo ----

def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected lengths >= 2, got {text!r}")
    return values


def _methods(text: str) -> tuple[str, ...]:
    from samplers.demo.pipeline import METHODS

    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in METHODS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of "
                                         f"{','.join(METHODS)}, got {text!r}")
    return values


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from samplers.demo.pipeline import DemoOptions
    from samplers.demo.train import CHECKPOINT, DemoRecipe

    d, r = DemoOptions(), DemoRecipe()
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                        help="demo model (default: the bundled assets/demo checkpoint); with "
                             "--train, where the trained model is written")
    parser.add_argument("--frames", type=int_range(2), default=d.frames,
                        help="driving clip length")
    parser.add_argument("--steps", type=positive_int, default=d.steps, help="DDIM steps")
    parser.add_argument("--guidance", type=float_range(0.0), default=d.guidance,
                        help="classifier-free guidance scale (1: off)")
    parser.add_argument("--pairs", type=positive_int, default=d.pairs,
                        help="held-out identity/driver pairs (intervals over pairs; the "
                             "fixed evaluation protocol uses 8)")
    parser.add_argument("--methods", type=_methods, default=d.methods,
                        help="comma-separated long-video strategies, all with the same model, "
                             "steps, seed and guidance")
    parser.add_argument("--world", choices=("plain", "fine"), default=None,
                        help="toy world of the held-out pairs (default: the checkpoint's; "
                             "plain for checkpoints that record none)")
    parser.add_argument("--context", type=non_negative_int, default=None,
                        help="context frames of autoregressive chaining (default: T // 2)")
    parser.add_argument("--lmse-stride", type=positive_int, default=d.lmse_stride,
                        help="the control estimator fits every k-th frame")
    parser.add_argument("--lengths", type=_lengths, default=None,
                        help="also the Self-CSIM/CSIM-vs-length curve at these lengths, e.g. "
                             "8,16,24,32,40,48 (off by default)")
    parser.add_argument("--curve-seeds", type=positive_int, default=d.curve_seeds,
                        help="noise seeds averaged per consistency-curve point")
    parser.add_argument("--fit-steps", type=positive_int, default=d.fit_steps,
                        help="iterations of the control estimator (generator fit)")
    parser.add_argument("--seed", type=int, default=d.seed, help="noise seed")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    t = parser.add_argument_group("training the demo model (--train)")
    t.add_argument("--train", action="store_true",
                   help="train the demo model instead (writes --checkpoint, loss.json, loss.png)")
    t.add_argument("--train-steps", type=positive_int, default=r.steps, help="optimiser steps")
    t.add_argument("--batch-size", type=positive_int, default=r.batch_size, help="batch size")
    t.add_argument("--lr", type=positive_float, default=r.lr, help="peak learning rate")
    t.add_argument("--train-seed", type=int, default=r.seed, help="training seed")
    t.add_argument("--train-world", choices=("plain", "fine"), default=r.world,
                   help="toy world to train on")
    t.add_argument("--train-prediction-type", choices=("epsilon", "v_prediction"),
                   default=r.prediction_type,
                   help="what the model predicts (docs/demo.md, 'Why the fidelity target is "
                        "missed')")


def run_demo(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    if args.train:
        from samplers.demo.train import DemoRecipe, train_demo

        if args.checkpoint.suffix != ".safetensors":
            raise OptionError(f"--checkpoint {str(args.checkpoint)!r} must end in .safetensors")
        recipe = DemoRecipe(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.train_seed, world=args.train_world,
                            prediction_type=args.train_prediction_type)
        train_demo(recipe, args.checkpoint, progress=not args.no_progress)
        return 0

    from samplers.demo.pipeline import DemoOptions
    from samplers.demo.pipeline import run_demo as run_demo_pipeline

    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {str(args.checkpoint)!r}: demo checkpoint not "
                                f"found (run `make train-demo`, or pass --checkpoint)")
    meta = check_checkpoint_file(args.checkpoint, "--checkpoint", "anchored")
    t = int(meta["config"]["frames"])
    if args.frames < 2 * t:
        raise OptionError(f"--frames {args.frames}: the anchor-transfer diagnostic needs frames "
                          f"T = {t} or more from the anchor; use --frames {2 * t} or more")
    if args.context is not None and args.context >= min(t, args.frames):
        raise OptionError(f"--context {args.context}: autoregressive windows have T={t} frames; "
                          f"use --context 0 to {min(t, args.frames) - 1}")
    opts = DemoOptions(frames=args.frames, steps=args.steps, guidance=args.guidance,
                       pairs=args.pairs, methods=args.methods, world=args.world,
                       context=args.context, lmse_stride=args.lmse_stride,
                       lengths=args.lengths or (), curve_seeds=args.curve_seeds,
                       fit_steps=args.fit_steps, seed=args.seed, checkpoint=args.checkpoint,
                       device=device, progress=not args.no_progress)
    paths = run_demo_pipeline(opts, args.out)
    print(f"\ndemo done in {opts.timings['total_seconds']:.0f} s; wrote:")
    for name, path in paths.items():
        print(f"  {name:15s} {path}")
    return 0
