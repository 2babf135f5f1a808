"""MCDM's Table 7, honestly: Performer vs softmax in the temporal layer, nothing else changed.

Paper 002, appendix C, Table 7: minutes to generate 30 ... 7200 frames with the memory-efficient
temporal attention on fast attention (Performer, "MCDM") and on softmax self-attention
("Vanilla"), everything else unchanged. Three measurements, all on the same machine in one run:

1. **End to end** (:func:`end_to_end`): ``samplers.mcdm.mcdm_sample`` over each frame count, once
   per arm. The two models hold THE SAME weights (the softmax arm is the Performer model's state
   dict loaded into a config that differs only in ``temporal``), so only the attention call of
   the temporal layer differs. The temporal layer's share is the time spent inside every
   :class:`avatar_models.mcdm.MemoryTemporalAttention` forward (hooks; on CUDA each hook
   synchronises, which adds a little to both arms).
2. **The layer's real sequence length:** the sampler runs clip by clip and the memory restarts
   at every clip, so the temporal layer always sees T = 2f tokens (f memory + f present frames;
   f = 16 in the paper: T = 32, f = 4 in ``tiny``: T = 8), whatever the video's length. Its cost
   per frame is therefore constant, and both arms' times are linear in the frame count.
3. **Kernel-level crossover** (:func:`crossover`): ``kernels.performer_attention`` against
   ``kernels.attention3d`` (the softmax arm's call) at the temporal layer's shape (spatial
   positions folded into the batch, the layer's heads, head dim and M random features), over
   sequence lengths T; the crossover is the smallest T from which the Performer stays faster.
   Where the full batch would not fit (softmax materialises B*H*T*T scores), ``sequences``
   of the B' sequences are timed and the time is scaled by B'/sequences (recorded per row).

The paper's own Table 7 cannot come from such a sampler: its times grow faster than linearly
with frames (MCDM 5.7 min for 300 frames, 74.5 for 7200: 24x the frames, 13x the time, but
Vanilla 8.6 -> 264.6, 31x), and its MCDM time per frame falls (1.5 s/frame at 30 frames, 0.62
at 7200). A clip-by-clip sampler whose state has a fixed size has constant time per frame.

    python -m bench.mcdm_table7                        # CPU: tiny config, short videos
    python -m bench.mcdm_table7 --config paper --frames 30,300 --steps 25   # on a GPU
    python -m bench.mcdm_table7 --smoke --out /tmp/t7.json                  # CI, seconds

CPU results go to ``bench/results/cpu/mcdm/table7.json`` (nested one level deeper than the
harness's ``<device>/<op>.json`` files, which ``bench.report`` schema-checks); a CUDA run writes
``bench/results/<gpu slug>/mcdm/table7.json``. Never a CPU number in a GPU folder.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import kernels
from bench.harness import RESULTS_DIR, device_slug, environment, time_ms

CPU_LABEL = ("CPU run (no GPU): these timings say how the two arms compare on this CPU only; "
             "they are not evidence for any GPU claim")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_arms(config: str, device: str, seed: int = 0):
    """(performer model, softmax model) with identical weights, eval mode, on ``device``."""
    from avatar_models.mcdm import MCDM, MCDMConfig

    torch.manual_seed(seed)
    base = MCDMConfig.from_name(config)
    performer = MCDM(MCDMConfig.from_dict({**base.to_dict(), "temporal": "performer"}))
    # the temporal layers' output projections start at zero (identity at init); give them
    # weights so the timed layer computes a real update (the timing does not depend on values)
    with torch.no_grad():
        for m in performer.modules():
            if type(m).__name__ == "MemoryTemporalAttention":
                torch.nn.init.normal_(m.proj.weight, std=0.02)
    softmax = MCDM(MCDMConfig.from_dict({**base.to_dict(), "temporal": "softmax"}))
    softmax.load_state_dict(performer.state_dict())
    return performer.to(device).eval(), softmax.to(device).eval()


class LayerTimer:
    """Accumulated wall time inside every MemoryTemporalAttention forward of a model."""

    def __init__(self, model, device: str):
        from avatar_models.mcdm import MemoryTemporalAttention

        self.seconds, self.calls, self.device = 0.0, 0, device
        self._start = 0.0
        self._handles = []
        for m in model.modules():
            if isinstance(m, MemoryTemporalAttention):
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def end_to_end(model, frames: int, steps: int, device: str, seed: int = 0) -> dict:
    """Seconds to sample ``frames`` frames (random reference, audio and image inputs), and the
    temporal layers' share of it."""
    from samplers.mcdm import MCDMSettings, mcdm_sample

    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    reference = torch.rand(cfg.in_channels, cfg.latent_size, cfg.latent_size, generator=gen)
    image = torch.rand(cfg.image_dim, generator=gen)
    audio = torch.rand(frames, cfg.audio_dim, generator=gen)
    timer = LayerTimer(model, device)
    _sync(device)
    start = time.perf_counter()
    try:
        report = mcdm_sample(model, reference=reference * 2 - 1, image=image, audio=audio,
                             total_frames=frames, settings=MCDMSettings(steps, steps),
                             generator=torch.Generator().manual_seed(seed), device=device,
                             progress=False)
    finally:
        timer.remove()
    _sync(device)
    total = time.perf_counter() - start
    return {"frames": frames, "clips": report["clips"], "seconds": round(total, 4),
            "seconds_per_frame": round(total / frames, 5),
            "temporal_seconds": round(timer.seconds, 4),
            "temporal_share": round(timer.seconds / total, 4), "temporal_calls": timer.calls}


