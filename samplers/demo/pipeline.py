"""The demo run: reenact held-out procedural faces with Anchored Diffusion and its baselines.

Inputs are regenerated deterministically from held-out seeds (never drawn in training): for each
of ``pairs`` identity/driver pairs, a source identity, whose neutral portrait is the source
image; a driving identity and motion, whose ``frames``-frame clip drives the reenactment through
its landmark controls. Because the faces are procedural, the ideal output exists too: the source
identity rendered with the driving motion (``truth``), which the metrics compare against (see
:mod:`samplers.demo.metrics` and docs/demo.md, "Metrics (fixed before results)").

Every method (``METHODS``) samples the same checkpoint with DDIM, the same steps, guidance and
noise seed; only the long-video strategy differs: :func:`samplers.anchored.anchored_sample`
over non-uniform sequences sharing the central anchor frame; MultiDiffusion over overlapping
windows; independent windows (the floor: windows that only touch); autoregressive chaining with
frame replacement (an extra, not in the paper; :mod:`samplers.autoregressive`).
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
PAIR_SEED_STEP = 100  # pair k uses the seeds above + k * PAIR_SEED_STEP
METHODS = ("anchored", "multidiffusion", "independent", "autoregressive")
# `make demo` (under 3 minutes on 2 cores) leaves out autoregressive chaining, the slowest arm
# (one window per T // 2 frames, each fully denoised) and not in the paper; `make demo-report`
# runs all four.
QUICK_METHODS = ("anchored", "multidiffusion", "independent")
NEUTRAL = (0.0, 0.0, 0.0, 0.9, 0.9, 0.1, 0.3, 0.2)
# distances |i - j| at which the drift curve is reported (those below the video length)
DRIFT_DISTANCES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 191)
# the claim is testable only when anchored sampling's anchor-transfer interval lies above this
TRANSFER_FLOOR = 0.05


@dataclass
class DemoOptions:
    frames: int = 48                      # driving clip length N
    steps: int = 25                       # DDIM steps
    guidance: float = 1.0                 # classifier-free guidance scale (1: off)
    pairs: int = 2                        # held-out identity/driver pairs (report: >= 8)
    methods: tuple[str, ...] = QUICK_METHODS
    world: str | None = None              # None: the checkpoint's (plain for old checkpoints)
    context: int | None = None            # autoregressive context frames (None: T // 2)
    lmse_stride: int = 4                  # the control estimator fits every k-th frame
    lengths: tuple[int, ...] = ()         # optional Self-CSIM-vs-length curve (old Figure 5)
    curve_seeds: int = 4                  # noise seeds averaged per curve point
    fit_steps: int = 100                  # control estimator (generator fit) iterations
    seed: int = 0
    checkpoint: Path = CHECKPOINT
    device: str | None = None
    upscale: int = 4                      # mp4 and contact-sheet pixels per generated pixel
    fps: float = 12.0
    progress: bool = True
    timings: dict = field(default_factory=dict)


def pair_seeds(pair: int) -> dict[str, int]:
    """Held-out seeds of identity/driver pair ``pair`` (pair 0: the original demo's)."""
    k = pair * PAIR_SEED_STEP
    return {"source_identity_seed": SOURCE_SEED + k,
            "driving_identity_seed": DRIVING_IDENTITY_SEED + k,
            "driving_motion_seed": DRIVING_MOTION_SEED + k}


def inputs(frames: int, pair: int = 0, world: str = "plain") -> dict:
    """Source portrait, driving clip and ideal output (float [.., 3, 64, 64] in [0, 1]), the
    driving parameters and controls, G (:func:`procedural_faces.global_condition` of the
    neutral portrait), the source identity and the region masks of the ideal clip."""
    seeds = pair_seeds(pair)
    source_id = pf.sample_identity(seeds["source_identity_seed"], world)
    params = pf.sample_motion(seeds["driving_motion_seed"], frames)
    driving, _ = pf.render(pf.sample_identity(seeds["driving_identity_seed"], world), params)
    truth, _ = pf.render(source_id, params)
    neutral = torch.tensor([NEUTRAL])
    source, _ = pf.render(source_id, neutral)
    return dict(source=source[0], driving=driving, truth=truth, params=params,
                controls=pf.landmarks(params), identity=source_id,
                regions=pf.region_masks(source_id, params), seeds=seeds,
                global_condition=lambda grid: pf.global_condition(source_id, neutral, grid)[0])


def load_model(path: Path, device: torch.device):
    """(SDiT with the EMA weights, checkpoint, autoencoder or None for pixel-space models)."""
    from avatar_models.anchored_diffusion import SDiT, SDiTConfig
    from avatar_models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, system="anchored")
    model = SDiT(SDiTConfig.from_dict(ckpt.config))  # backend chosen by the registry
    model.load_state_dict(ckpt.weights("ema"))
    return model.to(device).eval(), ckpt, load_codec(ckpt.extra, Path(path))


