"""``make train-lavieid``: the toy LaVieID models of ``assets/lavieid/`` (Table 2 at toy scale).

Every model is trained by the project's own command, ``avatar-kernels train lavieid``
(:func:`commands` lists the exact lines), on one CPU thread so the files reproduce bit for bit:

1. ``base``: the identity-preserving baseline (router and TAM off), pretrained once;
2. per fine-tuning seed, four arms that start from the shipped base and get the same extra
   budget (steps, batch, learning rate, data seed): ``router`` (router only, baseline frozen),
   ``tam`` (TAM only, baseline frozen), ``both`` (router and TAM, baseline frozen) and
   ``baseline`` (the baseline itself trained further, ``--stage base --init``).

Each checkpoint is then compacted (:func:`samplers.demo.train.compact_checkpoint`: the weights
as float16; these runs keep no EMA, so those are the trained weights) and the engine's sidecars
are removed; ``training.json`` records the commands, wall times and per-step losses.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "lavieid"
ARMS = ("baseline", "router", "tam", "both")
_ARM_FLAGS = {"baseline": ["--stage", "base"], "router": ["--stage", "modules", "--no-tam"],
              "tam": ["--stage", "modules", "--no-router"], "both": ["--stage", "modules"]}


@dataclass(frozen=True)
class LaVieIDRecipe:
    """The shipped toy recipe (docs/lavieid.md): ~15 min on one CPU thread in all."""

    config: str = "toy"             # LaVieIDConfig named config: 32x32 frames, 5 frames
    window: int = 48                # px of the 64 px face zoomed to the model's 32 px
    batch_size: int = 8
    base_steps: int = 900
    base_lr: float = 1e-3
    base_warmup: int = 50
    base_seed: int = 0
    finetune_steps: int = 80        # the same for every arm
    finetune_lr: float = 1e-3
    finetune_warmup: int = 10
    seeds: tuple[int, ...] = field(default=(1, 2))  # fine-tuning seeds (data and init of the
    #                                                 modules); the base is shared


def checkpoint_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}.safetensors"


def commands(recipe: LaVieIDRecipe, out_dir: Path) -> list[tuple[str, list[str]]]:
    """(run name, ``avatar-kernels`` argv) of every run, in order (base first)."""
    r, out_dir = recipe, Path(out_dir)
    common = ["--batch-size", str(r.batch_size), "--ema-decay", "0", "--grad-clip", "1",
              "--no-progress"]
    base = out_dir / "base.safetensors"
    runs = [("base", ["train", "lavieid", "--stage", "base", "--config", r.config,
                      "--window", str(r.window), "--steps", str(r.base_steps),
                      "--lr", f"{r.base_lr:g}", "--warmup-steps", str(r.base_warmup),
                      "--seed", str(r.base_seed), *common, "--out", str(base)])]
    for seed in r.seeds:
        for arm in ARMS:
            runs.append((f"{arm}_s{seed}", [
                "train", "lavieid", *_ARM_FLAGS[arm], "--init", str(base),
                "--window", str(r.window), "--steps", str(r.finetune_steps),
                "--lr", f"{r.finetune_lr:g}", "--warmup-steps", str(r.finetune_warmup),
                "--seed", str(seed), *common,
                "--out", str(out_dir / checkpoint_name(arm, seed))]))
    return runs


def _selected(name: str, only: str | None) -> bool:
    if only is None:
        return True
    if only == "base":
        return name == "base"
    return only.startswith("seed:") and name.endswith(f"_s{only[5:]}")


def train_lavieid(recipe: LaVieIDRecipe | None = None, out_dir: Path = ASSETS,
                  only: str | None = None) -> dict:
    """Run the recipe (or only ``"base"`` / ``"seed:N"``'s four arms) into ``out_dir``;
    ``training.json`` there keeps the record of every run done so far."""
    from avatar_models.training.engine import metrics_path, read_metrics
    from samplers.cli import main
    from samplers.demo.train import ship_checkpoint

    recipe = recipe or LaVieIDRecipe()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # bitwise reproducible files: one thread, fixed seeds
    record_path = out_dir / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update(recipe=asdict(recipe), machine=f"{platform.machine()}, torch "
                  f"{torch.__version__}, 1 thread")
    runs = record.setdefault("runs", {})
    for name, argv in commands(recipe, out_dir):
        if not _selected(name, only):
            continue
        out = Path(argv[argv.index("--out") + 1])
        print(f"[{name}] avatar-kernels {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        if main(argv) != 0:
            raise RuntimeError(f"training run {name} failed: avatar-kernels {' '.join(argv)}")
        wall = time.perf_counter() - start
        steps = read_metrics(metrics_path(out))
        ship_checkpoint(out)
        terms = [k for k in steps[0] if k in ("loss", "diff", "route", "tam")]
        runs[name] = {"command": "avatar-kernels " + " ".join(argv),
                      "wall_seconds": round(wall, 1),
                      "last_50_mean": {k: sum(s[k] for s in steps[-50:]) / len(steps[-50:])
                                       for k in terms},
                      "loss": {k: [round(s[k], 5) for s in steps] for k in terms}}
        print(f"[{name}] {wall:.0f} s, last-50 mean {runs[name]['last_50_mean']}", flush=True)
        record["total_wall_seconds"] = round(sum(r["wall_seconds"] for r in runs.values()), 1)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record
