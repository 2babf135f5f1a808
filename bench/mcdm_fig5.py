"""Fig. 5 of MCDM at the paper's length: the demo's per-window curves read at fixed frames.

``avatar-kernels demo mcdm --frames 1800`` writes every 16-frame window of every pair (113
windows); docs/mcdm.md ("Fig. 5 at 1800 frames") fixed, before the run, the windows that the
table reports. This script reads the demo's json (or, with ``--partial``, the pairs finished so
far), and writes one compact result: the demo's document (floats rounded) plus, at each chosen
window, SSIM and identity distance per arm and the paired differences full - other arm, mean
and 95% interval over identities; optionally a plot of the whole curves.

    python -m bench.mcdm_fig5 /work/fig5_out/mcdm_demo.json \\
        --out bench/results/cpu/mcdm/fig5_1800.json --plot docs/mcdm_results/fig5_1800.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPORTED_WINDOW_STARTS = (0, 32, 96, 288, 896, 1776)   # fixed before the 1800-frame run
CURVES = {"ssim": "ssim_curve", "identity_distance": "identity_curve"}
SIGNIFICANT_DIGITS = 5                                  # keeps the 1800-frame json small


def at_windows(per_pair: dict[str, list[dict]], window: int,
               starts=REPORTED_WINDOW_STARTS) -> dict:
    """Per window start: every arm's curves and the paired differences full - other arm
    (mean and 95% interval over identities); ``starts`` must be multiples of ``window``
    inside the curves."""
    from samplers.demo.metrics import interval

    windows = len(next(iter(per_pair.values()))[0]["ssim_curve"])
    for s in starts:
        if s % window or not 0 <= s // window < windows:
            raise ValueError(f"starts: expected multiples of window={window} below "
                             f"{windows * window}, got {s}")
    out = {}
    for s in starts:
        w, row = s // window, {}
        for arm, runs in per_pair.items():
            row[arm] = {m: interval([r[c][w] for r in runs]) for m, c in CURVES.items()}
            row[arm]["identity_distance_ideal"] = interval(
                [r["identity_curve_ideal"][w] for r in runs])
        if "full" in per_pair:
            for other in (a for a in per_pair if a != "full"):
                row[f"full_minus_{other}"] = {
                    m: interval([f[c][w] - o[c][w] for f, o in
                                 zip(per_pair["full"], per_pair[other])])
                    for m, c in CURVES.items()}
        out[str(s)] = row
    return out


def rounded(x, digits: int = SIGNIFICANT_DIGITS):
    """``x`` with every float rounded to ``digits`` significant digits."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def fig5_result(doc: dict, starts=REPORTED_WINDOW_STARTS) -> dict:
    """The demo's document with ``fig5_windows`` (``at_windows``) added."""
    window = doc["options"]["window"]
    return {**doc, "fig5_windows": at_windows(doc["per_pair"], window, starts)}


def partial_document(partial: dict, window: int) -> dict:
    """A demo document (summary, window starts) from ``mcdm_demo.partial.json``."""
    from samplers.demo.mcdm_demo import summarize

    per_pair = partial["per_pair"]
    windows = len(next(iter(per_pair.values()))[0]["ssim_curve"])
    return {"options": {"window": window}, "partial": True,
            "pairs_done": partial["pairs_done"], "elapsed_seconds": partial["elapsed_seconds"],
            "window_starts": [w * window for w in range(windows)],
            "summary": summarize(per_pair), "per_pair": per_pair}


def plot(doc: dict, path: Path) -> None:
    """SSIM and identity distance per 16-frame window, mean and 95% band over identities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from samplers.demo.metrics import interval

    starts = doc["window_starts"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, curve) in zip(axes, CURVES.items()):
        for arm, runs in doc["per_pair"].items():
            ivs = [interval([r[curve][w] for r in runs]) for w in range(len(starts))]
            ax.plot(starts, [iv["mean"] for iv in ivs], label=arm)
            ax.fill_between(starts, [iv["low"] for iv in ivs], [iv["high"] for iv in ivs],
                            alpha=0.2)
        if metric == "identity_distance":
            runs = next(iter(doc["per_pair"].values()))
            ax.plot(starts, [interval([r["identity_curve_ideal"][w] for r in runs])["mean"]
                             for w in range(len(starts))], "k--", label="ideal video")
        ax.set_xlabel("first frame of the 16-frame window")
        ax.set_ylabel(metric.replace("_", " "))
        ax.legend()
    n = len(next(iter(doc["per_pair"].values())))
    fig.suptitle(f"MCDM toy, Fig. 5 protocol: {n} held-out identities, mean and 95% interval "
                 f"(CPU)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_json", type=Path, help="the demo's mcdm_demo.json")
    parser.add_argument("--out", type=Path, required=True, help="result json to write")
    parser.add_argument("--plot", type=Path, default=None, help="png of the whole curves")
    parser.add_argument("--starts", type=lambda v: tuple(int(x) for x in v.split(",")),
                        default=REPORTED_WINDOW_STARTS,
                        help="comma-separated window starts to report (default: the ones fixed "
                             "before the 1800-frame run)")
    parser.add_argument("--window", type=int, default=16,
                        help="frames per window (read from the demo json when it has options)")
    parser.add_argument("--note", action="append", default=[],
                        help="a line recorded in the result (command, wall time, peak RSS)")
    args = parser.parse_args(argv)
    doc = json.loads(args.demo_json.read_text())
    if "summary" not in doc:          # mcdm_demo.partial.json: the pairs finished so far
        doc = partial_document(doc, args.window)
    result = rounded(fig5_result(doc, args.starts))
    result["notes"] = args.note
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