def temporal_shapes(config: str) -> list[dict]:
    """The distinct (B', H, D, M) of the temporal layers of one clip's denoiser call (batch 1):
    B' = spatial positions of the level, H = heads, D = width / heads."""
    from avatar_models.mcdm import MCDMConfig

    cfg = MCDMConfig.from_name(config)
    shapes = []
    for level, width in enumerate(cfg.channels):
        side = cfg.latent_size // 2 ** level
        shape = {"level": level, "batch": side * side, "heads": cfg.heads,
                 "head_dim": width // cfg.heads, "features": cfg.performer_features}
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def _kernel_ms(fn, device: str) -> float:
    if device == "cuda":
        return time_ms(fn, device)[0]
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[2]


def crossover(shape: dict, lengths: list[int], device: str, dtype: torch.dtype,
              score_budget: float = 2 ** 27) -> dict:
    """Time ``performer_attention`` and ``attention3d`` (default backends) over ``lengths`` at
    ``shape``; ``score_budget``: the most elements of the largest intermediate (softmax's
    sequences * H * T * T scores, the reference Performer's sequences * H * T * M features)
    timed at once."""
    b, h, d, m = shape["batch"], shape["heads"], shape["head_dim"], shape["features"]
    gen = torch.Generator().manual_seed(0)
    features = kernels.orthogonal_features(m, d, generator=gen).to(device, dtype)
    rows = []
    for t in lengths:
        seqs = max(1, min(b, int(score_budget // (h * t * max(t, m)))))
        q, k, v = (torch.randn(seqs, t, h, d, generator=gen).to(device, dtype) for _ in range(3))
        with torch.no_grad():
            perf = _kernel_ms(lambda: kernels.performer_attention(q, k, v, features), device)
            soft = _kernel_ms(lambda: kernels.attention3d(q, k, v), device)
        scale = b / seqs
        rows.append({"T": t, "sequences_timed": seqs, "scale": scale,
                     "performer_ms": round(perf * scale, 4), "softmax_ms": round(soft * scale, 4),
                     "performer_over_softmax": round(perf / soft, 4)})
    faster = [r["performer_ms"] < r["softmax_ms"] for r in rows]
    cross = None
    for i in range(len(rows)):
        if all(faster[i:]):
            cross = rows[i]["T"]
            break
    # the backends the registry picked for these calls (the ops are registered by now)
    backends = {arm: kernels.registry.resolve(op, features).name
                for arm, op in (("performer", "performer_attention"), ("softmax", "attention3d"))}
    return {**shape, "rows": rows, "crossover_T": cross, "backends": backends}


def run(config: str, frames: list[int], steps: int, lengths: list[int], device: str,
        budget: int = 2 ** 27) -> dict:
    """The whole Table 7 document (see the module docstring); no ``frames``: kernel rows only."""
    from avatar_models.mcdm import MCDMConfig

    cfg = MCDMConfig.from_name(config)
    e2e = {"performer": [], "softmax": []}
    performer, softmax = build_arms(config, device) if frames else (None, None)
    for model in (performer, softmax) if frames else ():   # warm-up: allocation and imports
        end_to_end(model, cfg.clip_frames, 1, device)
    for n in frames:
        for arm, model in (("performer", performer), ("softmax", softmax)):
            e2e[arm].append(end_to_end(model, n, steps, device))
    dtype = torch.float32 if device == "cpu" else torch.float16
    kernel = [crossover(s, lengths, device, dtype, budget) for s in temporal_shapes(config)]
    doc = {
        "what": "MCDM Table 7: temporal layer on Performer vs softmax, everything else the same",
        "label": CPU_LABEL if device == "cpu" else f"GPU run ({device_slug(device)})",
        "device": device, "machine": platform.machine(), "environment": environment(device),
        "config": config, "clip_frames": cfg.clip_frames,
        "temporal_sequence_length": 2 * cfg.clip_frames,
        "steps": {"video": steps, "prior": steps}, "frames": frames, "end_to_end": e2e,
        "kernel_dtype": str(dtype).removeprefix("torch."), "kernel_budget": budget,
        "kernel_lengths": lengths,
        "kernel_reduction": (
            f"per row, sequences_timed = min(B', budget // (H * T * max(T, M))) of the B' "
            f"sequences (budget {budget}) are timed and the time is multiplied by scale = "
            f"B' / sequences_timed; the ratio performer/softmax is unscaled; median of 5 calls "
            f"after one warm-up; lengths T = {lengths}"),
        "kernel": kernel,
        "paper_table7_minutes": {"frames": [30, 300, 1800, 3600, 7200],
                                 "vanilla": [0.97, 8.6, 54.1, 122.5, 264.6],
                                 "mcdm": [0.75, 5.7, 27.3, 46.9, 74.5]},
    }
    doc["summary"] = summarize(doc)
    return doc


def summarize(doc: dict) -> dict:
    """Headline numbers: softmax/performer end-to-end ratio per frame count, the layer's share,
    the kernel ratio at the layer's real T, the crossover per shape, and the paper's per-frame
    times."""
    perf, soft = doc["end_to_end"]["performer"], doc["end_to_end"]["softmax"]
    t_real = doc["temporal_sequence_length"]
    at_real = []
    for k in doc["kernel"]:
        row = next((r for r in k["rows"] if r["T"] == t_real), None)
        at_real.append(None if row is None else row["performer_over_softmax"])
    paper = doc["paper_table7_minutes"]
    return {
        "performer_over_softmax_end_to_end": [round(p["seconds"] / s["seconds"], 3)
                                              for p, s in zip(perf, soft)],
        "temporal_share_performer": [p["temporal_share"] for p in perf],
        "temporal_share_softmax": [s["temporal_share"] for s in soft],
        "kernel_performer_over_softmax_at_real_T": at_real,
        "kernel_crossover_T": [k["crossover_T"] for k in doc["kernel"]],
        "paper_seconds_per_frame": {
            arm: [round(60 * mins / n, 3) for mins, n in zip(paper[arm], paper["frames"])]
            for arm in ("vanilla", "mcdm")},
    }


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def default_out(device: str, config: str = "tiny", kernel_only: bool = False) -> Path:
    folder = "cpu" if device == "cpu" else device_slug(device)
    name = "table7" + ("" if config == "tiny" else f"_{config}") + ("_kernel" if kernel_only
                                                                   else "")
    return RESULTS_DIR / folder / "mcdm" / f"{name}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MCDM Table 7 (Performer vs softmax)")
    parser.add_argument("--config", default="tiny", choices=("tiny", "paper"))
    parser.add_argument("--frames", type=_ints, default=[16, 32, 64],
                        help="video lengths of the end-to-end rows")
    parser.add_argument("--steps", type=int, default=5,
                        help="DDIM steps (video and prior); the paper does not give its own")
    parser.add_argument("--lengths", type=_ints,
                        default=[2 ** i for i in range(3, 14)],
                        help="sequence lengths T of the kernel-level crossover")
    parser.add_argument("--budget", type=int, default=2 ** 27,
                        help="most elements of a kernel row's largest intermediate; fewer "
                             "sequences are timed (and scaled) beyond it")
    parser.add_argument("--kernel-only", action="store_true",
                        help="only the kernel-level crossover (e.g. --config paper on a CPU, "
                             "where the paper-size model is too slow end to end)")
    parser.add_argument("--smoke", action="store_true",
                        help="CI: tiny config, 4 and 8 frames, 1 step, T in 8..64")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default: bench/results/<cpu|gpu slug>/mcdm/"
                             "table7.json)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.config, args.frames, args.steps, args.lengths = "tiny", [4, 8], 1, [8, 16, 32, 64]
    doc = run(args.config, [] if args.kernel_only else args.frames, args.steps, args.lengths,
              device, args.budget)
    out = args.out or default_out(device, args.config, args.kernel_only)
    if device == "cpu" and args.out is None and "cpu" not in out.parts:
        raise RuntimeError(f"refusing to write a CPU result outside a cpu folder: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    s = doc["summary"]
    print(doc["label"])
    for n, r, sp, ss in zip(doc["frames"], s["performer_over_softmax_end_to_end"],
                            s["temporal_share_performer"], s["temporal_share_softmax"]):
        print(f"{n:6d} frames: performer/softmax end to end {r:.3f}; temporal layer share "
              f"{sp:.1%} (performer) vs {ss:.1%} (softmax)")
    print(f"kernel performer/softmax at T={doc['temporal_sequence_length']}: "
          f"{s['kernel_performer_over_softmax_at_real_T']}; crossover T per shape "
          f"{s['kernel_crossover_T']}")
    print(f"wrote {out}")
    return 0 if all(math.isfinite(r) for r in s["performer_over_softmax_end_to_end"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
