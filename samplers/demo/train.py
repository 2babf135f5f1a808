"""``make train-demo``: train the demo model on procedural faces (CPU; about an hour for the
fine-world recipe, an estimate).

Two stages, both deterministic per seed:
1. fit the tiny linear autoencoder (:class:`avatar_models.data.patch_pca.PatchPCA`: 8x8-pixel
   tiles -> ``pca_components`` PCA coefficients, so a 64x64 frame is a [k, 8, 8] latent; k = 48
   in the fine-world recipe, 32 in the bundled plain one) on training frames of the recipe's
   world, written as ``patch_pca.safetensors`` beside the checkpoint and recorded as its codec;
2. train the sDiT on those latents with
   :func:`avatar_models.training.anchored.train_anchored`, the function behind ``avatar-kernels
   train anchored`` (:func:`train_command` prints the equivalent command line).
Besides the checkpoint (EMA weights in float16) it writes ``loss.json`` (seed, steps,
hyperparameters, wall time, per-step loss) and ``loss.png``.

Why latents: a pixel-space DiT with 8x8 patches must emit 192 values per token, and at the
widths a CPU can train in minutes it cannot even represent the noise it has to predict
(hidden < 192 makes epsilon prediction rank-deficient); 32 PCA coefficients per token can.
Whitening the coefficients made every channel as hard to denoise as the first and trained worse
in pilot runs; one global scale keeps fine detail cheap, as in pixel space.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from avatar_models.data import procedural_faces as pf

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "demo"
CHECKPOINT = ASSETS / "sdit_faces.safetensors"
AUTOENCODER = "patch_pca.safetensors"  # beside the checkpoint
DATASET = "avatar_models.data.procedural_faces:training_dataset"


@dataclass(frozen=True)
class DemoRecipe:
    """The demo model and its training run.

    The defaults are the fine-world recipe of ``make train-demo`` (docs/demo.md): frames 64x64
    as [48, 8, 8] patch-PCA latents (one token per 8x8 tile, 256 tokens per 4-frame sequence),
    a 160-wide, 6-deep sDiT (3.14M parameters) predicting v, 6000 steps of batch 8 (67 min
    measured on one thread of a busy 2-core CPU, 2026-11-29; ``assets/demo/loss.json`` records
    it).
    """

    hidden: int = 160
    depth: int = 6
    heads: int = 5
    frames: int = 4
    pca_components: int = 48              # latent channels
    pca_patch: int = 8                    # pixels per latent cell (one token per cell)
    pca_frames: int = 2048                # training frames the PCA is fitted on
    pca_whiten: bool = False              # one global scale: keeps the spectrum's shape
    identity_grid: int = pf.IDENTITY_GRID  # G = the source image averaged to grid x grid
    steps: int = 6000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.9999
    seed: int = 0
    world: str = "fine"                   # procedural_faces.WORLDS
    # Not the paper's epsilon: docs/demo.md's diagnostic found this recipe's epsilon model worse
    # than a constant image at high noise (where G decides the colours); v prediction fixes that
    # and gains 2.2 dB face+hair PSNR on the protocol.
    prediction_type: str = "v_prediction"

    def model_config(self):
        from avatar_models.anchored_diffusion import SDiTConfig

        return SDiTConfig.from_name(
            "tiny", hidden=self.hidden, depth=self.depth, heads=self.heads, patch=1,
            frames=self.frames, in_channels=self.pca_components,
            input_size=pf.SIZE // self.pca_patch, control_dim=pf.CONTROL_DIM,
            global_dim=3 * self.identity_grid ** 2)

    def train_config(self):
        from avatar_models.training.anchored import TrainConfig
        from avatar_models.training.diffusion import DiffusionSchedule

        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                           ema_decay=self.ema_decay, seed=self.seed,
                           schedule=DiffusionSchedule(prediction_type=self.prediction_type))


CONDITIONER = "samplers.demo.conditioner:procedural_conditioner"


def train_command(recipe: DemoRecipe, out: Path) -> str:
    """The ``avatar-kernels train anchored`` line that trains the same model (stage 2), given
    the autoencoder file of stage 1 beside ``out``."""
    r = recipe
    return (f"avatar-kernels train anchored --dataset {DATASET} --dataset-arg frames={r.frames} "
            f"--dataset-arg seed={r.seed} --dataset-arg identity_grid={r.identity_grid} "
            f"--dataset-arg world={r.world} "
            f"--dataset-arg autoencoder={Path(out).parent / AUTOENCODER} "
            f"--codec {Path(out).parent / AUTOENCODER} --config tiny "
            f"--set hidden={r.hidden} --set depth={r.depth} --set heads={r.heads} --set patch=1 "
            f"--steps {r.steps} --batch-size {r.batch_size} --lr {r.lr:g} "
            f"--warmup-steps {r.warmup_steps} --min-lr-ratio {r.min_lr_ratio:g} "
            f"--ema-decay {r.ema_decay:g} --seed {r.seed} --conditioner {CONDITIONER} "
            f"--prediction-type {r.prediction_type} --out {out}")


def plot_loss(losses: list[float], mse: list[float], path: Path, title: str,
              prediction_type: str = "epsilon") -> Path:
    """Per-step loss and the weighted MSE of the predicted target (epsilon or v; light) with
    running means (dark), log scale."""
    from avatar_models.training.engine import plot_curves

    target = "eps" if prediction_type == "epsilon" else "v"
    return plot_curves({f"loss = weighted {target} MSE + vb": losses,
                        f"weighted {target} MSE": mse}, path, title)


def compact_checkpoint(path: Path) -> Path:
    """Keep only the EMA weights (what sampling uses), stored as float16, so the bundled file
    stays small; the format is unchanged (``load_checkpoint`` reads it, ``weights("ema")``)."""
    from avatar_models.checkpoint import FORMAT, load_checkpoint, save_tensors_atomic

    ckpt = load_checkpoint(path)
    weights = ckpt.weights("ema")
    tensors = {f"ema.{k}": (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in weights.items()}
    extra = {**ckpt.extra, "stored": "EMA weights only, float16"}
    meta = {"format": FORMAT, "system": ckpt.system, "config": json.dumps(ckpt.config),
            "extra": json.dumps(extra)}
    return save_tensors_atomic(path, tensors, meta)


def ship_checkpoint(checkpoint: Path, *, keep_training_log: bool = False) -> Path:
    """Make a finished engine run shippable in ``assets/``: compact ``checkpoint`` (EMA
    float16, :func:`compact_checkpoint`) and drop the engine's resumable checkpoints beside it;
    also its metrics.jsonl and loss plot unless ``keep_training_log``."""
    import shutil

    from avatar_models.training.engine import metrics_path, plot_path
    from avatar_models.training.run_state import checkpoint_root

    checkpoint = Path(checkpoint)
    compact_checkpoint(checkpoint)
    shutil.rmtree(checkpoint_root(checkpoint), ignore_errors=True)
    if not keep_training_log:
        metrics_path(checkpoint).unlink(missing_ok=True)
        plot_path(checkpoint).unlink(missing_ok=True)
    return checkpoint


def train_demo(recipe: DemoRecipe | None = None, checkpoint: Path = CHECKPOINT, *,
               progress: bool = True) -> dict:
    """Train the demo model; write ``checkpoint``, ``loss.json`` and ``loss.png`` beside it."""
    from avatar_models.data.patch_pca import PatchPCA
    from avatar_models.training.anchored import train_anchored

    recipe = recipe or DemoRecipe()
    checkpoint = Path(checkpoint)
    cfg = recipe.model_config()
    start = time.perf_counter()
    ae_path = checkpoint.parent / AUTOENCODER
    fit = pf.autoencoder_fit_frames(recipe.pca_frames, recipe.seed, recipe.world)
    ae = PatchPCA.fit(fit, recipe.pca_components, recipe.pca_patch, recipe.pca_whiten)
    ae.save(ae_path)
    recon = ae.decode(ae.encode(fit)).clamp(-1, 1)
    ae_psnr = 10 * math.log10(4.0 / torch.nn.functional.mse_loss(recon, fit).item())
    print(f"stage 1: {ae_path} ({recipe.pca_components} components of {recipe.pca_patch}x"
          f"{recipe.pca_patch} tiles, reconstruction PSNR {ae_psnr:.1f} dB on its fit frames)")
    dataset = pf.ProceduralFaces(frames=recipe.frames, seed=recipe.seed, autoencoder=ae,
                                 identity_grid=recipe.identity_grid, world=recipe.world)
    print("stage 2, equivalent to: " + train_command(recipe, checkpoint))
    mse: list[float] = []
    result = train_anchored(cfg, dataset, recipe.train_config(), device="cpu", out=checkpoint,
                            extra={"dataset": DATASET, "dataset_args": {
                                       "frames": recipe.frames, "seed": recipe.seed,
                                       "identity_grid": recipe.identity_grid,
                                       "world": recipe.world},
                                   "codec": {"kind": "patch-pca", "file": AUTOENCODER},
                                   "conditioner": CONDITIONER, "demo_recipe": recipe.__dict__},
                            progress=progress,
                            callback=lambda step, terms: mse.append(terms["mse"]))
    wall = time.perf_counter() - start
    ship_checkpoint(checkpoint)
    params = sum(p.numel() for p in result.model.parameters())
    record = {
        "recipe": recipe.__dict__, "command": train_command(recipe, checkpoint),
        "parameters": params, "wall_seconds": round(wall, 1),
        "autoencoder_psnr_db": round(ae_psnr, 2),
        "machine": f"{platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "final_loss_mean_last_100": sum(result.losses[-100:]) / len(result.losses[-100:]),
        "final_mse_mean_last_100": sum(mse[-100:]) / len(mse[-100:]),
        "loss": [round(v, 5) for v in result.losses], "mse": [round(v, 5) for v in mse]}
    (checkpoint.parent / "loss.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_loss(result.losses, mse, checkpoint.parent / "loss.png",
              f"demo sDiT ({params / 1e6:.2f}M params), seed {recipe.seed}, "
              f"{recipe.steps} steps x batch {recipe.batch_size}, {wall / 60:.1f} min CPU",
              recipe.prediction_type)
    print(f"wrote {checkpoint} ({checkpoint.stat().st_size / 1e6:.1f} MB), "
          f"{checkpoint.parent / 'loss.json'}, {checkpoint.parent / 'loss.png'}")
    return record
