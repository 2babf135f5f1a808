"""Anchored Diffusion's ``avatar-kernels`` verbs: ``train``, ``sample``, ``eval`` and ``demo``.

``samplers/cli.py`` finds this module through its SYSTEMS table and calls
``add_<verb>_arguments(parser)`` and ``run_<verb>(args) -> int``.

    avatar-kernels train anchored --data videos/ --vae DIR --clip DIR --out ckpt.safetensors
    avatar-kernels sample anchored --checkpoint ckpt.safetensors --source face.png \\
        --driving drive.mp4 --out out.mp4 [--strategy anchored|multidiffusion] \\
        [--sampler ddim|ddpm] [--steps 50] [--guidance 1.0] [--vae DIR] [--clip DIR]
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
--clip also Self-CSIM (generated vs. driving), and CSIM when --source is given.

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
from pathlib import Path

import torch

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

    if args.clip is None:
        raise SystemExit("--data needs --clip DIR (CLIP embedding of the source frame)")
    over = dict(item.partition("=")[::2] for item in args.set)
    frames = int(over.get("frames", 4))
    vae = None if args.vae is None else FrameVAE.from_pretrained(args.vae)
    clip = CLIPEncoder.from_pretrained(args.clip)
    transform = VideoTransform(args.resolution, vae=vae, clip=clip)
    dataset = VideoFolderDataset(args.data, frames, mode="nonuniform", with_landmarks=True,
                                 transform=transform)
    return dataset, {"conditioner": args.conditioner or "clip-landmarks", "vae": vae is not None,
                     "resolution": args.resolution}


def clip_landmarks_conditioner(clip_dir, device="cpu"):
    from avatar_models.anchored_diffusion import landmark_control
    from avatar_models.conditioning import CLIPEncoder, detect_landmarks

    if clip_dir is None:
        raise SystemExit("this checkpoint's conditioner is clip-landmarks: pass --clip DIR")
    clip = CLIPEncoder.from_pretrained(clip_dir, device=device)

    @torch.no_grad()
    def conditioner(source, driving, *, global_dim, control_dim):
        src, _ = square_crop(source)
        drv, _ = square_crop(driving)
        g = clip.encode_images(src).float().cpu()[0]
        lm = detect_landmarks(drv, video_mode=True, on_missing="nan")
        return g, landmark_control(fill_missing(lm))

    return conditioner


def load_conditioner(spec: str, clip_dir=None, device="cpu"):
    if spec == "clip-landmarks":
        return clip_landmarks_conditioner(clip_dir, device)
    module, sep, name = spec.partition(":")
    if not sep:
        raise SystemExit(f"conditioner must be 'clip-landmarks' or MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), name)


# ---- train ----

DATA_FIELDS = ("in_channels", "input_size", "frames", "control_dim", "global_dim")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from avatar_models.training.anchored import TrainConfig

    d = TrainConfig()
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
    return video_training_dataset(args)


def run_train(args: argparse.Namespace) -> int:
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


# ---- sample ----



def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True, help="source image")
    parser.add_argument("--driving", type=Path, required=True, help="driving video")
    parser.add_argument("--out", type=Path, required=True, help="output .mp4")
    parser.add_argument("--strategy", choices=("anchored", "multidiffusion"), default="anchored")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="inference steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale (1: off)")
    parser.add_argument("--frames", type=int, default=None,
                        help="T per sequence (default: the model's)")
    parser.add_argument("--mode", choices=("random", "strided"), default="random",
                        help="non-uniform sequence layout (anchored)")
    parser.add_argument("--stride", type=int, default=None,
                        help="window stride (multidiffusion; default T//2)")
    parser.add_argument("--max-frames", type=int, default=None, help="use the first N frames")
    parser.add_argument("--vae", type=Path, default=None, help="AutoencoderKL folder")
    parser.add_argument("--clip", type=Path, default=None, help="CLIP folder (clip-landmarks)")
    parser.add_argument("--conditioner", default=None, help="override the checkpoint's")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--fps", type=float, default=None, help="default: the driving video's")
    parser.add_argument("--sheet", type=Path, default=None,
                        help="also write a contact sheet (driving over generated) PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--attention-backend", choices=("ref", "triton", "cuda"), default=None)
    parser.add_argument("--no-progress", action="store_true")


def load_model(path: Path, weights: str = "ema", device="cpu", attention_backend=None):
    """(SDiT in eval mode, checkpoint) from a ``train anchored`` checkpoint."""
    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, system="anchored")
    model = SDiT(SDiTConfig.from_dict(ckpt.config), attention_backend=attention_backend)
    model.load_state_dict(ckpt.weights(weights))
    return model.to(device).eval(), ckpt


def generate(args: argparse.Namespace):
    """Returns (video float [N, 3, h, w] in [-1, 1], driving uint8 [N, H, W, 3], fps)."""
    import torch

    from avatar_models.anchored_diffusion import Conditions
    from avatar_models.media import read_image, read_video
    from samplers.anchored import anchored_sample, decode_video, sdit_denoiser
    from samplers.multidiffusion import multidiffusion_sample, uniform_windows
    from samplers.nonuniform import gather_frames, nonuniform_plan
    from samplers.schedules import make_scheduler

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_model(args.checkpoint, args.weights, device, args.attention_backend)
    cfg = model.config
    spec = args.conditioner or ckpt.extra.get("conditioner")
    if not spec:
        raise SystemExit("the checkpoint does not record a conditioner: pass --conditioner")
    conditioner = load_conditioner(spec, args.clip, device)
    source = read_image(args.source)
    driving, fps = read_video(args.driving, with_audio=False)[:2]
    if args.max_frames:
        driving = driving[: args.max_frames]
    n = driving.shape[0]
    g, control = conditioner(source, driving, global_dim=cfg.global_dim,
                             control_dim=cfg.control_dim)
    g, control = g.to(device, torch.float32), control.to(device, torch.float32)
    t = args.frames or cfg.frames
    latent = (cfg.in_channels, cfg.input_size, cfg.input_size)
    decode = None
    if ckpt.extra.get("vae") or cfg.in_channels != 3:
        if args.vae is None:
            raise SystemExit("this checkpoint works on VAE latents: pass --vae DIR")
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
        den = sdit_denoiser(model, cond, guidance=args.guidance, amp=amp)
        lat = anchored_sample(den, sched, plan, latent, generator=gen, device=device,
                              progress=progress)
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


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from avatar_models.media import contact_sheet, to_uint8_frames, write_video

    video, driving, fps = generate(args)
    frames = to_uint8_frames(video)                                   # [N, h, w, 3]
    path = write_video(args.out, frames, fps, pad_to_even=True)
    print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
          f"{fps:g} fps)")
    if args.sheet is not None:
        h, w = frames.shape[1:3]
        drv = torch.nn.functional.interpolate(driving.permute(0, 3, 1, 2).float(), size=(h, w),
                                              mode="area").round().byte().permute(0, 2, 3, 1)
        contact_sheet([drv, frames], labels=["driving", args.strategy], path=args.sheet)
        print(f"wrote {args.sheet}")
    return 0


# ---- eval ----

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generated", type=Path, required=True, help="generated video")
    parser.add_argument("--driving", type=Path, required=True, help="driving video")
    parser.add_argument("--source", type=Path, default=None, help="source image (CSIM)")
    parser.add_argument("--clip", type=Path, default=None, help="CLIP folder (CSIM, Self-CSIM)")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--no-landmarks", action="store_true", help="skip LMSE metrics")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    parser.add_argument("--device", default="cpu")


def evaluate(args: argparse.Namespace) -> dict:
    from avatar_models import metrics
    from avatar_models.media import read_image, read_video

    gen = read_video(args.generated, with_audio=False).frames
    drv = read_video(args.driving, with_audio=False).frames
    n = min(gen.shape[0], drv.shape[0], args.max_frames or 1 << 30)
    gen, drv = gen[:n], drv[:n]
    out: dict = {"frames": n}
    if not args.no_landmarks:
        from avatar_models.conditioning import detect_landmarks

        lg = detect_landmarks(gen, on_missing="nan")
        ld = detect_landmarks(drv, on_missing="nan")
        ok = (lg.isfinite().flatten(1).all(1) & ld.isfinite().flatten(1).all(1))
        out["landmark_frames"] = int(ok.sum())
        out["lmse"] = metrics.lmse(lg, ld)
        out["expressive_lmse"] = metrics.expressive_lmse(lg, ld)
    if args.clip is not None:
        from avatar_models.conditioning import CLIPEncoder

        clip = CLIPEncoder.from_pretrained(args.clip, device=args.device)
        eg = clip.encode_images(gen).float().cpu()
        ed = clip.encode_images(drv).float().cpu()
        out["self_csim"] = metrics.self_csim(eg, ed) if n >= 2 else float("nan")
        if args.source is not None:
            es = clip.encode_images(read_image(args.source)).float().cpu()[0]
            out["csim"] = metrics.csim(es, eg)
    return out


def run_eval(args: argparse.Namespace) -> int:
    result = evaluate(args)
    for key, value in result.items():
        print(f"{key:>16}: {value:.6g}" if isinstance(value, float) else f"{key:>16}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
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


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_demo(args: argparse.Namespace) -> int:
    if args.train:
        from samplers.demo.train import DemoRecipe, train_demo

        recipe = DemoRecipe(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.train_seed)
        train_demo(recipe, args.checkpoint, progress=not args.no_progress)
        return 0

    from samplers.demo.pipeline import DemoOptions
    from samplers.demo.pipeline import run_demo as run_demo_pipeline

    if not args.checkpoint.is_file():
        raise SystemExit(f"demo checkpoint not found: {args.checkpoint} (run `make train-demo`, "
                         "or pass --checkpoint)")
    if args.frames < 2:
        raise SystemExit(f"--frames must be >= 2, got {args.frames}")
    opts = DemoOptions(frames=args.frames, steps=args.steps, guidance=args.guidance,
                       lengths=args.lengths, curve_seeds=args.curve_seeds,
                       fit_steps=args.fit_steps, seed=args.seed, checkpoint=args.checkpoint,
                       device=args.device, progress=not args.no_progress)
    paths = run_demo_pipeline(opts, args.out)
    print(f"\ndemo done in {opts.timings['total_seconds']:.0f} s; wrote:")
    for name, path in paths.items():
        print(f"  {name:15s} {path}")
    return 0
