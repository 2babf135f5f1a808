"""``avatar-kernels sample anchored``: reenact a source image with a driving video.

    avatar-kernels sample anchored --checkpoint ckpt.safetensors --source face.png \\
        --driving drive.mp4 --out out.mp4 [--strategy anchored|multidiffusion] \\
        [--sampler ddim|ddpm] [--steps 50] [--guidance 1.0] [--vae DIR] [--clip DIR]

The checkpoint's metadata says how its conditions were built (``conditioner``; override with
--conditioner) and whether frames are VAE latents (then --vae is needed) or pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SYSTEMS = ("anchored",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("system", choices=SYSTEMS)
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
    from samplers.commands._anchored_io import load_conditioner
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


def run(args: argparse.Namespace) -> int:
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
