"""``avatar-kernels demo warpface``: the Table 3 arms trained at toy scale, and their evaluation.

Training (:func:`train_arms`, ``make train-warpface``): every (seed, arm) of :class:`ArmRecipe`
is one ``avatar-kernels train warpface`` process (its own patch-PCA codec fitted with its seed),
then compacted to EMA float16 (:func:`samplers.demo.train.compact_checkpoint`); the loss curves
and wall times go to ``training.json`` and ``training.png`` beside the checkpoints.

Evaluation (:func:`evaluate`): the protocol of docs/warpface.md, "Evaluation protocol (fixed
before any result was looked at)": self and cross reenactment of held-out identities against the
toy's ground truth (fitted pose and expression, PSNR to the ideal frame, a pose-invariant
appearance readout for identity and leakage), the estimator floor, the copy-source and theta = 0
baselines, 95% intervals over pairs, paired arm differences, and the diagnostics (linear-probe
R^2 and effective rank of theta, theta = 0 against the source, canonical-pose spread,
gamma(t) / delta(t), the K x parameter sensitivity table).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from avatar_models.data import procedural_faces as pf
from samplers.demo import metrics as dm

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "warpface"
ARM_FLAGS = {"warpca": [], "cross": ["--cross-attention"], "notime": ["--no-time-modulation"]}
ARM_ABOUT = {"warpca": "WarpCA + multi-group vectors (Table 3 row 5)",
             "cross": "plain cross-attention + multi-group vectors (row 2)",
             "notime": "WarpCA without timestep modulation (row 4)"}

# held-out seeds of the evaluation (docs/warpface.md); training identities are < 1,000,000
SOURCE_SEED, SOURCE_MOTION, DRIVING_MOTION = pf.HELD_OUT_SEED_BASE, 2_000_000, 3_000_000
REFERENCE_SEED, REFERENCE_COUNT = 5_000_000, 32
PROBE_SEED, PROBE_MOTION, PROBE_TEST_SEED = 6_000_000, 7_000_000, 6_100_000
PROBE_TRAIN, PROBE_TEST, PROBE_FRAMES = 24, 8, 20
FRAME_GAP = 5                 # driving frames are 5 apart (> 0.2 s at 25 fps)
POSE, EXPRESSION = (0, 1, 2), (3, 4, 5, 6, 7)
PARAM_RANGE = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 2.0, 1.0])
SENSITIVITY_SOURCES, SENSITIVITY_STD = 4, 2.0
DIAGNOSTIC_TIMESTEPS = (10, 100, 300, 500, 800, 950)


def checkpoint_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}.safetensors"


@dataclass(frozen=True)
class ArmRecipe:
    """The toy recipe every arm and seed shares (same budget): tiny config (16 x 16 patch-PCA
    latents), 500 steps of batch 8, AdamW lr 1e-3 with 50 warm-up steps then cosine decay,
    EMA 0.99 (a 0.999 EMA would still weigh the initial weights after 500 steps), clip 1.0."""

    config: str = "tiny"
    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.99
    grad_clip: float = 1.0
    seeds: tuple = (0, 1)
    arms: tuple = ("warpca", "cross", "notime")

    def runs(self) -> list[tuple[str, int]]:
        """(arm, seed) in training order: every arm's first seed before any second seed."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]

    def train_arguments(self, arm: str, seed: int, out: Path) -> list[str]:
        if arm not in ARM_FLAGS:
            raise ValueError(f"arm must be one of {tuple(ARM_FLAGS)}, got {arm!r}")
        return ["train", "warpface", "--config", self.config, *ARM_FLAGS[arm],
                "--steps", str(self.steps), "--batch-size", str(self.batch_size),
                "--lr", f"{self.lr:g}", "--warmup-steps", str(self.warmup_steps),
                "--ema-decay", f"{self.ema_decay:g}", "--grad-clip", f"{self.grad_clip:g}",
                "--seed", str(seed), "--no-progress", "--out", str(out)]


def finalize_run(checkpoint: Path) -> dict:
    """Read the engine's per-step metrics of a finished run, then keep only the compact
    checkpoint (EMA float16) and its codec: returns the run's loss record."""
    from avatar_models.training.engine import metrics_path, read_metrics
    from samplers.demo.train import ship_checkpoint

    rows = [r for r in read_metrics(metrics_path(checkpoint)) if "loss" in r]
    ship_checkpoint(checkpoint)
    last = rows[-100:]
    return {"checkpoint": checkpoint.name, "steps": len(rows),
            "train_seconds": round(rows[-1]["time_s"], 1),
            "final_loss_mean_last_100": sum(r["loss"] for r in last) / len(last),
            "final_ldm_mean_last_100": sum(r["ldm"] for r in last) / len(last),
            "loss": [round(r["loss"], 5) for r in rows], "ldm": [round(r["ldm"], 5) for r in rows]}


