"""The demo run: reenact a held-out procedural face with Anchored Diffusion and MultiDiffusion.

Inputs are regenerated deterministically from held-out seeds (never drawn in training): a source
identity, whose neutral portrait is the source image; a driving identity and motion, whose
``frames``-frame clip drives the reenactment through its landmark controls. Because the faces are
procedural, the ideal output exists too: the source identity rendered with the driving motion
(``truth``), which the metrics compare against (see :mod:`samplers.demo.metrics`).

Both methods sample the same checkpoint with DDIM, the same number of steps and the same noise
seed; only the long-video strategy differs (:func:`samplers.anchored.anchored_sample` over
non-uniform sequences sharing the central anchor frame, vs.
:func:`samplers.multidiffusion.multidiffusion_sample` over overlapping windows).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from avatar_models.data import procedural_faces as pf
from samplers.demo import metrics as M
from samplers.demo.train import CHECKPOINT

SOURCE_SEED = pf.HELD_OUT_SEED_BASE + 7
DRIVING_IDENTITY_SEED = pf.HELD_OUT_SEED_BASE + 11
DRIVING_MOTION_SEED = pf.HELD_OUT_SEED_BASE + 13
METHODS = ("anchored", "multidiffusion")
NEUTRAL = (0.0, 0.0, 0.0, 0.9, 0.9, 0.1, 0.3, 0.2)


@dataclass
class DemoOptions:
    frames: int = 48                      # driving clip length N
    steps: int = 25                       # DDIM steps
    guidance: float = 1.0                 # classifier-free guidance scale (1: off)
    lengths: tuple[int, ...] = (8, 16, 24, 32, 40, 48)  # consistency-vs-length curve
    curve_seeds: int = 4                  # noise seeds averaged per curve point
    fit_steps: int = 100                  # control estimator (generator fit) iterations
    seed: int = 0
    checkpoint: Path = CHECKPOINT
    device: str | None = None
    upscale: int = 4                      # mp4 and contact-sheet pixels per generated pixel
    fps: float = 12.0
    progress: bool = True
    timings: dict = field(default_factory=dict)


def inputs(frames: int) -> dict[str, torch.Tensor]:
    """Source portrait, driving clip and ideal output, all float [.., 3, 64, 64] in [0, 1]."""
    source_id = pf.sample_identity(SOURCE_SEED)
    params = pf.sample_motion(DRIVING_MOTION_SEED, frames)
    driving, _ = pf.render(pf.sample_identity(DRIVING_IDENTITY_SEED), params)
    truth, _ = pf.render(source_id, params)
    source, _ = pf.render(source_id, torch.tensor([NEUTRAL]))
    return dict(source=source[0], driving=driving, truth=truth, params=params,
                controls=pf.landmarks(params))


def load_model(path: Path, device: torch.device):
    """(SDiT with the EMA weights, checkpoint, autoencoder or None for pixel-space models)."""
    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.data.patch_pca import PatchPCA

    ckpt = load_checkpoint(path, system="anchored")
    model = SDiT(SDiTConfig.from_dict(ckpt.config))  # backend chosen by the registry
    model.load_state_dict(ckpt.weights("ema"))
    ae = ckpt.extra.get("autoencoder")
    ae = None if ae is None else PatchPCA.load(Path(path).parent / ae)
    return model.to(device).eval(), ckpt, ae


def identity_grid(model) -> int:
    """The source-thumbnail size the model was trained with (G = 3 * grid * grid values)."""
    return round((model.config.global_dim / 3) ** 0.5)


def reenact(model, schedule: dict | None, method: str, identity: torch.Tensor,
            controls: torch.Tensor, opts: DemoOptions, seed: int,
            device: torch.device, ae=None) -> torch.Tensor:
    """Video [N, 3, 64, 64] in [0, 1] from G [768] and per-frame controls [N, 40]."""
    from avatar_models.anchored_diffusion import Conditions
    from samplers.anchored import anchored_sample, decode_video, sdit_denoiser
    from samplers.multidiffusion import multidiffusion_sample, uniform_windows
    from samplers.nonuniform import gather_frames, nonuniform_plan
    from samplers.schedules import make_scheduler

    cfg = model.config
    n, t = controls.shape[0], cfg.frames
    g, ctrl = identity.to(device), controls.to(device)
    gen = torch.Generator().manual_seed(seed)
    sched = make_scheduler("ddim", schedule, opts.steps)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    amp = device.type == "cuda"
    if method == "anchored":
        plan = nonuniform_plan(n, t, mode="random", generator=gen)
        cond = Conditions(g[None].expand(plan.batch, -1), gather_frames(ctrl, plan))
        den = sdit_denoiser(model, cond, guidance=opts.guidance, amp=amp)
        lat = anchored_sample(den, sched, plan, shape, generator=gen, device=device,
                              progress=opts.progress)
        video = decode_video(lat, plan)
    elif method == "multidiffusion":
        windows = uniform_windows(n, t)
        cond = Conditions(g[None].expand(windows.shape[0], -1), ctrl[windows.to(device)])
        den = sdit_denoiser(model, cond, guidance=opts.guidance, amp=amp)
        video = multidiffusion_sample(den, sched, windows, n, shape, generator=gen,
                                      device=device, progress=opts.progress)
    else:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    video = video.float().cpu()
    if ae is not None:
        video = ae.decode(video)
    return (video.clamp(-1, 1) + 1) / 2


def _uint8(frames: torch.Tensor, upscale: int) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> uint8 [N, H*k, W*k, 3] (nearest-neighbour upscale)."""
    x = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.repeat_interleave(upscale, -1).repeat_interleave(upscale, -2)
    return x.permute(0, 2, 3, 1).contiguous()


