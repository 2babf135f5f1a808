"""Table 8 / Fig. 7 of the MCDM paper at toy scale: evaluate the ``make sweep-mcdm`` checkpoints.

Every checkpoint (setting x seed, ``samplers.demo.mcdm_train.sweep_runs``) samples the demo's
held-out pairs with the same inputs and noise and is scored with the demo's metrics
(``samplers.demo.mcdm_demo.evaluate``). The protocol (length, steps, pairs, aggregation, what
counts as a difference) was fixed in docs/mcdm.md ("Table 8 / Fig. 7 sweep") before any sweep
result existed; ``SweepEvalOptions``' defaults are that protocol.

Resumable: the result file keeps every evaluated checkpoint's per-pair metrics and is rewritten
after each checkpoint; a rerun skips those already there (with the same options) and
``--max-seconds`` stops starting new checkpoints after that long, so the work splits into short
commands.

    python -m samplers.demo.mcdm_sweep [--sweep-dir out/mcdm-sweep]
        [--out bench/results/cpu/mcdm/table8.json] [--max-seconds 540] [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from samplers.demo.mcdm_train import (
    ASSETS,
    DEFAULT_ALPHA,
    DEFAULT_ARCHIVED,
    SWEEP_ALPHA,
    SWEEP_ARCHIVED,
    SWEEP_SEEDS,
    sweep_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "bench" / "results" / "cpu" / "mcdm" / "table8.json"
SWEEP_DIR = ROOT / "out" / "mcdm-sweep"
BASELINE = "no_mta"
# every setting once (alpha = 0.1 at a = 4 is "a4"), the w/o-MTA baseline last
SETTINGS = (*(f"a{a}" for a in SWEEP_ARCHIVED),
            *(f"alpha{al:g}" for al in SWEEP_ALPHA if al != DEFAULT_ALPHA), BASELINE)
METRICS = ("ssim", "identity_distance", "lip_sync", "mouth_corr", "seam_ratio")
CURVES = ("ssim_curve", "identity_curve")
# the paper's comparisons besides "each setting - w/o MTA" (docs/mcdm.md, fixed before results)
CONTRASTS = (("a16", "a2"), ("alpha0", "alpha0.9"))


@dataclass(frozen=True)
class SweepEvalOptions:
    pairs: int = 8
    frames: int = 96
    steps: int = 5                        # docs/mcdm.md: amended from 10 before any result
    prior_steps: int = 5
    clip_video: float = 1.0
    clip_prior: float = 3.0
    window: int = 16
    seed: int = 0                         # noise seed of pair i: seed + i, for every checkpoint
    seeds: tuple[int, ...] = SWEEP_SEEDS  # training seeds, evaluated in this order
    settings: tuple[str, ...] = SETTINGS

    def __post_init__(self):
        from samplers.demo.mcdm_demo import check_counts

        check_counts(self)
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or BASELINE not in self.settings:
            raise ValueError(f"settings must be a subset of {list(SETTINGS)} that includes "
                             f"{BASELINE!r}, got {list(self.settings)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")


def setting_config(setting: str) -> dict:
    """The config fields that define ``setting`` (checked against each checkpoint)."""
    if setting == BASELINE:
        return {"memory": False, "temporal": "softmax"}
    if setting.startswith("alpha"):
        return {"archived_frames": DEFAULT_ARCHIVED, "memory_alpha": float(setting[5:]),
                "memory": True, "temporal": "performer"}
    return {"archived_frames": int(setting[1:]), "memory_alpha": DEFAULT_ALPHA, "memory": True,
            "temporal": "performer"}


def run_name(setting: str, seed: int) -> str:
    return f"{setting}_seed{seed}"


def load_setting(path: Path, setting: str):
    """(model, checkpoint extra) of ``path``, refused unless its config is ``setting``'s."""
    from samplers.demo.mcdm_demo import load_model

    model, extra = load_model(path)
    cfg = model.config.to_dict()
    wrong = {k: (v, cfg.get(k)) for k, v in setting_config(setting).items() if cfg.get(k) != v}
    if wrong:
        raise ValueError(f"{path}: not setting {setting!r}; config fields (expected, got): "
                         f"{wrong}")
    return model, extra


def evaluate_model(model, pairs: list[dict], probe, options: SweepEvalOptions) -> list[dict]:
    """Per-pair metrics of one sweep model (``mcdm_demo.evaluate``)."""
    from samplers.demo.mcdm_demo import evaluate, sample_pair
    from samplers.mcdm import MCDMSettings

    settings = MCDMSettings(steps=options.steps, prior_steps=options.prior_steps,
                            clip_video=options.clip_video, clip_prior=options.clip_prior)
    return [evaluate(sample_pair(model, pair, options.frames, settings, options.seed + i),
                     pair, probe, model.config.clip_frames, options.window)
            for i, pair in enumerate(pairs)]


