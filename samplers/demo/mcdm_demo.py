"""``avatar-kernels demo mcdm``: the paper's long-term claims (Fig. 5, Table 4) at toy scale.

From the shipped toy models (``assets/mcdm/``, ``make train-mcdm``), on held-out identities
(identity seeds >= 1,000,000, never drawn in training), every arm samples the same inputs with
the same noise seed:

- ``full``: ``s3_full`` with the rolling archived clip (the paper's inference);
- ``no_archive``: ``s3_full`` with the archived clip held at the repeated reference (w/o F_a of
  Table 4, "without the archived clip" of Fig. 5: no history reaches the model);
- ``no_mta``: ``s3_no_mta`` (w/o MTA of Table 4: F_ac^ref + F_pc^ref, softmax, no memory).

Every arm is driven WITH the ground-truth landmarks (pose guider), so head motion follows the
ideal video and SSIM to it is meaningful. The ideal video is the held-out identity rendered
with the driving motion at the model's 16 px: what a perfect model would produce.

The metrics (``METRICS_ABOUT``) were fixed in docs/mcdm.md ("Demo metrics") before any was run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from avatar_models.data import procedural_faces as pf

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "mcdm"
ARMS: dict[str, tuple[str, str]] = {          # arm -> (checkpoint stem, archived_clip mode)
    "full": ("s3_full", "rolling"),
    "no_archive": ("s3_full", "reference"),
    "no_mta": ("s3_no_mta", "rolling"),
}
IDENTITY_SEED_BASE = pf.HELD_OUT_SEED_BASE    # held-out identities: 1_000_000 + i
MOTION_SEED_BASE = 3_000_000                  # driving motion and speech of pair i: 3_000_000 + i
PROBE_IDENTITIES = 64                         # training identities (seeds 0..63) the probe fits
PROBE_FRAMES = 32
MOUTH_CROP = 5                                # px (at the model's 16 px) around the mouth centre
MOUTH_POINTS = (16, 17, 18, 19)               # procedural_faces.landmarks mouth points
METRICS_ABOUT = {
    "ssim": "SSIM(generated_t, ideal_t) per frame, frames in [0, 1] at 16 px, 7x7 Gaussian "
            "window (sigma 1.5, valid), C1 = 0.01^2, C2 = 0.03^2, mean over pixels and RGB",
    "identity_distance": "L2 distance of the pose-invariant appearance readout "
                         "(samplers/demo/metrics.appearance_readout over the background and "
                         "shirt pixels the head never touches, masks area-pooled to 16 px) of "
                         "frame t to that of the reference frame; lower is better; the ideal "
                         "video's own value is reported beside it",
    "mouth_readout": "ridge probe (lambda 1e-3) from the RGB of a 5x5 px crop centred on the "
                     "ground-truth mouth landmarks to the true mouth opening, fitted on ideal "
                     "frames of training identities (seeds 0..63, 32 frames each)",
    "lip_sync": "samplers/demo/video_metrics.lip_sync_score(audio energy = mean of the energy "
                "features per frame, mouth readout of the generated frames, max_lag = "
                "min(15, frames - 3)): peak_minus_median and lag; mouth_corr = Pearson "
                "correlation of the generated mouth readout with the true mouth opening (0 "
                "when either is constant)",
    "seam_ratio": "samplers/demo/video_metrics.seam_jump at the clip starts (every f frames)",
    "curves": "per window of `window` frames: mean over the window's frames, then mean and 95% "
              "Student-t interval over identities (samplers/demo/metrics.interval)",
    "differences": "paired per identity: full - no_archive and full - no_mta, 95% interval",
}


@dataclass(frozen=True)
class MCDMDemoOptions:
    pairs: int = 8
    frames: int = 48
    steps: int = 10                # chosen for the CPU budget (the sampler's default is 25)
    prior_steps: int = 10
    window: int = 16
    clip_video: float | None = None   # DDIM x0 clamp (None: none, the pre-registered protocol)
    clip_prior: float | None = None
    seed: int = 0                  # noise seed of pair i: seed + i, the same for every arm
    arms: tuple[str, ...] = tuple(ARMS)
    assets: Path = field(default=ASSETS)

    def __post_init__(self):
        check_counts(self)
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"arms must be a non-empty subset of {list(ARMS)}, got "
                             f"{list(self.arms)}")


def check_counts(options) -> None:
    """The counts every demo-style evaluation shares: pairs, steps, prior_steps, window >= 1 and
    frames >= 8 (lip sync needs max_lag + 3)."""
    for name in ("pairs", "steps", "prior_steps", "window"):
        if getattr(options, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(options, name)}")
    if options.frames < 8:
        raise ValueError(f"frames must be >= 8 (lip sync needs max_lag + 3), got "
                         f"{options.frames}")


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-frame SSIM [N] of frames ``x``, ``y`` [N, C, H, W] in [0, 1] (``METRICS_ABOUT``)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"x, y: expected equal shapes [N, C, H, W], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"frames must be at least {window} px, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    g = torch.exp(-(torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2
                  / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    x, y = x.double(), y.double()
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def mouth_crops(frames: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """[N, 3 * MOUTH_CROP^2] RGB of a MOUTH_CROP px square (bilinear) centred on the mean of the
    mouth landmarks; ``frames`` [N, 3, S, S], ``landmarks`` [N, 40] in [-1, 1]."""
    n, _, s, _ = frames.shape
    centre = landmarks.view(n, pf.N_LANDMARKS, 2)[:, list(MOUTH_POINTS)].mean(1)   # [N, 2]
    offsets = (torch.arange(MOUTH_CROP) - (MOUTH_CROP - 1) / 2) * (2 / s)          # 1 px steps
    oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
    grid = torch.stack([ox, oy], -1)[None] + centre[:, None, None]                  # [N, k, k, 2]
    crop = F.grid_sample(frames.float(), grid.float(), align_corners=False)
    return crop.flatten(1)


class MouthProbe:
    """Ridge regression from mouth crops to the mouth opening (``METRICS_ABOUT``)."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    @classmethod
    def fit(cls, size: int, fps: float, lam: float = 1e-3) -> MouthProbe:
        from avatar_models.mcdm import MCDMFaces

        render = MCDMFaces(size=size, fps=fps)._render
        feats, targets = [], []
        mouth = pf.PARAM_NAMES.index("mouth_open")
        for i in range(PROBE_IDENTITIES):
            params = pf.sample_motion(10_000 + i, PROBE_FRAMES)
            frames, _ = render(pf.sample_identity(i), params)
            feats.append(mouth_crops(frames, pf.landmarks(params)))
            targets.append(params[:, mouth])
        x = _with_bias(torch.cat(feats).double())
        y = torch.cat(targets).double()
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        return cls(torch.linalg.solve(x.T @ x + lam * x.shape[0] * eye, x.T @ y))

    def __call__(self, frames: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return _with_bias(mouth_crops(frames, landmarks).double()) @ self.weights


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def held_out_pair(i: int, frames: int, size: int, fps: float, sample_rate: int,
                  bands: int) -> dict:
    """Inputs and ground truth of held-out pair ``i`` (identity seed 1_000_000 + i)."""
    from avatar_models.data.speech import energy_features, speech_waveform
    from avatar_models.mcdm import MCDMFaces

    ident = pf.sample_identity(IDENTITY_SEED_BASE + i)
    params = pf.sample_motion(MOTION_SEED_BASE + i, frames)
    ideal, full = MCDMFaces(size=size, fps=fps)._render(ident, params)        # [-1, 1], [0, 1]
    mouth = params[:, pf.PARAM_NAMES.index("mouth_open")]
    wave = speech_waveform(mouth, fps, sample_rate, seed=MOTION_SEED_BASE + i)
    masks = pf.region_masks(ident, params)
    regions = {k: F.avg_pool2d(masks[k].float()[None], pf.SIZE // size)[0] >= 1.0
               for k in ("background", "shirt")}                              # [1, S, S]
    return {"ideal": ideal, "reference": ideal[0], "image": pf.identity_embedding(full[0]),
            "landmarks": pf.landmarks(params), "mouth": mouth,
            "audio": energy_features(wave, sample_rate, fps, frames, bands), "regions": regions}


def evaluate(generated: torch.Tensor, pair: dict, probe: MouthProbe, clip_frames: int,
             window: int) -> dict:
    """Every metric of one generated video [N, 3, S, S] in [-1, 1] against its pair."""
    from samplers.demo.metrics import appearance_readout
    from samplers.demo.video_metrics import (
        _pearson,
        lip_sync_score,
        seam_jump,
        windowed_consistency,
    )

    n = generated.shape[0]
    gen01, ideal01 = ((generated + 1) / 2).clamp(0, 1), ((pair["ideal"] + 1) / 2).clamp(0, 1)
    per_frame_ssim = ssim(gen01, ideal01)
    out = {"ssim_curve": _windows(per_frame_ssim, window),
           "ssim": per_frame_ssim.mean().item()}
    ref = appearance_readout(ideal01[:1], pair["regions"])[0]
    for name, video in (("", gen01), ("_ideal", ideal01)):
        readout = appearance_readout(video, pair["regions"])                  # [N, R]
        out["identity_curve" + name] = windowed_consistency(
            readout, window, reference=ref, kind="l2")["to_reference"]
        out["identity_distance" + name] = (readout - ref).norm(dim=1).mean().item()
    energy = pair["audio"].double().mean(1)
    lag = min(15, n - 3)
    for name, video in (("", generated), ("_ideal", pair["ideal"])):
        mouth = probe(video, pair["landmarks"])
        sync = lip_sync_score(energy, mouth, max_lag=lag)
        out["lip_sync" + name] = sync["peak_minus_median"]
        out["lip_lag" + name] = sync["lag"]
        out["mouth_corr" + name] = _pearson(mouth, pair["mouth"].double())
    starts = list(range(clip_frames, n, clip_frames))
    if starts:
        out["seam_ratio"] = seam_jump(generated, starts)["ratio"]
        out["seam_ratio_ideal"] = seam_jump(pair["ideal"], starts)["ratio"]
    return out


def _windows(values: torch.Tensor, window: int) -> list[float]:
    return [values[s:s + window].mean().item() for s in range(0, values.shape[0], window)]


def load_arm_model(assets: Path, arm: str):
    path = Path(assets) / f"{ARMS[arm][0]}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--assets {str(assets)!r}: {path.name} not found (run `make "
                                f"train-mcdm`, or pass --assets)")
    return load_model(path)


def load_model(path: Path):
    """(MCDM in eval mode with the EMA weights, the checkpoint's ``extra``) of ``path``."""
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.mcdm import MCDM, MCDMConfig

    ckpt = load_checkpoint(path, system="mcdm")
    model = MCDM(MCDMConfig.from_dict(ckpt.config))
    model.load_state_dict(ckpt.weights("ema"))
    return model.eval(), ckpt.extra


def sample_pair(model, pair: dict, frames: int, settings, seed: int,
                archived_clip: str = "rolling") -> torch.Tensor:
    """The generated video [frames, 3, S, S] in [-1, 1] of one held-out pair, driven with its
    ground-truth landmarks, noise seed ``seed``."""
    from samplers.mcdm import mcdm_sample

    out = []
    mcdm_sample(model, reference=pair["reference"], image=pair["image"], audio=pair["audio"],
                total_frames=frames, landmarks=pair["landmarks"], settings=settings,
                writer=lambda x, first: out.append(x.clone()),
                generator=torch.Generator().manual_seed(seed), progress=False,
                archived_clip=archived_clip)
    return torch.cat(out)


def summarize(per_arm: dict[str, list[dict]]) -> dict:
    """Mean and 95% interval over identities of every scalar and every curve point, and the
    paired differences full - other arm."""
    from samplers.demo.metrics import interval

    summary = {}
    for arm, runs in per_arm.items():
        row = {}
        for key, value in runs[0].items():
            if isinstance(value, list):
                row[key] = [interval([r[key][w] for r in runs]) for w in range(len(value))]
            else:
                row[key] = interval([r[key] for r in runs])
        summary[arm] = row
    if "full" in per_arm:
        for other in (a for a in per_arm if a != "full"):
            diff = {}
            for key in ("ssim", "identity_distance", "lip_sync", "mouth_corr", "seam_ratio"):
                if key in per_arm["full"][0]:
                    diff[key] = interval([f[key] - o[key] for f, o in
                                          zip(per_arm["full"], per_arm[other])])
            diff["ssim_curve"] = [interval([f["ssim_curve"][w] - o["ssim_curve"][w] for f, o
                                            in zip(per_arm["full"], per_arm[other])])
                                  for w in range(len(per_arm["full"][0]["ssim_curve"]))]
            summary[f"full_minus_{other}"] = diff
    return summary


def _fmt(iv: dict) -> str:
    return f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def run_mcdm_demo(options: MCDMDemoOptions, out: Path, progress: bool = True) -> dict:
    """Sample every arm on every held-out pair, evaluate, write ``out/mcdm_demo.json`` (and,
    after each pair, the per-pair metrics so far to ``out/mcdm_demo.partial.json``)."""
    from avatar_models.mcdm import MCDMConfig  # noqa: F401  (import cost paid before timing)
    from samplers.mcdm import MCDMSettings

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = {arm: load_arm_model(options.assets, arm) for arm in options.arms}
    cfg = next(iter(models.values()))[0].config
    data = next(iter(models.values()))[1].get("data", {})
    fps, rate = float(data.get("fps", 25.0)), int(data.get("sample_rate", 16000))
    probe = MouthProbe.fit(cfg.latent_size, fps)
    settings = MCDMSettings(steps=options.steps, prior_steps=options.prior_steps,
                            clip_video=options.clip_video, clip_prior=options.clip_prior)
    per_arm: dict[str, list[dict]] = {arm: [] for arm in options.arms}
    for i in range(options.pairs):
        pair = held_out_pair(i, options.frames, cfg.latent_size, fps, rate, cfg.audio_dim)
        for arm in options.arms:
            video = sample_pair(models[arm][0], pair, options.frames, settings,
                                options.seed + i, ARMS[arm][1])
            per_arm[arm].append(evaluate(video, pair, probe, cfg.clip_frames, options.window))
        # a long run (Fig. 5 at 1800 frames, ~80 min) keeps the pairs finished so far on disk
        (out / "mcdm_demo.partial.json").write_text(json.dumps(
            {"pairs_done": i + 1, "elapsed_seconds": round(time.perf_counter() - start, 1),
             "per_pair": per_arm}) + "\n")
        if progress:
            print(f"pair {i + 1}/{options.pairs} done ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    summary = summarize(per_arm)
    wall = time.perf_counter() - start
    doc = {"options": {**options.__dict__, "assets": str(options.assets)},
           "identity_seeds": [IDENTITY_SEED_BASE + i for i in range(options.pairs)],
           "motion_seeds": [MOTION_SEED_BASE + i for i in range(options.pairs)],
           "arms": {a: {"checkpoint": ARMS[a][0], "archived_clip": ARMS[a][1]}
                    for a in options.arms},
           "window_starts": list(range(0, options.frames, options.window)),
           "metrics": METRICS_ABOUT, "wall_seconds": round(wall, 1),
           "device": "cpu", "threads": torch.get_num_threads(),
           "summary": summary, "per_pair": per_arm}
    (out / "mcdm_demo.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(report_table(doc))
    print(f"wrote {out / 'mcdm_demo.json'} ({wall:.0f} s)")
    return doc


def report_table(doc: dict) -> str:
    """Markdown: Table 4 rows and the Fig. 5 curves (mean [95% interval] over identities)."""
    s = doc["summary"]
    arms = [a for a in ARMS if a in s]
    keys = ("ssim", "identity_distance", "lip_sync", "mouth_corr", "seam_ratio")
    lines = ["| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(_fmt(s[arm][k]) if k in s[arm] else "n/a"
                                                for k in keys) + " |")
    ideal = s[arms[0]]
    lines.append("| ideal video | n/a | " + " | ".join(
        _fmt(ideal[k + "_ideal"]) if k + "_ideal" in ideal else "n/a" for k in keys[1:]) + " |")
    lines += ["", "| window start | " + " | ".join(f"SSIM {a}" for a in arms)
              + " | " + " | ".join(f"identity {a}" for a in arms) + " |",
              "|---" * (2 * len(arms) + 1) + "|"]
    for w, first in enumerate(doc["window_starts"]):
        cells = [_fmt(s[a]["ssim_curve"][w]) for a in arms]
        cells += [_fmt(s[a]["identity_curve"][w]) for a in arms]
        lines.append(f"| {first} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finite(doc: dict) -> bool:
    """Every summary mean is a finite number."""
    def walk(x):
        if isinstance(x, dict):
            return all(walk(v) for k, v in x.items() if k != "n")
        if isinstance(x, list):
            return all(walk(v) for v in x)
        return not isinstance(x, float) or math.isfinite(x)
    return walk(doc["summary"])
