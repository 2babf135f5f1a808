"""``avatar-kernels demo lavieid``: LaVieID's Table 2 (baseline, +router, +TAM, both) at toy scale.

From the shipped toy models (``make train-lavieid``, :mod:`samplers.demo.lavieid_train`), on
held-out identities of the ``"parts"`` world (identity seeds >= 1,000,000, never drawn in
training), each with a prompt of the toy vocabulary and a reference image in another pose than
the target clip. Every checkpoint samples the same inputs with the same noise (DDIM, CFG). The
ideal video of each input is known (the renderer draws the identity with the prompt's motion
program), so every metric is computed against the toy's ground truth. The metrics and the
paper's directional predictions were fixed in docs/lavieid.md before the first run.

The TAM-only arm keeps the pretrained DiT frozen: its samples before the TAM are the base
model's samples (checked bitwise and reported), so the TAM is also evaluated as a paired
difference on those same samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar_models import metrics
from avatar_models.data import face_parts
from avatar_models.data import procedural_faces as pf
from samplers.demo.lavieid_train import ARMS, checkpoint_name
from samplers.demo.metrics import embed, flicker, interval

EVAL_SEED_BASE = pf.HELD_OUT_SEED_BASE
IDENTITY_ABOUT = (
    "identity similarity per frame = 1 - mean over the visible parts (brows, eyes, mouth, nose, "
    "skin, hair) of |c_gen - c_ideal|_2 / sqrt(3), where c is the part's mean RGB inside the "
    "renderer's own part mask of that frame (face_parts.part_labels of the ideal clip, zoomed "
    "like the frames; each pixel weighted by its part fraction); 1 = every part has the "
    "reference identity's colours; averaged over the clip's frames")
KID_ABOUT = (
    "KID (FID analogue) = unbiased squared MMD, cubic polynomial kernel, between the rgbhist4-"
    "hog9x8 embeddings (samplers/demo/metrics.py embed) of all generated frames and of all "
    "ideal frames of the held-out inputs; interval: percentile bootstrap over identities "
    "(paired: the same resampled identities for both arms of a difference)")
CONSISTENCY_ABOUT = (
    "VBench-style: mean over frames t >= 1 of (cos(e_t, e_0) + cos(e_t, e_(t-1))) / 2 "
    "(avatar_models.metrics.vbench_consistency) on rgbhist4-hog9x8 embeddings of the frame "
    "restricted to a fixed region of the clip (everything else black): subject = pixels the "
    "ideal face and hair cover in any frame, background = pixels that neither head nor torso "
    "touch in any frame (procedural_faces.region_masks)")
FLICKER_ABOUT = "samplers/demo/metrics.py flicker: mean |x_(t+1) - x_t| of generated minus ideal"
ADHERENCE_ABOUT = (
    "ADDITION (the paper has no text-alignment metric): the fraction of alternative prompts "
    "(each one vocabulary slot changed, 8 per prompt) whose ideal video (same identity, motion "
    "seed and renderer) is farther from the generated video in pixel MSE than the prompt's own "
    "ideal video; 0.5 = chance, 1 = the generated motion matches its prompt best")
# name -> (higher is better, role)
METRICS = {"identity_similarity": (True, "paper (FaceSim)"), "kid": (False, "paper (FID)"),
           "subject_consistency": (True, "paper"), "background_consistency": (True, "paper"),
           "prompt_adherence": (True, "addition"), "flicker": (False, "diagnostic")}
# the paper's directional claims, fixed before the first run (docs/lavieid.md)
PREDICTIONS = (
    *[(f"router beats baseline on {m}", "router", "baseline", m)
      for m in ("identity_similarity", "kid", "subject_consistency", "background_consistency")],
    *[(f"TAM beats baseline on {m}", "tam", "baseline", m)
      for m in ("identity_similarity", "kid", "subject_consistency", "background_consistency")],
    ("router beats TAM on identity_similarity", "router", "tam", "identity_similarity"),
    ("router beats TAM on subject_consistency", "router", "tam", "subject_consistency"),
    ("TAM beats router on background_consistency", "tam", "router", "background_consistency"),
)


@dataclass(frozen=True)
class TableOptions:
    identities: int = 8
    noise_seeds: int = 1
    steps: int = 25                 # DDIM steps (the sample command's default is the paper's
    #                                 50; the demo halves them to fit its CPU budget)
    guidance: float = 6.0
    bootstrap: int = 200
    device: str = "cpu"
    progress: bool = True


def _alternatives(prompt: str) -> list[str]:
    slots = face_parts.parse_prompt(prompt)
    out = []
    for slot, words in face_parts.VOCABULARY.items():
        for w in words:
            if w != slots[slot]:
                alt = {**slots, slot: w}
                out.append("a person {expression}, {eyes}, {mouth} and {head}".format(**alt))
    return out


def eval_inputs(count: int, frames: int, size: int, crop_size: int, window: int,
                text_encoder) -> list[dict]:
    """The held-out inputs and their ground truth: identity seeds EVAL_SEED_BASE + i."""
    data = face_parts.PartFaces(frames=frames, size=size, crop_size=crop_size,
                                text_encoder=text_encoder, window=window)
    inputs = []
    for i in range(count):
        seed = EVAL_SEED_BASE + i
        prompt = face_parts.random_prompt(np.random.default_rng([i, 0x7AB1E]))
        motion_seed, pose_seed = 7919 + i, 104729 + i
        item = data.item(seed, prompt, motion_seed, pose_seed)
        ident = pf.sample_identity(seed, data.world)
        params = face_parts.motion_program(prompt, frames, motion_seed)
        regions = pf.region_masks(ident, params)
        subject = face_parts.window_view(regions["face_hair"].any(0).float(), window, size)[0]
        background = face_parts.window_view(regions["background"].float(), window, size)[0]
        alts = [face_parts.window_view(pf.render(ident, face_parts.motion_program(
            a, frames, motion_seed))[0], window, size) for a in _alternatives(prompt)]
        ref_params = face_parts.reference_pose(pose_seed)
        inputs.append(dict(
            seed=seed, prompt=prompt, item=item, ideal=(item["frames"] + 1) / 2,
            labels=face_parts.window_view(face_parts.part_labels(ident, params), window, size),
            subject=subject > 0.5, background=background > 0.999,
            alternatives=torch.stack(alts),
            reference_pose_gap=float((params[:, :3] - ref_params[:, :3]).abs().sum(1).min())))
    return inputs


def _load(path: Path):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.lavieid import LaVieIDConfig, LaVieIDDiT

    if not path.is_file():
        raise FileNotFoundError(f"{path}: toy LaVieID model not found (run `make "
                                f"train-lavieid`, or pass --checkpoints)")
    ckpt = load_checkpoint(path, system="lavieid")
    model = LaVieIDDiT(LaVieIDConfig.from_dict(ckpt.config))
    model.load_state_dict(ckpt.weights("ema"))
    return model.eval(), ckpt


@torch.no_grad()
def sample_model(model, inputs: list[dict], opts: TableOptions,
                 pre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(before-TAM, final) latents [I * S, F, 3, H, W] for I inputs x S noise seeds; the noise
    depends only on (input, noise seed), so every checkpoint sees the same noise. With ``pre``
    (the samples of a model with the same DiT) only the TAM runs."""
    from samplers.lavieid import LaVieIDSettings, lavieid_sample

    model = model.to(opts.device)
    if pre is not None:
        return pre, model.enhance(pre)
    cfg = model.config
    rows = [x["item"] for x in inputs for _ in range(opts.noise_seeds)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("text", "reference", "identity",
                                                             "crops")}
    pre = lavieid_sample(
        model, text=batch["text"], reference=batch["reference"], identity=batch["identity"],
        crops=batch["crops"] if cfg.router else None,
        latent_shape=(cfg.frames, cfg.in_channels, cfg.input_height, cfg.input_width),
        encode_parts=model.part_tokens if cfg.router else None, enhance=None,
        settings=LaVieIDSettings(opts.steps, opts.guidance),
        generator=torch.Generator().manual_seed(0), device=opts.device)
    return pre, model.enhance(pre)


