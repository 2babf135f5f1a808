"""Denoiser diagnostics of a demo checkpoint: where the fidelity to the ideal video is lost.

``python -m samplers.demo.diagnose [--checkpoint PATH] [--pairs 8] [--out diagnose.json]``
``python -m samplers.demo.diagnose --continue-steps 400 --mapping-lr-scale 1.0 --out pilot.json``

For each held-out pair of the demo (the same seeds as ``avatar-kernels demo``), one window of
T frames of the ideal video is encoded, noised at fixed timesteps with a fixed seed, and
denoised in ONE step. The x0 prediction's PSNR over face+hair (the region G and the landmarks
determine; the demo's fidelity target) is measured with

- ``true``: the pair's own G and landmarks;
- ``null``: the learned null conditions (what classifier-free guidance subtracts);
- ``other_G``: the next pair's G with this pair's landmarks.

``true - other_G`` (the *G gap*) is how much the model uses the identity condition at that
noise level; at high t an epsilon-predicting model that uses G should beat the constant mean
image (``mean_image``). The full sampler (DDIM, one window, guidance 1) and the codec's own
reconstruction bound the picture from below and above; the epsilon MSE per group of 8 latent
channels (PCA components in order of variance) shows which components the model has learnt.
Nothing here is a ranking metric of the demo's protocol: it says why the protocol's numbers are
what they are (docs/demo.md, "Why the fidelity target is missed").

``--samples K`` also draws K full samples (noise seeds 0..K-1) per pair: the mean PSNR of one
sample, the PSNR of the pixel mean of the K samples, and the PSNR between samples 0 and 1. If
the samples are draws from a posterior around its mean, one sample is twice as far from the
truth as the mean (in MSE) and the K-sample mean approaches the posterior mean.

``--continue-steps N`` first continues the checkpoint's weights for N steps of its own recipe
(fresh data, constant lr, raw weights: no EMA) with the given mapping-network learning-rate
scale: a pilot of a recipe change, read on the same table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from samplers.demo.metrics import masked_psnr
from samplers.demo.pipeline import (
    DemoOptions,
    checkpoint_world,
    identity_grid,
    inputs,
    load_model,
    sample_video,
)
from samplers.demo.train import CHECKPOINT

TIMESTEPS = (50, 150, 300, 500, 700, 900, 999)
CONDITIONS = ("true", "null", "other_G")
CHANNEL_GROUP = 8
PILOT_DATA_SEED = 7  # training data of a pilot: not the bundled run's stream (seed 0)
PILOT_LR = 3e-4
PILOT_SEED = 1


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3)


def continue_training(model, ckpt, codec, steps: int, mapping_lr_scale: float, *,
                      lr: float = PILOT_LR, seed: int = PILOT_SEED, progress: bool = True):
    """The checkpoint's model after ``steps`` more steps of its own demo recipe (batch, loss,
    world) at constant ``lr`` (20 warm-up steps), mapping network at ``lr *
    mapping_lr_scale``, without EMA; returns the raw trained weights, in eval mode."""
    from dataclasses import replace

    from avatar_models.data import procedural_faces as pf
    from avatar_models.training.anchored import train_anchored
    from samplers.demo.train import DemoRecipe

    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if "demo_recipe" not in ckpt.extra:
        raise ValueError("checkpoint: expected a demo checkpoint that records its demo_recipe, "
                         "got one without it")
    recipe = DemoRecipe(**ckpt.extra["demo_recipe"])
    train = replace(recipe.train_config(), steps=steps, lr=lr, warmup_steps=min(20, steps),
                    min_lr_ratio=1.0, ema_decay=0.0, seed=seed,
                    mapping_lr_scale=mapping_lr_scale)
    data = pf.ProceduralFaces(frames=recipe.frames, seed=PILOT_DATA_SEED, autoencoder=codec,
                              identity_grid=recipe.identity_grid, world=recipe.world)
    result = train_anchored(model.config, data, train, device="cpu", model=model.float(),
                            progress=progress)
    return result.model.eval()


@torch.no_grad()
def diagnose(checkpoint: Path = CHECKPOINT, pairs: int = 8,
             timesteps: tuple[int, ...] = TIMESTEPS, ddim_steps: int = 25,
             progress: bool = True, continue_steps: int = 0,
             mapping_lr_scale: float | None = None, samples: int = 1) -> dict:
    """The diagnostics of ``checkpoint`` (see the module docstring), means over ``pairs``;
    with ``continue_steps``, of its weights after :func:`continue_training`."""
    from avatar_models.anchored_diffusion import Conditions
    from avatar_models.training.diffusion import DiffusionSchedule, GaussianDiffusion

    if pairs < 2:
        raise ValueError(f"pairs: expected >= 2 (other_G takes the next pair's G), got {pairs}")
    if samples < 1:
        raise ValueError(f"samples: expected >= 1, got {samples}")
    device = torch.device("cpu")
    model, ckpt, codec = load_model(Path(checkpoint), device)
    if codec is None:
        raise ValueError(f"checkpoint: expected a latent demo checkpoint with a patch-PCA codec, "
                         f"got {checkpoint} without one")
    pilot = None
    if continue_steps < 0:
        raise ValueError(f"continue_steps: expected >= 0, got {continue_steps}")
    if continue_steps:
        scale = (ckpt.extra["train"]["mapping_lr_scale"] if mapping_lr_scale is None
                 else mapping_lr_scale)
        with torch.enable_grad():
            model = continue_training(model, ckpt, codec, continue_steps, scale,
                                      progress=progress)
        pilot = {"continue_steps": continue_steps, "mapping_lr_scale": scale, "lr": PILOT_LR,
                 "seed": PILOT_SEED, "data_seed": PILOT_DATA_SEED, "ema": False}
    model = model.float()
    schedule = ckpt.extra.get("diffusion")
    diffusion = GaussianDiffusion(DiffusionSchedule(**schedule) if schedule else None)
    bad = [t for t in timesteps if not 0 <= t < diffusion.num_timesteps]
    if bad:
        raise ValueError(f"timesteps: expected values in [0, {diffusion.num_timesteps}), got {bad}")
    frames, grid, channels = model.config.frames, identity_grid(model), model.config.in_channels
    world = checkpoint_world(ckpt)
    data = [inputs(frames, p, world) for p in range(pairs)]
    mean_image = torch.stack([d["truth"].mean(0) for d in data]).mean(0)    # [3, 64, 64]
    opts = DemoOptions(steps=ddim_steps, progress=False)
    per_t = {t: {c: [] for c in CONDITIONS} | {"eps_mse": []} for t in timesteps}
    rows = {"ddim": [], "codec": [], "mean_image": []}
    spread = {"single": [], "mean_of_samples": [], "between_samples": []}   # per pair
    for p, d in enumerate(data):
        truth, face_hair = d["truth"], d["regions"]["face_hair"]            # [T, 3|1, 64, 64]
        x0 = codec.encode(truth * 2 - 1)[None]                              # [1, T, C, h, w]
        g = d["global_condition"](grid)
        g_other = data[(p + 1) % pairs]["global_condition"](grid)
        ctrl = d["controls"][None]
        conds = {"true": Conditions(g[None], ctrl),
                 "null": Conditions(g[None], ctrl, torch.ones(1, dtype=torch.bool)),
                 "other_G": Conditions(g_other[None], ctrl)}
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 * p + t))
            tt = torch.tensor([t])
            xt = diffusion.q_sample(x0, tt, noise)
            for name, cond in conds.items():
                pred = model(xt, tt, cond)[:, :, :channels].float()
                x0_hat = diffusion.predict_x0(pred, xt, tt)
                video = (codec.decode(x0_hat[0]).clamp(-1, 1) + 1) / 2
                per_t[t][name].append(masked_psnr(video, truth, face_hair))
                if name == "true":
                    eps = diffusion.epsilon(pred, xt, tt)
                    err = ((eps - noise) ** 2).mean(dim=(0, 1, 3, 4))        # [C]
                    per_t[t]["eps_mse"].append(
                        [float(err[i:i + CHANNEL_GROUP].mean())
                         for i in range(0, channels, CHANNEL_GROUP)])
        videos = [sample_video(model, schedule, "independent", g, d["controls"], opts, seed,
                               device, codec)[0] for seed in range(samples)]
        rows["ddim"].append(masked_psnr(videos[0], truth, face_hair))
        if samples > 1:
            spread["single"].append([masked_psnr(v, truth, face_hair) for v in videos])
            spread["mean_of_samples"].append(
                masked_psnr(torch.stack(videos).mean(0), truth, face_hair))
            spread["between_samples"].append(masked_psnr(videos[1], videos[0], face_hair))
        rows["codec"].append(masked_psnr((codec.decode(x0[0]).clamp(-1, 1) + 1) / 2, truth,
                                         face_hair))
        rows["mean_image"].append(masked_psnr(mean_image.expand_as(truth), truth, face_hair))
        if progress:
            print(f"pair {p + 1}/{pairs} done", flush=True)
    shown = Path(checkpoint).resolve()
    if shown.is_relative_to(Path.cwd()):
        shown = shown.relative_to(Path.cwd())
    result = {"checkpoint": str(shown), "pilot": pilot, "pairs": pairs, "world": world,
              "ddim_steps": ddim_steps, "region": "face_hair",
              "x0_psnr_db": {}, "eps_mse_by_channel_group": {},
              "full_ddim_psnr_db": _mean(rows["ddim"]), "codec_psnr_db": _mean(rows["codec"]),
              "mean_image_psnr_db": _mean(rows["mean_image"])}
    if samples > 1:
        result["samples"] = {
            "count": samples, "single_psnr_db": _mean([_mean(r) for r in spread["single"]]),
            "mean_of_samples_psnr_db": _mean(spread["mean_of_samples"]),
            "between_samples_psnr_db": _mean(spread["between_samples"]),
            "per_pair": spread}
    for t, r in per_t.items():
        result["x0_psnr_db"][str(t)] = {c: _mean(r[c]) for c in CONDITIONS} | {
            "G_gap": _mean([a - b for a, b in zip(r["true"], r["other_G"])])}
        result["eps_mse_by_channel_group"][str(t)] = [_mean(list(col))
                                                      for col in zip(*r["eps_mse"])]
    return result


def format_table(result: dict) -> str:
    """A markdown table of :func:`diagnose`'s result."""
    lines = ["| t | x0 PSNR true | null | other G | G gap | eps MSE by 8-channel group |",
             "|---|---|---|---|---|---|"]
    for t, r in result["x0_psnr_db"].items():
        eps = " / ".join(f"{v:.3g}" for v in result["eps_mse_by_channel_group"][t])
        lines.append(f"| {t} | {r['true']:.2f} | {r['null']:.2f} | {r['other_G']:.2f} | "
                     f"{r['G_gap']:+.2f} | {eps} |")
    lines.append(f"\nface+hair PSNR (dB, mean of {result['pairs']} pairs): full DDIM "
                 f"{result['ddim_steps']} steps {result['full_ddim_psnr_db']:.2f}, codec "
                 f"{result['codec_psnr_db']:.2f}, constant mean image "
                 f"{result['mean_image_psnr_db']:.2f}")
    if "samples" in result:
        r = result["samples"]
        lines.append(f"{r['count']} samples per pair: one sample {r['single_psnr_db']:.2f}, "
                     f"their pixel mean {r['mean_of_samples_psnr_db']:.2f}, sample 0 vs 1 "
                     f"{r['between_samples_psnr_db']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samplers.demo.diagnose",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--ddim-steps", type=int, default=25)
    parser.add_argument("--continue-steps", type=int, default=0,
                        help="first continue the weights for this many steps (a pilot)")
    parser.add_argument("--mapping-lr-scale", type=float, default=None,
                        help="mapping-network lr scale of the pilot (default: the recipe's)")
    parser.add_argument("--samples", type=int, default=1,
                        help="full samples per pair (noise seeds 0..K-1); K >= 2 adds the "
                             "sample-spread readout")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = diagnose(args.checkpoint, args.pairs, ddim_steps=args.ddim_steps,
                      continue_steps=args.continue_steps,
                      mapping_lr_scale=args.mapping_lr_scale, samples=args.samples)
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