def method_metrics(video: torch.Tensor, data: dict, ident: pf.FaceIdentity,
                   fit_steps: int) -> dict:
    fitted = M.fit_params(ident, video, steps=fit_steps)
    return {**M.consistency(video, data["source"], data["truth"]),
            **M.landmark_error(fitted, data["params"]), **M.fidelity(video, data["truth"])}


def consistency_curve(model, schedule, data: dict, videos: dict, opts: DemoOptions,
                      device: torch.device, ae=None) -> dict:
    """Self-CSIM and CSIM against video length, both methods, mean over ``curve_seeds``: every
    point is a separate reenactment of the first n driving frames (the full-length, seed-0 one
    is the main run)."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    lengths = sorted({min(max(2, n), opts.frames) for n in opts.lengths})
    g = pf.identity_embedding(data["source"], identity_grid(model))
    quiet = replace(opts, progress=False)
    jobs = [(m, n, s) for m in METHODS for n in lengths for s in range(opts.curve_seeds)]
    vals: dict[tuple[str, int], list[dict]] = {}
    for method, n, s in tqdm(jobs, desc="consistency vs. length", disable=not opts.progress):
        if n == opts.frames and s == 0:
            video = videos[method]
        else:
            video = reenact(model, schedule, method, g, data["controls"][:n], quiet,
                            opts.seed + s, device, ae)
        vals.setdefault((method, n), []).append(
            M.consistency(video, data["source"], data["truth"][:n]))
    curve = {"lengths": lengths, "seeds": opts.curve_seeds}
    for method in METHODS:
        curve[method] = {k: [sum(v[k] for v in vals[method, n]) / len(vals[method, n])
                             for n in lengths] for k in ("self_csim", "csim")}
    return curve


def plot_consistency(curve: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for ax, key, label in ((axes[0], "self_csim", "Self-CSIM (lower is better)"),
                           (axes[1], "csim", "CSIM to source (higher is better)")):
        for method, style in zip(METHODS, ("o-", "s--")):
            ax.plot(curve["lengths"], curve[method][key], style, label=method)
        ax.set_xlabel("video length (frames)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_demo(opts: DemoOptions, out: Path) -> dict[str, Path]:
    """Everything ``avatar-kernels demo`` does; returns the written paths by name."""
    from avatar_models.media import contact_sheet, write_video

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    model, ckpt, ae = load_model(Path(opts.checkpoint), device)
    schedule = ckpt.extra.get("diffusion")
    data = inputs(opts.frames)
    ident = pf.sample_identity(SOURCE_SEED)
    g = pf.identity_embedding(data["source"], identity_grid(model))
    videos, seconds = {}, {}
    _say(opts, f"reenacting a held-out face: {opts.frames} frames, {opts.steps} DDIM steps, "
               f"model {model.config.hidden}x{model.config.depth}, T={model.config.frames}, on "
               f"{device}")
    for method in METHODS:
        start = time.perf_counter()
        videos[method] = reenact(model, schedule, method, g, data["controls"], opts, opts.seed,
                                 device, ae)
        seconds[method] = round(time.perf_counter() - start, 2)
    _say(opts, "measuring control following (fitting the generator to every frame)")
    results = {m: method_metrics(videos[m], data, ident, opts.fit_steps) for m in METHODS}
    floor = M.landmark_error(M.fit_params(ident, data["truth"], steps=opts.fit_steps),
                             data["params"])
    curve = consistency_curve(model, schedule, data, videos, opts, device, ae)

    paths = {}
    for method in METHODS:
        paths[method] = write_video(out / f"{method}.mp4", _uint8(videos[method], opts.upscale),
                                    opts.fps)
    step = max(1, opts.frames // 12)
    k = max(1, opts.upscale // 2)
    rows = [_uint8(data["source"][None], k), _uint8(data["driving"][::step], k),
            _uint8(data["truth"][::step], k)] + [_uint8(videos[m][::step], k) for m in METHODS]
    paths["contact_sheet"] = out / "contact_sheet.png"
    contact_sheet(rows, labels=["source", "driving", "ideal", *METHODS],
                  path=paths["contact_sheet"])
    paths["consistency"] = plot_consistency(
        curve, out / "consistency.png",
        f"consistency vs. video length ({M.EMBEDDING} embedding, mean of {opts.curve_seeds} "
        f"seeds): toy-scale Figure 5")
    opts.timings.update(sample_seconds=seconds, total_seconds=round(time.perf_counter() - clock, 1))
    report = {
        "embedding": {"name": M.EMBEDDING, "about": M.EMBEDDING_ABOUT},
        "control_error": M.CONTROL_ABOUT,
        "methods": results,
        "estimator_floor": {**floor, "about": "control estimator run on the ideal frames"},
        "consistency_vs_length": curve,
        "inputs": {"source_identity_seed": SOURCE_SEED, "driving_identity_seed":
                   DRIVING_IDENTITY_SEED, "driving_motion_seed": DRIVING_MOTION_SEED,
                   "frames": opts.frames},
        "sampling": {"scheduler": "ddim", "steps": opts.steps, "guidance": opts.guidance,
                     "seed": opts.seed, "frames_per_sequence": model.config.frames,
                     "checkpoint": str(opts.checkpoint), "device": str(device),
                     "seconds": opts.timings},
    }
    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(_round(report), indent=1, default=str) + "\n")
    return paths


def _say(opts: DemoOptions, text: str) -> None:
    if opts.progress:
        print(text, flush=True)


def _round(x):
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def options_dict(opts: DemoOptions) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