def _video(latent: torch.Tensor, inputs: int) -> torch.Tensor:
    """Latents [I * S, F, 3, H, W] -> videos [I, S, F, 3, H, W] in [0, 1]."""
    return ((latent.float().cpu().clamp(-1, 1) + 1) / 2).view(inputs, -1, *latent.shape[1:])


def _same_dit(a, b) -> bool:
    pa, pb = list(a.baseline_parameters()), list(b.baseline_parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


def clip_metrics(video: torch.Tensor, inp: dict) -> dict:
    """Per-clip metrics of a generated video [F, 3, H, W] in [0, 1] against its input's ideal
    video (see the *_ABOUT strings); KID is a set metric and is computed by the caller."""
    ideal = inp["ideal"]
    gen_c, visible = face_parts.part_colours(video, inp["labels"])
    ideal_c, _ = face_parts.part_colours(ideal, inp["labels"])
    err = (gen_c - ideal_c).norm(dim=-1) / 3 ** 0.5                         # [F, M]
    per_frame = 1 - (err * visible).sum(1) / visible.sum(1).clamp_min(1)     # [F]
    per_part = {f"identity_{p}": float(1 - err[:, m][visible[:, m]].mean())
                for m, p in enumerate(face_parts.PARTS) if visible[:, m].any()}
    out = {"identity_similarity": float(per_frame.mean()), **per_part}
    for name, region in (("subject", inp["subject"]), ("background", inp["background"])):
        out[f"{name}_consistency"] = metrics.vbench_consistency(
            embed(video * region).double())
    out["flicker"] = flicker(video, ideal)
    own = (video - ideal).pow(2).mean()
    others = (video[None] - inp["alternatives"]).pow(2).mean((1, 2, 3, 4))
    out["prompt_adherence"] = float(((others > own).double()
                                     + 0.5 * (others == own).double()).mean())
    return out


@torch.no_grad()
def denoising_check(model, inputs: list[dict], timesteps=(100, 300, 600, 900)) -> dict:
    """Diagnostic of the pretrained baseline: x0-hat MSE of ONE model call on the ideal clips
    noised to timestep t (fixed noise), relative to the clips' variance, per t."""
    from avatar_models.lavieid import _alpha_sigma

    batch = {k: torch.stack([x["item"][k] for x in inputs]) for k in ("frames", "text",
                                                                      "reference", "identity")}
    z0 = batch["frames"]
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    out = {}
    for t in timesteps:
        tt = torch.full((z0.shape[0],), t)
        a, s = _alpha_sigma(tt, z0)
        zt = a * z0 + s * noise
        v = model(zt, tt.float(), batch["text"], batch["reference"], batch["identity"])
        out[str(t)] = float((a * zt - s * v - z0).pow(2).mean() / z0.var())
    return out


def _seed_mean(videos: torch.Tensor, inp: dict) -> dict:
    """:func:`clip_metrics` of one input's videos [S, F, 3, H, W], averaged over the S seeds."""
    each = [clip_metrics(v, inp) for v in videos]
    return {k: float(np.mean([e[k] for e in each])) for k in each[0]}


def _kid(gen: torch.Tensor, ideal: torch.Tensor, ids: torch.Tensor) -> float:
    """KID of the frames of identities ``ids`` (with repeats): gen [I, N, E], ideal [I, F, E]."""
    return metrics.kid(gen[ids].flatten(0, 1), ideal[ids].flatten(0, 1))


def _kid_interval(gen: torch.Tensor, ideal: torch.Tensor, boot: list[torch.Tensor],
                  other: torch.Tensor | None = None) -> dict:
    """KID (or KID(gen) - KID(other) when ``other`` is given) with a percentile bootstrap
    interval over identities (the same resamples for both terms)."""
    everyone = torch.arange(gen.shape[0])

    def value(ids):
        v = _kid(gen, ideal, ids)
        return v - _kid(other, ideal, ids) if other is not None else v

    draws = torch.tensor([value(ids) for ids in boot], dtype=torch.float64)
    return dict(mean=value(everyone), low=float(draws.quantile(0.025)),
                high=float(draws.quantile(0.975)), n=int(gen.shape[0]), kind="bootstrap")


def _status(diff: dict, higher: bool) -> str:
    sign = 1 if higher else -1
    if sign * diff["low"] > 0 and sign * diff["high"] > 0:
        return "held"
    if sign * diff["mean"] > 0:
        return "direction only (interval includes 0)"
    return "failed"


def run_table(checkpoints: Path, out: Path, opts: TableOptions) -> dict[str, Path]:
    """Sample every shipped checkpoint on the held-out inputs, compute Table 2 and write
    ``table.json``, ``table.md`` and ``samples.png`` into ``out``."""
    from samplers.commands.lavieid import text_encoder_for

    timings, start = {}, time.perf_counter()
    checkpoints, out = Path(checkpoints), Path(out)
    record = json.loads((checkpoints / "training.json").read_text()) \
        if (checkpoints / "training.json").is_file() else {}
    seeds = tuple(record.get("recipe", {}).get("seeds", (1, 2)))
    base_model, base_ckpt = _load(checkpoints / "base.safetensors")
    cfg, data = base_model.config, base_ckpt.extra.get("data", {})
    if data.get("text") != "toy":
        raise ValueError(f"{checkpoints / 'base.safetensors'}: the demo takes toy-text models, "
                         f"this one was trained on {data.get('text')!r} text")
    inputs = eval_inputs(opts.identities, cfg.frames, cfg.input_height, cfg.crop_size,
                         int(data.get("window", pf.SIZE)), text_encoder_for(cfg, None))
    timings["inputs_seconds"] = time.perf_counter() - start
    denoising = denoising_check(base_model, inputs)

    def log(msg: str) -> None:
        if opts.progress:
            print(f"[{time.perf_counter() - start:5.0f} s] {msg}", flush=True)

    videos: dict[str, torch.Tensor] = {}       # run -> final [I, S, F, 3, H, W]
    pre_tam: dict[str, torch.Tensor] = {}
    latents: dict[str, torch.Tensor] = {}      # run -> before-TAM latent
    tam_on_base = {}
    runs = ["base", *[f"baseline_s{s}" for s in seeds]]  # the baseline's flicker first
    runs += [f"{arm}_s{s}" for s in seeds for arm in ARMS if arm != "baseline"]
    for run in runs:
        tick = time.perf_counter()
        if run == "base":
            model = base_model
        else:
            arm, seed = run.rsplit("_s", 1)
            model = _load(checkpoints / checkpoint_name(arm, int(seed)))[0]
        reuse = None
        if run.startswith("tam_s"):  # the frozen DiT: the TAM runs on the base model's samples
            tam_on_base[run] = _same_dit(model, base_model)
            reuse = latents["base"] if tam_on_base[run] else None
        latents[run], final = sample_model(model, inputs, opts, pre=reuse)
        pre_tam[run], videos[run] = _video(latents[run], len(inputs)), _video(final, len(inputs))
        timings[f"sample_{run}_seconds"] = time.perf_counter() - tick
        if run.startswith("baseline") or run == "base":
            f = [flicker(v, inp["ideal"]) for inp, vs in zip(inputs, videos[run]) for v in vs]
            log(f"{run}: flicker (generated - ideal) {np.mean(f):+.4f} (measured before any "
                f"module is evaluated)")
        else:
            log(f"{run}: sampled")

    # per run, per input: metrics averaged over the noise seeds
    per_input = {run: [_seed_mean(vs, inp) for inp, vs in zip(inputs, videos[run])]
                 for run in runs}
    tam_pre = {s: [_seed_mean(vs, inp) for inp, vs in zip(inputs, pre_tam[f"tam_s{s}"])]
               for s in seeds}
    ideal_metrics = [clip_metrics(inp["ideal"], inp) for inp in inputs]
    # diagnostic row: the reference image copied into every frame (no motion, reference pose)
    copy_metrics = [clip_metrics(((inp["item"]["reference"] + 1) / 2).expand_as(inp["ideal"]),
                                 inp) for inp in inputs]
    emb_ideal = torch.stack([embed(inp["ideal"]).double() for inp in inputs])   # [I, F, E]

    def emb(v):                                                       # [I, S, F, ...] -> [I, N, E]
        return torch.stack([embed(x.flatten(0, 1)).double() for x in v])

    emb_runs = {run: emb(v) for run, v in videos.items()}
    emb_runs.update({f"tam_s{s}_before_tam": emb(pre_tam[f"tam_s{s}"]) for s in seeds})
    gen = torch.Generator().manual_seed(0)
    boot = [torch.randint(0, len(inputs), (len(inputs),), generator=gen)
            for _ in range(opts.bootstrap)]

    arms = {"base": ["base"], **{arm: [f"{arm}_s{s}" for s in seeds] for arm in ARMS}}
    names = [k for k in per_input["base"][0] if (k in METRICS or k.startswith("identity_"))
             and all(k in x for r in runs for x in per_input[r])]  # parts seen in every input

    def pooled(run_names, metric):                       # per input, mean over training seeds
        return [float(np.mean([per_input[r][i][metric] for r in run_names]))
                for i in range(len(inputs))]

    def kid_emb(run_names):                                       # frames of all seeds pooled
        return torch.cat([emb_runs[r] for r in run_names], 1)

    table = {}
    for arm, run_names in arms.items():
        table[arm] = {m: interval(pooled(run_names, m)) for m in names}
        table[arm]["kid"] = _kid_interval(kid_emb(run_names), emb_ideal, boot)
        table[arm]["per_seed"] = {r: {m: float(np.mean([x[m] for x in per_input[r]]))
                                      for m in names} | {"kid": metrics.kid(
                                          emb_runs[r].flatten(0, 1), emb_ideal.flatten(0, 1))}
                                  for r in run_names}
    table["ideal"] = {m: interval([x[m] for x in ideal_metrics]) for m in names}
    table["copy reference"] = {m: interval([x[m] for x in copy_metrics]) for m in names}

    def difference(a, b, metric):
        if metric == "kid":
            return _kid_interval(kid_emb(arms[a]), emb_ideal, boot, other=kid_emb(arms[b]))
        pa, pb = pooled(arms[a], metric), pooled(arms[b], metric)
        return interval([x - y for x, y in zip(pa, pb)])

    all_metrics = [*names, "kid"]
    diffs = {f"{a} - {b}": {m: difference(a, b, m) for m in all_metrics}
             for a, b in (("router", "baseline"), ("tam", "baseline"), ("both", "baseline"),
                          ("router", "tam"), ("baseline", "base"))}
    # the TAM on the frozen DiT's own samples: after minus before, paired per input and seed
    paired = {}
    for m in names:
        paired[m] = interval([float(np.mean([per_input[f"tam_s{s}"][i][m] - tam_pre[s][i][m]
                                             for s in seeds])) for i in range(len(inputs))])
    before = torch.cat([emb_runs[f"tam_s{s}_before_tam"] for s in seeds], 1)
    paired["kid"] = _kid_interval(kid_emb(arms["tam"]), emb_ideal, boot, other=before)
    diffs["tam after - before TAM (same samples)"] = paired

    predictions = []
    for text, a, b, m in PREDICTIONS:
        d = difference(a, b, m)
        predictions.append(dict(prediction=text, difference=f"{a} - {b}", metric=m, **d,
                                status=_status(d, METRICS[m][0])))
    timings["total_seconds"] = time.perf_counter() - start
    result = dict(
        inputs=[dict(identity_seed=x["seed"], prompt=x["prompt"],
                     reference_pose_gap=x["reference_pose_gap"]) for x in inputs],
        options=opts.__dict__, seeds=list(seeds), table=table, differences=diffs,
        predictions=predictions, tam_arm_dit_equals_base=tam_on_base,
        base_denoising=denoising,
        metrics={m: dict(higher_is_better=METRICS[m][0], role=METRICS[m][1]) for m in METRICS},
        about=dict(identity=IDENTITY_ABOUT, kid=KID_ABOUT, consistency=CONSISTENCY_ABOUT,
                   flicker=FLICKER_ABOUT, prompt_adherence=ADHERENCE_ABOUT,
                   interval="95% Student-t over held-out identities (each: the mean over "
                            "training seeds and noise seeds), KID: bootstrap"),
        timings={k: round(v, 1) for k, v in timings.items()})
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table.json": out / "table.json", "table.md": out / "table.md",
             "samples.png": out / "samples.png"}
    paths["table.json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["table.md"].write_text(markdown(result))
    _contact_sheet(inputs, videos, [f"{a}_s{seeds[0]}" for a in ARMS], paths["samples.png"])
    log(f"done in {timings['total_seconds']:.0f} s")
    if opts.progress:
        print(paths["table.md"].read_text())
    return paths


def _fmt(x: dict, digits: int = 4) -> str:
    return f"{x['mean']:.{digits}f} [{x['low']:.{digits}f}, {x['high']:.{digits}f}]"


def markdown(result: dict) -> str:
    """Table 2, the differences and the predictions as markdown."""
    cols = ["identity_similarity", "kid", "subject_consistency", "background_consistency",
            "prompt_adherence", "flicker"]
    arrows = {m: "↑" if METRICS[m][0] else "↓" for m in cols}
    lines = ["| row | " + " | ".join(f"{m} {arrows[m]}" for m in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for row in ("ideal", "copy reference", "base", "baseline", "router", "tam", "both"):
        r = result["table"][row]
        lines.append(f"| {row} | " + " | ".join(_fmt(r[m]) if m in r else "-" for m in cols)
                     + " |")
    lines += ["", "| paired difference | " + " | ".join(cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for name, d in result["differences"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(d[m], 5) for m in cols) + " |")
    lines += ["", "| prediction (fixed before the run) | difference [95% CI] | status |",
              "|---|---|---|"]
    for p in result["predictions"]:
        lines.append(f"| {p['prediction']} | {_fmt(p, 5)} | {p['status']} |")
    parts = [m for m in result["table"]["baseline"] if m.startswith("identity_")
             and m != "identity_similarity"]
    lines += ["", "| per-part identity similarity | " + " | ".join(p[9:] for p in parts) + " |",
              "|---" * (len(parts) + 1) + "|"]
    for row in ("baseline", "router", "tam", "both"):
        r = result["table"][row]
        lines.append(f"| {row} | " + " | ".join(f"{r[p]['mean']:.4f}" for p in parts) + " |")
    lines += ["", "Base model, one denoising step on the ideal clips (x0-hat MSE / variance of the "
              "clips; 0 = perfect, 1 = no better than their mean): " + ", ".join(
                  f"t={t}: {v:.3f}" for t, v in result["base_denoising"].items())]
    lines += ["", f"TAM arms whose DiT equals the base model's bitwise (their TAM ran on the "
              f"base model's samples): {result['tam_arm_dit_equals_base']}", ""]
    return "\n".join(lines) + "\n"


def _contact_sheet(inputs: list[dict], videos: dict, runs: list[str], path: Path,
                   rows: int = 4) -> None:
    """Per input (first ``rows``): reference | ideal frames | each run's frames (noise seed 0),
    2x nearest-upscaled."""
    from avatar_models.media import to_uint8_frames, write_image

    lines = []
    for i, inp in enumerate(inputs[:rows]):
        tiles = [(inp["item"]["reference"] + 1) / 2, *inp["ideal"]]
        for run in runs:
            tiles += list(videos[run][i, 0])
        lines.append(torch.cat(tiles, -1))
    sheet = torch.nn.functional.interpolate(torch.cat(lines, -2)[None], scale_factor=2,
                                            mode="nearest")[0]
    write_image(path, to_uint8_frames((sheet * 2 - 1)[None])[0])