def train_arms(recipe: ArmRecipe = ArmRecipe(), folder: Path = ASSETS, *,
               runs: list[tuple[str, int]] | None = None) -> dict:
    """Train (arm, seed) runs (default: all of ``recipe``) with ``avatar-kernels train warpface``
    into ``folder``; write ``training.json`` and ``training.png`` there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "training.json"

    def current_record() -> dict:     # re-read: runs of this recipe may train in parallel
        return (json.loads(record_path.read_text()) if record_path.exists()
                else {"recipe": asdict(recipe), "runs": {}})

    record = current_record()
    for arm, seed in runs or recipe.runs():
        out = folder / checkpoint_name(arm, seed)
        args = recipe.train_arguments(arm, seed, out)
        print("avatar-kernels " + " ".join(args), flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "samplers", *args], check=True)
        run = finalize_run(out)
        run["process_seconds"] = round(time.perf_counter() - start, 1)
        run["command"] = "avatar-kernels " + " ".join(args)
        record = current_record()
        record["runs"][f"{arm}_s{seed}"] = run
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    return write_training_record(record, folder)


def write_training_record(record: dict, folder: Path) -> dict:
    """``training.json`` (recipe, every run's loss curve, times) and ``training.png``."""
    from avatar_models.training.engine import plot_curves

    record["total_train_seconds"] = round(sum(r["train_seconds"]
                                              for r in record["runs"].values()), 1)
    (Path(folder) / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_curves({name: r["ldm"] for name, r in record["runs"].items()},
                Path(folder) / "training.png", "WarpFace toy arms: weighted eps-MSE per step")
    return record


# ---------------------------------------------------------------------------------------------
# loading


def load_arm(checkpoint: Path, device="cpu"):
    """(model, codec) of a ``train warpface`` checkpoint; the codec is the recorded file, or the
    file of the same name beside the checkpoint (the recorded path is absolute)."""
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.data.patch_pca import PatchPCA
    from avatar_models.warpface import WarpFace, WarpFaceConfig

    ckpt = load_checkpoint(checkpoint, system="warpface")
    recorded = Path(ckpt.extra.get("codec", ""))
    codec_file = recorded if recorded.is_file() else Path(checkpoint).parent / recorded.name
    model = WarpFace(WarpFaceConfig.from_dict(ckpt.config))
    model.load_state_dict({k: v.float() for k, v in ckpt.weights("ema").items()})
    return model.to(device).eval(), PatchPCA.load(codec_file)


# ---------------------------------------------------------------------------------------------
# the held-out pairs


@dataclass
class EvalPair:
    source_ident: pf.FaceIdentity
    driving_ident: pf.FaceIdentity
    source_params: torch.Tensor       # [8]
    drive_params: dict                # mode -> [F, 8] ("self", "cross")
    source_frame: torch.Tensor        # [3, 64, 64] in [0, 1]
    driving_frames: dict              # mode -> [F, 3, 64, 64]  (what drives)
    ideal_frames: dict                # mode -> [F, 3, 64, 64]  (source identity, driving motion)
    regions: dict                     # mode -> {name: [64, 64] bool}
    reference: dict                   # mode -> (mean, std) of the reference identities' readout


def _regions(idents_params: list[tuple[pf.FaceIdentity, torch.Tensor]]) -> dict:
    """Background, shirt and face-core pixels shared by every (identity, params) clip given."""
    out = None
    for ident, params in idents_params:
        m = pf.region_masks(ident, params)
        cur = {"background": m["background"][0], "shirt": m["shirt"][0],
               "face_core": m["face_hair"].all(0)[0]}
        out = cur if out is None else {k: out[k] & cur[k] for k in out}
    return out


def readout_z(frames: torch.Tensor, regions: dict, reference: tuple) -> torch.Tensor:
    """Standardised appearance readout [N, D] (docs/warpface.md, identity similarity)."""
    mean, std = reference
    return (dm.appearance_readout(frames, regions) - mean) / std


def _reference_stats(regions: dict, params: torch.Tensor) -> tuple:
    frames = torch.cat([pf.render(pf.sample_identity(REFERENCE_SEED + j), params[None])[0]
                        for j in range(REFERENCE_COUNT)])
    r = dm.appearance_readout(frames, regions)
    return r.mean(0), r.std(0).clamp_min(1e-6)


def make_pairs(count: int, frames: int) -> list[EvalPair]:
    """The fixed held-out pairs (docs/warpface.md): pair p drives identity 1,000,000 + 2p."""
    clip = max(50, FRAME_GAP * frames + 1)
    picks = [FRAME_GAP * (k + 1) for k in range(frames)]
    pairs = []
    for p in range(count):
        a = pf.sample_identity(SOURCE_SEED + 2 * p)
        b = pf.sample_identity(SOURCE_SEED + 2 * p + 1)
        own, other = pf.sample_motion(SOURCE_MOTION + p, clip), pf.sample_motion(
            DRIVING_MOTION + p, clip)
        src = own[0]
        drive = {"self": own[picks], "cross": other[picks]}
        driving = {"self": pf.render(a, drive["self"])[0], "cross": pf.render(b, drive["cross"])[0]}
        ideal = {"self": driving["self"], "cross": pf.render(a, drive["cross"])[0]}
        both = torch.cat([src[None], drive["self"]])
        regions = {"self": _regions([(a, both)]),
                   "cross": _regions([(a, torch.cat([src[None], drive["cross"]])),
                                      (b, drive["cross"])])}
        reference = {m: _reference_stats(regions[m], drive[m][0]) for m in regions}
        pairs.append(EvalPair(a, b, src, drive, pf.render(a, src[None])[0][0], driving, ideal,
                              regions, reference))
    return pairs


# ---------------------------------------------------------------------------------------------
# metrics of one pair's frames


def motion_errors(fitted: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per frame: APD as head-centre distance (px) and roll error (deg), AED as the mean absolute
    error of the expression parameters; ``fitted``, ``target`` [N, 8]."""
    d = fitted - target
    return {"apd_px": torch.stack([6 * d[:, 0], 4 * d[:, 1]], 1).norm(dim=1),
            "apd_roll_deg": (0.25 * d[:, 2]).abs() * 180 / math.pi,
            "aed": d[:, list(EXPRESSION)].abs().mean(1)}


def frame_metrics(frames: torch.Tensor, fitted: torch.Tensor, pair: EvalPair, mode: str
                  ) -> dict[str, float]:
    """The pair's mean over its frames of APD, AED, PSNR, identity similarity and (cross)
    leakage of ``frames`` [F, 3, 64, 64] (fitted parameters ``fitted`` [F, 8])."""
    out = {k: v.mean().item() for k, v in motion_errors(fitted, pair.drive_params[mode]).items()}
    ideal = pair.ideal_frames[mode]
    mse = (frames.double().clamp(0, 1) - ideal.double()).pow(2).mean((1, 2, 3))
    out["psnr_db"] = (10 * torch.log10(1 / mse.clamp_min(1e-12))).mean().item()
    z = readout_z(frames, pair.regions[mode], pair.reference[mode])
    out["identity_sim"] = F.cosine_similarity(
        z, readout_z(ideal, pair.regions[mode], pair.reference[mode]), dim=1).mean().item()
    if mode == "cross":
        zd = readout_z(pair.driving_frames[mode], pair.regions[mode], pair.reference[mode])
        out["leakage_sim"] = F.cosine_similarity(z, zd, dim=1).mean().item()
    return out


def floor_metrics(pair: EvalPair, mode: str, fitted_ideal: torch.Tensor, codec) -> dict:
    """The estimator floor of one pair (docs/warpface.md)."""
    ideal = pair.ideal_frames[mode]
    out = {k: v.mean().item()
           for k, v in motion_errors(fitted_ideal, pair.drive_params[mode]).items()}
    with torch.no_grad():
        recon = (codec.decode(codec.encode(ideal * 2 - 1)).clamp(-1, 1) + 1) / 2
    out["psnr_db"] = dm.fidelity(recon, ideal)["psnr_db"]   # the codec ceiling
    regions, ref = pair.regions[mode], pair.reference[mode]
    zi = readout_z(ideal, regions, ref)
    zs = readout_z(pair.source_frame[None], regions, ref)
    out["identity_sim"] = F.cosine_similarity(zs, zi, dim=1).mean().item()
    if mode == "cross":
        zd = readout_z(pair.driving_frames[mode], regions, ref)
        out["leakage_sim"] = F.cosine_similarity(zi, zd, dim=1).mean().item()
    return out


def summarize(per_pair: list[dict]) -> dict:
    """{metric: interval over pairs} of a list of per-pair metric dicts."""
    return {k: dm.interval([p[k] for p in per_pair]) for k in per_pair[0]}


# ---------------------------------------------------------------------------------------------
# generation


@dataclass(frozen=True)
class EvalOptions:
    pairs: int = 8
    frames: int = 3             # driving frames per pair and mode (the full run: 20)
    steps: int = 10             # DDIM steps (CPU budget; the paper uses 40)
    guidance: float = 2.5
    seed: int = 0
    fit_steps: int = 120
    sensitivity: bool = True

    def __post_init__(self):
        for name in ("pairs", "frames", "steps", "fit_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pairs < 2:
            raise ValueError(f"pairs must be >= 2 (intervals over pairs), got {self.pairs}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")


def _slice(code, index):
    from avatar_models.warpface import MotionCode

    return MotionCode(*(getattr(code, f)[index] for f in ("theta_sr", "theta_rs", "alpha",
                                                           "groups")))


def generate(model, codec, pairs: list[EvalPair], options: EvalOptions, *,
             sensitivity: bool = False, device="cpu") -> dict:
    """Every frame one checkpoint renders for the evaluation, in ONE batched DDIM run (one
    noise draw shared by all rows; each row uses its own source's cached ReferenceNet features).

    Returns frames [0, 1] per pair: ``self`` / ``cross`` [F, 3, 64, 64], ``null`` (theta = 0)
    and ``canonical`` (theta_(s->r)) [1, 3, 64, 64], and with ``sensitivity`` ``sweep``
    [K * 2, 3, 64, 64] (group k at -2 std then +2 std) for the first sources."""
    from samplers.warpface import (
        SampleSettings,
        ddim_sample,
        edit_conditions,
        encode_motion,
        make_scheduler,
    )

    def encode(frames):
        with torch.no_grad():
            return codec.encode(frames * 2 - 1).float().to(device)

    n_f = options.frames
    sources = encode(torch.stack([p.source_frame for p in pairs]))      # [P, C, h, w]
    code_s = encode_motion(model, sources)
    rows, owners, layout = [], [], []
    for i, pair in enumerate(pairs):
        entry = {}
        for mode in ("self", "cross"):
            code_d = encode_motion(model, encode(pair.driving_frames[mode]))
            rows.append(code_d.theta_rs - code_s.theta_rs[i:i + 1])      # Eq. 4, [F, Dm]
            entry[mode] = (sum(len(r) for r in rows) - n_f, n_f)
        rows.append(torch.zeros(1, model.config.motion_dim, device=device))
        entry["null"] = (sum(len(r) for r in rows) - 1, 1)
        rows.append(code_s.theta_sr[i:i + 1])
        entry["canonical"] = (sum(len(r) for r in rows) - 1, 1)
        if sensitivity and i < SENSITIVITY_SOURCES:
            with torch.no_grad():
                books = model.mgme.orthonormal_codebooks()
                sweep = [edit_conditions(_slice(code_s, slice(i, i + 1)), books, k,
                                         [-SENSITIVITY_STD, SENSITIVITY_STD])
                         for k in range(model.config.groups)]
            rows.append(torch.cat(sweep))
            entry["sweep"] = (sum(len(r) for r in rows) - len(rows[-1]), len(rows[-1]))
        owners += [i] * (sum(len(r) for r in rows) - len(owners))
        layout.append(entry)
    conditions = torch.cat(rows)                                          # [R, Dm]
    owner = torch.tensor(owners, device=device)
    with torch.no_grad():
        reference = [r[owner] for r in model.reference_features(sources)]  # [R, N_l, C_l] each

    def denoise(z, t, theta):
        refs = reference if z.shape[0] == len(owner) else [torch.cat([r, r]) for r in reference]
        return model(z, t, theta, refs)

    settings = SampleSettings(steps=options.steps, guidance=options.guidance,
                              batch=conditions.shape[0])
    latents = ddim_sample(denoise, conditions, sources.shape[1:], make_scheduler(model.config),
                          settings, generator=torch.Generator().manual_seed(options.seed),
                          device=device)
    with torch.no_grad():
        frames = (codec.decode(latents.float().cpu()).clamp(-1, 1) + 1) / 2
    return [{k: frames[a:a + n] for k, (a, n) in entry.items()} for entry in layout]


# ---------------------------------------------------------------------------------------------
# diagnostics


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of the centred rows of ``x`` [N, D]."""
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def ridge_r2(x_train, y_train, x_test, y_test, ridge: float = 1e-3) -> torch.Tensor:
    """R^2 per output column of a ridge regression fitted on standardised ``x_train`` (lambda =
    ``ridge`` x trace / D) and scored on the test rows (1 - SSE / SST about the test mean)."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-8)
    a = ((x_train - mean) / std).double()
    b = ((x_test - mean) / std).double()
    ym = y_train.mean(0).double()
    gram = a.T @ a
    lam = ridge * gram.trace() / gram.shape[0]
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype),
                           a.T @ (y_train.double() - ym))
    pred = b @ w + ym
    y = y_test.double()
    sst = (y - y.mean(0)).pow(2).sum(0).clamp_min(1e-12)
    return 1 - (y - pred).pow(2).sum(0) / sst


def probe_set() -> dict:
    """Frames and true parameters of the probe identities (train / test split by identity)."""
    out = {}
    for split, base, count in (("train", PROBE_SEED, PROBE_TRAIN),
                               ("test", PROBE_TEST_SEED, PROBE_TEST)):
        frames, params = [], []
        for j in range(count):
            p = pf.sample_motion(PROBE_MOTION + base - PROBE_SEED + j, 2 * PROBE_FRAMES)[::2]
            frames.append(pf.render(pf.sample_identity(base + j), p)[0])
            params.append(p)
        out[split] = (torch.cat(frames), torch.cat(params))
    return out


def semantic_collapse(model, codec, probe: dict) -> dict:
    from samplers.warpface import encode_motion

    thetas = {}
    for split, (frames, _) in probe.items():
        with torch.no_grad():
            thetas[split] = encode_motion(model, codec.encode(frames * 2 - 1).float(),
                                          batch=64).theta_rs
    r2 = ridge_r2(thetas["train"], probe["train"][1], thetas["test"], probe["test"][1])
    return {"r2": dict(zip(pf.PARAM_NAMES, r2.tolist())),
            "r2_pose": r2[list(POSE)].mean().item(),
            "r2_expression": r2[list(EXPRESSION)].mean().item(),
            "effective_rank": effective_rank(thetas["test"]),
            "theta_dim": int(thetas["test"].shape[1])}


def denoising_diagnostics(model, codec, pairs: list[EvalPair], device="cpu") -> dict:
    """Why samples look as they do (added after the first look at a sample, not a ranking
    metric): the eps-MSE of the model on the pairs' first self-driving frame at fixed timesteps,
    with the pair's theta_(s->d) and with theta = 0, and the norm of theta_(s->d)."""
    from avatar_models.training.diffusion import GaussianDiffusion
    from samplers.warpface import encode_motion

    def encode(frames):
        with torch.no_grad():
            return codec.encode(frames * 2 - 1).float().to(device)

    z_s = encode(torch.stack([p.source_frame for p in pairs]))
    z_d = encode(torch.stack([p.driving_frames["self"][0] for p in pairs]))
    theta = encode_motion(model, z_d).theta_rs - encode_motion(model, z_s).theta_rs
    diffusion = GaussianDiffusion(model.config.diffusion_schedule())
    gen = torch.Generator().manual_seed(0)
    out = {"timesteps": list(DIAGNOSTIC_TIMESTEPS), "eps_mse": [], "eps_mse_theta_zero": [],
           "theta_norm_mean": theta.norm(dim=1).mean().item()}
    with torch.no_grad():
        reference = model.reference_features(z_s)
        for t in DIAGNOSTIC_TIMESTEPS:
            tt = torch.full((len(pairs),), t, device=device)
            noise = torch.randn(z_d.shape, generator=gen).to(device)
            z_t = diffusion.q_sample(z_d, tt, noise)
            for key, th in (("eps_mse", theta), ("eps_mse_theta_zero", torch.zeros_like(theta))):
                out[key].append((model(z_t, tt, th, reference).float() - noise).pow(2)
                                .mean().item())
    return out


def sensitivity_table(fitted_sweeps: list[torch.Tensor], groups: int) -> dict:
    """S[k, j] and per-group concentration from fitted parameters of the +-2 std sweeps, each
    [K * 2, 8] (group k: row 2k at -2 std, row 2k + 1 at +2 std)."""
    s = torch.stack([(f[1::2] - f[0::2]).abs() / PARAM_RANGE for f in fitted_sweeps]).mean(0)
    conc = s.max(1).values / s.sum(1).clamp_min(1e-12)
    return {"params": list(pf.PARAM_NAMES), "table": s.tolist(), "concentration": conc.tolist(),
            "groups": groups}


# ---------------------------------------------------------------------------------------------
# the whole evaluation


def _checkpoints(folder: Path) -> dict[str, Path]:
    found = {}
    for arm in ARM_FLAGS:
        for path in sorted(Path(folder).glob(f"{arm}_s*.safetensors")):
            if not path.name.endswith(".codec.safetensors"):
                found[path.stem] = path
    return found


def evaluate(folder: Path = ASSETS, out: Path = Path("out/warpface"),
             options: EvalOptions = EvalOptions(), *, device="cpu", progress: bool = True
             ) -> dict:
    """Run the fixed protocol on every checkpoint in ``folder``; write ``metrics.json`` and the
    plots to ``out``."""
    from avatar_models.warpface import modulation_trends

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = _checkpoints(folder)
    if not checkpoints:
        raise FileNotFoundError(f"no warpface checkpoints (<arm>_s<seed>.safetensors) in "
                                f"{str(folder)!r}: run `make train-warpface`")
    log = print if progress else (lambda *a, **k: None)
    pairs = make_pairs(options.pairs, options.frames)
    probe = probe_set()

    def fit(ident, frames):
        return dm.fit_params(ident, frames, steps=options.fit_steps)

    # floor and copy-source need no model (the floor's codec ceiling uses the first codec)
    first_codec = load_arm(next(iter(checkpoints.values())), device)[1]
    floor = {m: [] for m in ("self", "cross")}
    copy = {m: [] for m in ("self", "cross")}
    fitted_source = []
    for pair in pairs:
        fitted_source.append(fit(pair.source_ident, pair.source_frame[None])[0])
        for mode in ("self", "cross"):
            fitted = fit(pair.source_ident, pair.ideal_frames[mode])
            floor[mode].append(floor_metrics(pair, mode, fitted, first_codec))
            n = options.frames
            copy[mode].append(frame_metrics(pair.source_frame[None].expand(n, -1, -1, -1),
                                            fitted_source[-1][None].expand(n, -1), pair, mode))
    log(f"floor and copy-source: {time.perf_counter() - start:.0f} s")
    results = {"floor": {m: summarize(v) for m, v in floor.items()},
               "copy_source": {m: summarize(v) for m, v in copy.items()},
               "checkpoints": {}}
    per_pair: dict[str, dict] = {}
    samples = {}
    timesteps = torch.arange(0, 1000, 50)
    trends = {}
    for name, path in checkpoints.items():
        t0 = time.perf_counter()
        model, codec = load_arm(path, device)
        with_sweep = options.sensitivity and name == "warpca_s0"
        rendered = generate(model, codec, pairs, options, sensitivity=with_sweep, device=device)
        metrics = {m: [] for m in ("self", "cross")}
        null_vs_source, canon, sweeps = [], [], []
        null_metrics = {m: [] for m in ("self", "cross")}
        for pair, frames in zip(pairs, rendered):
            keys = [k for k in ("self", "cross", "null", "canonical", "sweep") if k in frames]
            fitted_all = fit(pair.source_ident, torch.cat([frames[k] for k in keys]))
            fitted, at = {}, 0
            for k in keys:
                fitted[k] = fitted_all[at:at + len(frames[k])]
                at += len(frames[k])
            n = options.frames
            for mode in ("self", "cross"):
                metrics[mode].append(frame_metrics(frames[mode], fitted[mode], pair, mode))
                null_metrics[mode].append(frame_metrics(
                    frames["null"].expand(n, -1, -1, -1), fitted["null"].expand(n, -1), pair,
                    mode))
            err = motion_errors(fitted["null"], pair.source_params[None])
            null_vs_source.append({k: v.item() for k, v in err.items()})
            canon.append(fitted["canonical"][0])
            if "sweep" in fitted:
                sweeps.append(fitted["sweep"])
        per_pair[name] = metrics
        samples[name] = rendered
        source_params = torch.stack([p.source_params for p in pairs])
        canon = torch.stack(canon)
        entry = {
            "arm": name.rsplit("_s", 1)[0], "seed": int(name.rsplit("_s", 1)[1]),
            "self": summarize(metrics["self"]), "cross": summarize(metrics["cross"]),
            "theta_zero": {m: summarize(v) for m, v in null_metrics.items()},
            "theta_zero_vs_source": summarize(null_vs_source),
            "canonical_spread": {"params": list(pf.PARAM_NAMES),
                                 "fitted_std": canon.std(0).tolist(),
                                 "source_std": source_params.std(0).tolist(),
                                 "fitted_mean": canon.mean(0).tolist()},
            "semantic_collapse": semantic_collapse(model, codec, probe),
            "denoising": denoising_diagnostics(model, codec, pairs, device),
        }
        if sweeps:
            entry["sensitivity"] = sensitivity_table(sweeps, model.config.groups)
        if model.config.time_modulation:
            tr = modulation_trends(model, timesteps)
            trends[name] = {k: v.tolist() for k, v in tr.items()}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["checkpoints"][name] = entry
        log(f"{name}: {entry['seconds']:.0f} s")
    results["arms"], results["differences"] = arm_summary(per_pair)
    results["modulation_trends"] = {"timesteps": timesteps.tolist(), **trends}
    results["protocol"] = {**asdict(options), "pairs_seeds": "docs/warpface.md",
                           "fit": "samplers/demo/metrics.py fit_params",
                           "interval": dm.INTERVAL_ABOUT, "readout": dm.READOUT_ABOUT}
    results["seconds"] = round(time.perf_counter() - start, 1)
    (out / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    plot_trends(results["modulation_trends"], out / "gamma_delta.png")
    plot_samples(pairs, samples, out / "samples.png")
    log(f"wrote {out / 'metrics.json'}, gamma_delta.png, samples.png "
        f"({results['seconds']:.0f} s)")
    return results


def arm_summary(per_pair: dict[str, dict]) -> tuple[dict, dict]:
    """Per arm: per-pair values averaged over the arm's seeds, intervals over pairs; paired
    differences between arms (first minus second)."""
    arms: dict[str, list[str]] = {}
    for name in per_pair:
        arms.setdefault(name.rsplit("_s", 1)[0], []).append(name)
    pooled = {}
    for arm, names in arms.items():
        pooled[arm] = {}
        for mode in ("self", "cross"):
            n_pairs = len(per_pair[names[0]][mode])
            pooled[arm][mode] = [{k: sum(per_pair[nm][mode][i][k] for nm in names) / len(names)
                                  for k in per_pair[names[0]][mode][i]} for i in range(n_pairs)]
    summary = {arm: {"seeds": len(arms[arm]), **{m: summarize(v) for m, v in p.items()}}
               for arm, p in pooled.items()}
    diffs = {}
    for a, b in (("warpca", "cross"), ("warpca", "notime"), ("notime", "cross")):
        if a in pooled and b in pooled:
            diffs[f"{a}-{b}"] = {m: summarize([{k: x[k] - y[k] for k in x} for x, y in
                                               zip(pooled[a][m], pooled[b][m])])
                                 for m in ("self", "cross")}
    return summary, diffs


def plot_trends(trends: dict, path: Path) -> Path:
    """Appendix D: mean gamma(t) and delta(t) per checkpoint with time modulation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    for name, tr in trends.items():
        if name == "timesteps":
            continue
        for ax, key in zip(axes, ("gamma", "delta")):
            ax.plot(trends["timesteps"], tr[key], label=name)
    for ax, key in zip(axes, ("scale gamma(t)", "shift delta(t)")):
        ax.set_xlabel("timestep t")
        ax.set_title(f"mean {key}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_samples(pairs: list[EvalPair], samples: dict, path: Path, shown: int = 2) -> Path:
    """Rows: source, driving, ideal, then each checkpoint; the first ``shown`` pairs, self then
    cross, every driving frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = []
    for i, pair in enumerate(pairs[:shown]):
        for mode in ("self", "cross"):
            for f in range(len(pair.ideal_frames[mode])):
                col = [pair.source_frame, pair.driving_frames[mode][f], pair.ideal_frames[mode][f]]
                col += [samples[name][i][mode][f] for name in samples]
                cols.append(torch.stack(col))
    grid = torch.stack(cols, 1)                                            # [R, C, 3, H, W]
    r, c = grid.shape[:2]
    image = grid.permute(0, 3, 1, 4, 2).reshape(r * 64, c * 64, 3).clamp(0, 1)
    labels = ["source", "driving", "ideal", *samples]
    fig, ax = plt.subplots(figsize=(c * 0.7 + 1, r * 0.7), dpi=100)
    ax.imshow(image.numpy())
    ax.set_yticks([64 * k + 32 for k in range(r)], labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title("first pairs: self (left half of each pair), cross (right half)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the report tables (docs/warpface.md copies them from out/warpface/results.md)

REPORTED = (("apd_px", "APD px"), ("apd_roll_deg", "APD roll deg"), ("aed", "AED"),
            ("psnr_db", "PSNR dB"), ("identity_sim", "ID sim"), ("leakage_sim", "leak sim"))


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.3g} [{stat['low']:.3g}, {stat['high']:.3g}]"


def results_markdown(results: dict) -> str:
    """Markdown tables of :func:`evaluate`'s results: per mode the floor, the baselines, every
    arm (seeds pooled) and checkpoint, the paired arm differences, then the diagnostics."""
    lines = []
    for mode in ("self", "cross"):
        keys = [(k, name) for k, name in REPORTED if mode == "cross" or k != "leakage_sim"]
        lines += [f"**{mode}-reenactment** (mean [95% interval] over pairs)", "",
                  "| row | " + " | ".join(n for _, n in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        rows = [("estimator floor / codec ceiling", results["floor"][mode]),
                ("copy-source", results["copy_source"][mode])]
        rows += [(f"arm {a} ({r['seeds']} seeds)", r[mode]) for a, r in results["arms"].items()]
        rows += [(f"{n}", c[mode]) for n, c in results["checkpoints"].items()]
        rows += [(f"{n} theta = 0", c["theta_zero"][mode])
                 for n, c in results["checkpoints"].items()]
        rows += [(f"difference {d}", v[mode]) for d, v in results["differences"].items()]
        for name, stats in rows:
            lines.append(f"| {name} | " + " | ".join(_cell(stats.get(k)) for k, _ in keys)
                         + " |")
        lines.append("")
    lines += ["**Diagnostics per checkpoint**", "",
              "| checkpoint | probe R^2 pose | probe R^2 expr | eff. rank theta (of 64) | "
              "mean norm theta_(s->d) | theta=0 vs source APD px / AED | eps-MSE t=100/500/950 "
              "(theta=0) | seconds |", "|---" * 8 + "|"]
    for n, c in results["checkpoints"].items():
        sc, dn, tz = c["semantic_collapse"], c["denoising"], c["theta_zero_vs_source"]
        at = [dn["timesteps"].index(t) for t in (100, 500, 950)]
        eps = "/".join(f"{dn['eps_mse'][i]:.3f}" for i in at)
        eps0 = "/".join(f"{dn['eps_mse_theta_zero'][i]:.3f}" for i in at)
        lines.append(f"| {n} | {sc['r2_pose']:.3f} | {sc['r2_expression']:.3f} | "
                     f"{sc['effective_rank']:.2f} | {dn['theta_norm_mean']:.2e} | "
                     f"{tz['apd_px']['mean']:.2f} / {tz['aed']['mean']:.3f} | {eps} ({eps0}) | "
                     f"{c['seconds']:.0f} |")
    lines.append("")
    for n, c in results["checkpoints"].items():
        spread = c["canonical_spread"]
        lines.append(f"canonical spread {n}: fitted std / source std per parameter: " + ", ".join(
            f"{p} {f:.2f}/{s:.2f}" for p, f, s in zip(spread["params"], spread["fitted_std"],
                                                     spread["source_std"])))
    for n, c in results["checkpoints"].items():
        if "sensitivity" in c:
            sens = c["sensitivity"]
            lines += ["", f"**K x parameter sensitivity ({n})**: S[k, j] = mean |p_j(+2 std) - "
                          "p_j(-2 std)| / range_j", "",
                      "| group | " + " | ".join(sens["params"]) + " | concentration |",
                      "|---" * (len(sens["params"]) + 2) + "|"]
            for k, (row, conc) in enumerate(zip(sens["table"], sens["concentration"])):
                lines.append(f"| G{k + 1} | " + " | ".join(f"{v:.3f}" for v in row)
                             + f" | {conc:.2f} |")
    return "\n".join(lines) + "\n"