def run_sweep_eval(options: SweepEvalOptions, sweep_dir: Path = SWEEP_DIR,
                   out: Path = RESULT, assets: Path = ASSETS, max_seconds: float | None = None,
                   progress: bool = True) -> dict:
    """Evaluate every trained checkpoint not yet in ``out`` (seed by seed, in ``options.seeds``
    order), rewriting ``out`` after each; returns the document with its summary."""
    from samplers.demo.mcdm_demo import MouthProbe, held_out_pair

    start = time.perf_counter()
    out = Path(out)
    opts = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}
    doc = json.loads(out.read_text()) if out.is_file() else None
    if doc is not None and doc["options"] != opts:
        raise ValueError(f"--out {str(out)!r} holds results of other options "
                         f"{doc['options']}; pass another --out to evaluate {opts}")
    if doc is None:
        doc = {"options": opts, "device": "cpu", "threads": torch.get_num_threads(),
               "runs": {}}
    todo = [(setting, seed) for seed in options.seeds for setting in options.settings
            if run_name(setting, seed) not in doc["runs"]]
    pairs = probe = None
    for setting, seed in todo:
        name = run_name(setting, seed)
        path = sweep_checkpoint(setting, seed, sweep_dir, assets)
        if not path.is_file():
            if progress:
                print(f"{name}: {path} not trained yet, skipped", flush=True)
            continue
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            if progress:
                print(f"--max-seconds {max_seconds:g} reached; rerun to continue", flush=True)
            break
        t0 = time.perf_counter()
        model, extra = load_setting(path, setting)
        if pairs is None:        # every sweep checkpoint shares s2's data and sizes
            data = extra.get("data", {})
            fps, rate = float(data.get("fps", 25.0)), int(data.get("sample_rate", 16000))
            size = model.config.latent_size
            probe = MouthProbe.fit(size, fps)
            pairs = [held_out_pair(i, options.frames, size, fps, rate, model.config.audio_dim)
                     for i in range(options.pairs)]
        per_pair = evaluate_model(model, pairs, probe, options)
        doc["runs"][name] = {"setting": setting, "seed": seed, "checkpoint": _rel(path),
                             "wall_seconds": round(time.perf_counter() - t0, 1),
                             "per_pair": per_pair}
        doc["summary"] = summarize(doc, options)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        if progress:
            done = sum(run_name(s, d) in doc["runs"] for d in options.seeds
                       for s in options.settings)
            print(f"{name}: ssim {_mean(per_pair, 'ssim'):.3f}, "
                  f"{doc['runs'][name]['wall_seconds']:.0f} s "
                  f"({done}/{len(options.seeds) * len(options.settings)} evaluated)", flush=True)
    doc["summary"] = summarize(doc, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def summarize(doc: dict, options: SweepEvalOptions) -> dict:
    """docs/mcdm.md's aggregation over the complete seeds (every setting evaluated): per
    setting, mean and 95% interval over identities of the per-identity mean over seeds; paired
    differences against w/o MTA and ``CONTRASTS``; each seed's mean over identities."""
    from samplers.demo.metrics import interval

    runs = doc["runs"]
    seeds = [d for d in options.seeds
             if all(run_name(s, d) in runs for s in options.settings)]
    summary: dict = {"complete_seeds": seeds, "settings": {}, "differences": {}}
    if not seeds:
        return summary

    def per_identity(setting: str, key: str, window: int | None = None) -> list[float]:
        def value(row):
            return row[key] if window is None else row[key][window]
        return [sum(value(runs[run_name(setting, d)]["per_pair"][i]) for d in seeds)
                / len(seeds) for i in range(options.pairs)]

    first = runs[run_name(options.settings[0], seeds[0])]["per_pair"][0]
    metrics = [k for k in METRICS if k in first]
    for setting in options.settings:
        row = {k: interval(per_identity(setting, k)) for k in metrics}
        for curve in CURVES:
            row[curve] = [interval(per_identity(setting, curve, w))
                          for w in range(len(first[curve]))]
        row["per_seed"] = {str(d): {k: _mean(runs[run_name(setting, d)]["per_pair"], k)
                                    for k in metrics} for d in seeds}
        summary["settings"][setting] = row
    pairs = [(s, BASELINE) for s in options.settings if s != BASELINE]
    pairs += [c for c in CONTRASTS if all(s in options.settings for s in c)]
    for a, b in pairs:
        summary["differences"][f"{a}_minus_{b}"] = {
            k: interval([x - y for x, y in zip(per_identity(a, k), per_identity(b, k))])
            for k in metrics}
    return summary


def label(setting: str) -> str:
    if setting == BASELINE:
        return "w/o MTA"
    if setting == f"a{DEFAULT_ARCHIVED}":
        return f"a = {DEFAULT_ARCHIVED}, alpha = {DEFAULT_ALPHA:g} (default)"
    if setting.startswith("alpha"):
        return f"alpha = {setting[5:]} (a = {DEFAULT_ARCHIVED})"
    return f"a = {setting[1:]} (alpha = {DEFAULT_ALPHA:g})"


def _fmt(iv: dict) -> str:
    return f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def report_table(doc: dict) -> str:
    """Markdown: per-setting means and the paired differences (mean [95% interval])."""
    s = doc["summary"]
    if not s["complete_seeds"]:
        return "no complete seed evaluated yet"
    metrics = [k for k in METRICS if k in next(iter(s["settings"].values()))]
    lines = [f"complete seeds: {s['complete_seeds']}", "",
             "| setting | " + " | ".join(metrics) + " | SSIM / identity per seed |",
             "|---" * (len(metrics) + 2) + "|"]
    for setting, row in s["settings"].items():
        per_seed = ", ".join(f"{v['ssim']:.3f} / {v['identity_distance']:.3f}"
                             for v in row["per_seed"].values())
        lines.append(f"| {label(setting)} | " + " | ".join(_fmt(row[k]) for k in metrics)
                     + f" | {per_seed} |")
    lines += ["", "| paired difference | " + " | ".join(metrics) + " |",
              "|---" * (len(metrics) + 1) + "|"]
    for name, row in s["differences"].items():
        a, b = name.split("_minus_")
        lines.append(f"| {label(a)} - {label(b)} | " + " | ".join(_fmt(row[k]) for k in metrics)
                     + " |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Two panels: SSIM and identity distance against a (Table 8), SSIM against alpha with the
    w/o-MTA band (Fig. 7); mean and 95% interval over identities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["summary"]["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), constrained_layout=True)

    def errorbar(ax, xs, settings, key, **kw):
        ivs = [rows[s][key] for s in settings]
        means = [iv["mean"] for iv in ivs]
        err = [[m - iv["low"] for m, iv in zip(means, ivs)],
               [iv["high"] - m for m, iv in zip(means, ivs)]]
        ax.errorbar(xs, means, yerr=err, marker="o", capsize=3, **kw)

    archived = [a for a in SWEEP_ARCHIVED if f"a{a}" in rows]
    alphas = [al for al in SWEEP_ALPHA if _alpha_setting(al) in rows]
    for ax, key, title in ((axes[0], "ssim", "Table 8: SSIM"),
                           (axes[1], "identity_distance", "Table 8: identity distance")):
        errorbar(ax, archived, [f"a{a}" for a in archived], key)
        _baseline_band(ax, rows[BASELINE][key])
        ax.set_xscale("log", base=2)
        ax.set_xticks(archived, [str(a) for a in archived])
        ax.set_xlabel("archived frames a")
        ax.set_title(title, fontsize=9)
    errorbar(axes[2], alphas, [_alpha_setting(al) for al in alphas], "ssim")
    _baseline_band(axes[2], rows[BASELINE]["ssim"])
    axes[2].set_xlabel("alpha (Eq. 5)")
    axes[2].set_title("Fig. 7: SSIM", fontsize=9)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"MCDM toy sweep (CPU), {doc['options']['pairs']} identities x seeds "
                 f"{doc['summary']['complete_seeds']}, {doc['options']['frames']} frames",
                 fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _alpha_setting(alpha: float) -> str:
    return f"a{DEFAULT_ARCHIVED}" if alpha == DEFAULT_ALPHA else f"alpha{alpha:g}"


def _baseline_band(ax, iv: dict) -> None:
    ax.axhspan(iv["low"], iv["high"], color="grey", alpha=0.25, label="w/o MTA (95%)")
    ax.axhline(iv["mean"], color="grey", lw=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SweepEvalOptions()
    parser.add_argument("--sweep-dir", type=Path, default=SWEEP_DIR,
                        help="the checkpoints of `make sweep-mcdm`")
    parser.add_argument("--assets", type=Path, default=ASSETS,
                        help="shipped models (seed 3's w/o-MTA baseline is s3_no_mta)")
    parser.add_argument("--out", type=Path, default=RESULT, help="result JSON (resumable)")
    parser.add_argument("--pairs", type=int, default=defaults.pairs)
    parser.add_argument("--frames", type=int, default=defaults.frames)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--prior-steps", type=int, default=defaults.prior_steps)
    parser.add_argument("--window", type=int, default=defaults.window)
    parser.add_argument("--seeds", default=",".join(map(str, defaults.seeds)),
                        help="training seeds, comma-separated, evaluated in this order")
    parser.add_argument("--settings", default=",".join(defaults.settings),
                        help="comma-separated subset of the settings (must include no_mta)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no new checkpoint after this many seconds")
    parser.add_argument("--plot", type=Path, default=None, help="write the figure (PNG)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        options = SweepEvalOptions(pairs=args.pairs, frames=args.frames, steps=args.steps,
                                   prior_steps=args.prior_steps, window=args.window,
                                   seeds=seeds, settings=tuple(args.settings.split(",")))
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(1)
    doc = run_sweep_eval(options, args.sweep_dir, args.out, args.assets, args.max_seconds,
                         progress=not args.no_progress)
    print(report_table(doc))
    if args.plot is not None and doc["summary"]["complete_seeds"]:
        plot(doc, args.plot)
        print(f"wrote {args.plot}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