def load_codec(extra: dict, checkpoint: Path):
    """The patch-PCA codec a checkpoint records (``codec`` or the older ``autoencoder`` entry,
    a file beside the checkpoint), or None."""
    from avatar_models.data.patch_pca import PatchPCA

    codec = extra.get("codec") or {}
    name = codec.get("file") if codec.get("kind") == "patch-pca" else extra.get("autoencoder")
    return None if name is None else PatchPCA.load(Path(checkpoint).parent / name)


def checkpoint_world(ckpt) -> str:
    """The toy world a demo checkpoint was trained on: its demo recipe's, else its dataset's
    (a checkpoint of the recipe's equivalent ``train anchored`` line), else ``plain`` (old
    checkpoints)."""
    for entry in ("demo_recipe", "dataset_args"):
        world = (ckpt.extra.get(entry) or {}).get("world")
        if world is not None:
            return world
    return "plain"


def identity_grid(model) -> int:
    """The source-thumbnail size the model was trained with (G = 3 * grid * grid values)."""
    return round((model.config.global_dim / 3) ** 0.5)


def sample_video(model, schedule: dict | None, method: str, identity: torch.Tensor,
                 controls: torch.Tensor, opts: DemoOptions, seed: int,
                 device: torch.device, ae=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(video [N, 3, 64, 64] in [0, 1], bool [N]: the frames the anchor-transfer diagnostic
    averages over) from G and per-frame controls [N, 40]. Anchored: the frames owned by
    sequences b != 0; the other methods: frames T or more from the central frame (outside
    every window that holds it)."""
    from avatar_models.anchored_diffusion import Conditions
    from samplers.anchored import anchored_sample, decode_video, sdit_denoiser
    from samplers.autoregressive import autoregressive_sample, chained_windows
    from samplers.multidiffusion import (
        independent_windows,
        multidiffusion_sample,
        uniform_windows,
    )
    from samplers.nonuniform import gather_frames, nonuniform_plan
    from samplers.schedules import make_scheduler

    cfg = model.config
    n, t = controls.shape[0], cfg.frames
    g, ctrl = identity.to(device), controls.to(device)
    gen = torch.Generator().manual_seed(seed)
    sched = make_scheduler("ddim", schedule, opts.steps)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    amp = device.type == "cuda"
    far = (torch.arange(n) - n // 2).abs() >= t

    def denoiser(windows):
        cond = Conditions(g[None].expand(windows.shape[0], -1), ctrl[windows.to(device)])
        return sdit_denoiser(model, cond, guidance=opts.guidance, amp=amp)

    if method == "anchored":
        plan = nonuniform_plan(n, t, mode="random", generator=gen)
        cond = Conditions(g[None].expand(plan.batch, -1), gather_frames(ctrl, plan))
        den = sdit_denoiser(model, cond, guidance=opts.guidance, amp=amp)
        lat = anchored_sample(den, sched, plan, shape, generator=gen, device=device,
                              progress=opts.progress)
        video = decode_video(lat, plan)
        far = torch.zeros(n, dtype=torch.bool)
        far[plan.indices[1:][plan.owner[1:]]] = True
        far[plan.anchor] = False
    elif method in ("multidiffusion", "independent"):
        windows = (uniform_windows(n, t) if method == "multidiffusion"
                   else independent_windows(n, t))
        video = multidiffusion_sample(denoiser(windows), sched, windows, n, shape, generator=gen,
                                      device=device, progress=opts.progress)
    elif method == "autoregressive":
        windows = chained_windows(n, t, t // 2 if opts.context is None else opts.context)
        video = autoregressive_sample(lambda w: denoiser(windows[w:w + 1]), sched, windows, n,
                                      shape, generator=gen, device=device,
                                      progress=opts.progress)
    else:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    video = video.float().cpu()
    if ae is not None:
        video = ae.decode(video)
    return (video.clamp(-1, 1) + 1) / 2, far


def reenact(model, schedule: dict | None, method: str, identity: torch.Tensor,
            controls: torch.Tensor, opts: DemoOptions, seed: int,
            device: torch.device, ae=None) -> torch.Tensor:
    """Video [N, 3, 64, 64] in [0, 1] from G and per-frame controls [N, 40]."""
    return sample_video(model, schedule, method, identity, controls, opts, seed, device, ae)[0]


def independent_anchor(model, schedule: dict | None, identity: torch.Tensor,
                       controls: torch.Tensor, anchor: int, opts: DemoOptions,
                       device: torch.device, ae=None) -> torch.Tensor:
    """The anchor frame [3, 64, 64] of an independent sample of the same inputs (noise seed + 1):
    one window of the T frames around the anchor, shared by every method of a pair. The
    anchor-transfer diagnostic compares each method's residuals with it. (It was first a full
    second video per method; one window halves the demo's cost and gives each method the same
    reference. Changed on 2026-11-29 before any fine-world result was seen.)"""
    t = model.config.frames
    start = min(max(anchor - t // 2, 0), controls.shape[0] - t)
    window, _ = sample_video(model, schedule, "independent", identity,
                             controls[start:start + t], opts, opts.seed + 1, device, ae)
    return window[anchor - start]


def _uint8(frames: torch.Tensor, upscale: int) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> uint8 [N, H*k, W*k, 3] (nearest-neighbour upscale)."""
    x = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.repeat_interleave(upscale, -1).repeat_interleave(upscale, -2)
    return x.permute(0, 2, 3, 1).contiguous()


def method_metrics(video: torch.Tensor, data: dict, opts: DemoOptions, anchor: int,
                   transfer_frames: torch.Tensor, other_anchor: torch.Tensor) -> dict:
    """Every per-video metric of docs/demo.md ("Metrics (fixed before results)")."""
    truth, regions = data["truth"], data["regions"]
    picked = slice(None, None, opts.lmse_stride)
    fitted = M.fit_params(data["identity"], video[picked], steps=opts.fit_steps)
    readout = {k: regions[k] for k in ("background", "shirt")}
    return {**M.consistency(video, data["source"], truth),
            **M.landmark_error(fitted, data["params"][picked]), **M.fidelity(video, truth),
            "psnr_face_hair_db": M.masked_psnr(video, truth, regions["face_hair"]),
            "flicker": M.flicker(video, truth),
            **M.appearance_stability(video, truth, readout, anchor),
            **M.anchor_transfer(video, truth, anchor, transfer_frames, other_anchor)}


def consistency_curve(model, schedule, data: dict, videos: dict, opts: DemoOptions,
                      device: torch.device, ae=None) -> dict:
    """Self-CSIM and CSIM against video length (first pair), mean over ``curve_seeds``: every
    point is a separate reenactment of the first n driving frames (the full-length, seed-0 one
    is the main run)."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    lengths = sorted({min(max(2, n), opts.frames) for n in opts.lengths})
    g = data["global_condition"](identity_grid(model))
    quiet = replace(opts, progress=False)
    jobs = [(m, n, s) for m in opts.methods for n in lengths for s in range(opts.curve_seeds)]
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
    for method in opts.methods:
        curve[method] = {k: [sum(v[k] for v in vals[method, n]) / len(vals[method, n])
                             for n in lengths] for k in ("self_csim", "csim")}
    return curve


def plot_consistency(curve: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in curve]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for ax, key, label in ((axes[0], "self_csim", "Self-CSIM (lower is better)"),
                           (axes[1], "csim", "CSIM to source (higher is better)")):
        for method, style in zip(methods, ("o-", "s--", "^:", "d-.")):
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


def plot_drift(curve: dict, path: Path, title: str) -> Path:
    """Drift against temporal distance, mean and 95% interval over pairs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    d = curve["distances"]
    for method, style in zip([m for m in METHODS if m in curve], ("o-", "s--", "^:", "d-.")):
        c = curve[method]
        ax.plot(d, c["mean"], style, label=method, ms=4)
        ax.fill_between(d, c["low"], c["high"], alpha=0.15)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("temporal distance |i - j| (frames)")
    ax.set_ylabel("drift: cos_ideal - cos_generated")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarise(per_pair: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean and 95% interval over pairs of every scalar metric, per method."""
    return {m: {k: M.interval([r[k] for r in rows]) for k in rows[0]}
            for m, rows in per_pair.items()}


def transfer_verdict(summary: dict) -> str:
    """Whether the anchor passes anything to the other sequences (fixed rule, docs/demo.md)."""
    if "anchored" not in summary:
        return "anchored sampling was not run"
    ci = summary["anchored"]["anchor_transfer"]
    if ci["low"] > TRANSFER_FLOOR:
        return (f"the anchor passes what it invents to the other sequences (anchor_transfer "
                f"{ci['mean']:.3f}, 95% interval {ci['low']:.3f} .. {ci['high']:.3f} > "
                f"{TRANSFER_FLOOR}): the demo can test the paper's claim")
    return (f"anchor_transfer {ci['mean']:.3f} (95% interval {ci['low']:.3f} .. "
            f"{ci['high']:.3f}) is not clearly above {TRANSFER_FLOOR}: the toy model passes "
            f"(almost) nothing through the anchor, so this demo cannot test the paper's claim")


def run_demo(opts: DemoOptions, out: Path) -> dict[str, Path]:
    """Everything ``avatar-kernels demo`` does; returns the written paths by name."""
    from avatar_models.media import contact_sheet, write_video

    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown or not opts.methods:
        raise ValueError(f"methods: expected a non-empty subset of {METHODS}, got "
                         f"{opts.methods}")
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    model, ckpt, ae = load_model(Path(opts.checkpoint), device)
    if opts.frames < 2 * model.config.frames:
        raise ValueError(f"frames: expected >= 2 T = {2 * model.config.frames} (the anchor-"
                         f"transfer diagnostic needs frames T or more from the anchor), got "
                         f"{opts.frames}")
    world = opts.world or checkpoint_world(ckpt)
    schedule = ckpt.extra.get("diffusion")
    grid = identity_grid(model)
    anchor = opts.frames // 2
    _say(opts, f"reenacting {opts.pairs} held-out pair(s) ({world} world): {opts.frames} "
               f"frames, {opts.steps} DDIM steps, model {model.config.hidden}x"
               f"{model.config.depth}, T={model.config.frames}, methods {', '.join(opts.methods)}"
               f", on {device}")
    per_pair: dict[str, list[dict]] = {m: [] for m in opts.methods}
    drift: dict[str, list[torch.Tensor]] = {m: [] for m in opts.methods}
    seconds: dict[str, float] = {m: 0.0 for m in opts.methods}
    floors, first, first_videos = [], None, {}
    for pair in range(opts.pairs):
        data = inputs(opts.frames, pair, world)
        first = first or data
        g = data["global_condition"](grid)
        other_anchor = independent_anchor(model, schedule, g, data["controls"], anchor, opts,
                                          device, ae)
        for method in opts.methods:
            start = time.perf_counter()
            video, far = sample_video(model, schedule, method, g, data["controls"], opts,
                                      opts.seed, device, ae)
            seconds[method] += time.perf_counter() - start
            if pair == 0:
                first_videos[method] = video
            per_pair[method].append(method_metrics(video, data, opts, anchor, far,
                                                   other_anchor))
            drift[method].append(M.drift_by_distance(video, data["truth"]))
        picked = slice(None, None, opts.lmse_stride)
        floors.append(M.landmark_error(M.fit_params(data["identity"], data["truth"][picked],
                                                    steps=opts.fit_steps),
                                       data["params"][picked]))
    summary = summarise(per_pair)
    distances = [d for d in DRIFT_DISTANCES if d < opts.frames]
    curve = {"distances": distances}
    for method in opts.methods:
        curve[method] = {k: [] for k in ("mean", "low", "high")}
        for d in distances:
            ci = M.interval([v[d].item() for v in drift[method]])
            for k in ("mean", "low", "high"):
                curve[method][k].append(ci[k])
    verdict = transfer_verdict(summary)
    _say(opts, "anchor transfer: " + verdict)

    paths = {}
    for method in opts.methods:
        paths[method] = write_video(out / f"{method}.mp4",
                                    _uint8(first_videos[method], opts.upscale), opts.fps)
    step = max(1, opts.frames // 12)
    k = max(1, opts.upscale // 2)
    rows = [_uint8(first["source"][None], k), _uint8(first["driving"][::step], k),
            _uint8(first["truth"][::step], k)] + [_uint8(first_videos[m][::step], k)
                                                  for m in opts.methods]
    paths["contact_sheet"] = out / "contact_sheet.png"
    contact_sheet(rows, labels=["source", "driving", "ideal", *opts.methods],
                  path=paths["contact_sheet"])
    paths["drift"] = plot_drift(curve, out / "drift.png",
                                f"drift vs. temporal distance ({world} world, {opts.pairs} "
                                f"pairs, {opts.frames} frames, 95% t-intervals)")
    report = {
        "world": world,
        "protocol": {"pairs": opts.pairs, "frames": opts.frames, "anchor_frame": anchor,
                     "lmse_stride": opts.lmse_stride, "methods": list(opts.methods),
                     "transfer_floor": TRANSFER_FLOOR},
        "definitions": {"embedding": M.EMBEDDING_ABOUT, "control_error": M.CONTROL_ABOUT,
                        "drift": M.DRIFT_ABOUT, "readout": M.READOUT_ABOUT,
                        "flicker": M.FLICKER_ABOUT, "anchor_transfer": M.TRANSFER_ABOUT,
                        "intervals": M.INTERVAL_ABOUT,
                        "psnr_face_hair_db": "PSNR over the face, ears and hair of the ideal "
                                             "frames minus the accessory "
                                             "(procedural_faces.region_masks)"},
        "embedding": {"name": M.EMBEDDING, "about": M.EMBEDDING_ABOUT},
        "anchor_transfer_verdict": verdict,
        "methods": summary,
        "drift_vs_distance": curve,
        "per_pair": per_pair,
        "estimator_floor": {**summarise({"ideal": floors})["ideal"],
                            "about": "control estimator run on the ideal frames"},
        "inputs": {"pairs": [pair_seeds(p) for p in range(opts.pairs)], "frames": opts.frames},
        "sampling": {"scheduler": "ddim", "steps": opts.steps, "guidance": opts.guidance,
                     "seed": opts.seed, "transfer_seed": opts.seed + 1,
                     "frames_per_sequence": model.config.frames,
                     "autoregressive_context": (model.config.frames // 2 if opts.context is None
                                                else opts.context),
                     "checkpoint": str(opts.checkpoint), "device": str(device)},
    }
    if opts.lengths:
        report["consistency_vs_length"] = consistency_curve(model, schedule, first, first_videos,
                                                            opts, device, ae)
        paths["consistency"] = plot_consistency(
            report["consistency_vs_length"], out / "consistency.png",
            f"consistency vs. video length ({M.EMBEDDING} embedding, mean of "
            f"{opts.curve_seeds} seeds)")
    opts.timings.update(sample_seconds={m: round(v, 2) for m, v in seconds.items()},
                        total_seconds=round(time.perf_counter() - clock, 1))
    report["sampling"]["seconds"] = opts.timings
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
