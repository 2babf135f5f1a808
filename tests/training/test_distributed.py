"""The engine and anchor-parallel sampling on 2 gloo ranks (torch.multiprocessing spawn with
torchrun's environment variables), compared with one process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from avatar_models.anchored_diffusion import Conditions, SDiT, SDiTConfig
from avatar_models.checkpoint import load_checkpoint
from avatar_models.training.engine import EngineConfig, TrainingSystem, train

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` on WORLD gloo ranks, as torchrun would start them."""
    mp.spawn(_entry, args=(fn, _free_port(), args), nprocs=WORLD, join=True)


class FixedNoiseClips(torch.utils.data.Dataset):
    """Clips with their noise and timestep drawn per sample (not per rank), so that the loss
    of a batch does not depend on how the batch is split over ranks."""

    def __init__(self, n: int = 8):
        g = torch.Generator().manual_seed(5)
        cfg = SDiTConfig.from_name("tiny")
        shape = (n, cfg.frames, cfg.in_channels, cfg.input_size, cfg.input_size)
        self.items = {"frames": torch.rand(shape, generator=g) * 2 - 1,
                      "noise": torch.randn(shape, generator=g),
                      "t": torch.randint(0, 1000, (n,), generator=g),
                      "control": torch.randn(n, cfg.frames, cfg.control_dim, generator=g),
                      "global": torch.randn(n, cfg.global_dim, generator=g)}

    def __len__(self) -> int:
        return self.items["t"].shape[0]

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.items.items()}


def fixed_noise_loss(model, batch: dict, generator) -> dict:
    x0, noise = batch["frames"], batch["noise"]
    xt = 0.8 * x0 + 0.6 * noise
    null = torch.zeros(x0.shape[0], dtype=torch.bool)         # every parameter gets a gradient
    out = model(xt, batch["t"], Conditions(batch["global"], batch["control"], null))
    return {"loss": (out[:, :, : x0.shape[2]] - noise).square().mean()}


def tiny_system() -> TrainingSystem:
    torch.manual_seed(0)
    model = SDiT(SDiTConfig.from_name("tiny"))
    return TrainingSystem("toy-sdit", model, fixed_noise_loss, FixedNoiseClips(),
                          config=model.config.to_dict())


def engine_config(**kw) -> EngineConfig:
    return EngineConfig(**{**dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=1,
                                  ema_decay=0.9, grad_clip=1.0, progress=False, device="cpu"),
                           **kw})


# name -> EngineConfig options of a 2-rank run compared with one process without them
SCENARIOS = {"ddp": {}, "fsdp2": {"fsdp": True}, "ddp-accum": {"grad_accum": 2},
             "fsdp2-accum-actckpt": {"fsdp": True, "grad_accum": 2,
                                     "activation_checkpointing": True}}


def _train_and_save(rank: int, out_dir: Path, options: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    losses = []
    res = train(tiny_system(), engine_config(**options), out=out_dir / "ck.safetensors",
                callback=lambda step, values: losses.append(values["loss"]))
    probe = {k: v[None] for k, v in FixedNoiseClips(2)[0].items()}
    with torch.no_grad():                      # collective under FSDP2: every rank runs it
        pred = res.model(probe["frames"], probe["t"],
                         Conditions(probe["global"], probe["control"]))
    if rank == 0:
        save_file({"pred": pred.contiguous(), "losses": torch.tensor(losses, dtype=torch.float64)},
                  str(out_dir / "rank0.safetensors"))


def sampling_setup():
    """A tiny sDiT with random (non-zero) weights, an 11-frame plan of B=5 sequences with anchor
    slots 2, 0, 1, 1, 1, their conditions and a 4-step DDPM scheduler (it draws noise)."""
    from samplers.nonuniform import gather_frames, nonuniform_plan
    from samplers.schedules import make_scheduler

    torch.manual_seed(3)
    model = SDiT(SDiTConfig.from_name("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    plan = nonuniform_plan(11, 3, generator=torch.Generator().manual_seed(0))
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    control = torch.randn(11, cfg.control_dim, generator=g)
    cond = Conditions(torch.randn(1, cfg.global_dim, generator=g).expand(plan.batch, -1),
                      gather_frames(control, plan))
    scheduler = make_scheduler("ddpm", None, 4)
    frame_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    return model.eval(), plan, cond, scheduler, frame_shape


def _sample_parallel(rank: int, out_dir: Path) -> None:
    from avatar_models.training.distributed import setup_world
    from samplers.anchored import anchored_sample, sharded_sdit_denoiser

    setup_world("cpu")
    model, plan, cond, scheduler, frame_shape = sampling_setup()
    den = sharded_sdit_denoiser(model, cond, guidance=2.0)
    lat = anchored_sample(den, scheduler, plan, frame_shape,
                          generator=torch.Generator().manual_seed(7), progress=False)
    if rank == 0:
        save_file({"latents": lat.contiguous()}, str(out_dir / "parallel.safetensors"))


def _anchored_ddp_resume(rank: int, root: Path) -> None:
    """Anchored training (its loss draws from each rank's generator) on 2 ranks: 4 steps, then
    the same run resumed from its step-2 checkpoint (rewriting steps 3 and 4), and an
    uninterrupted run."""
    from avatar_models.training.anchored import TrainConfig, train_anchored
    from avatar_models.training.synthetic import BlobSequences

    args = dict(batch_size=4, lr=1e-3, warmup_steps=1, ema_decay=0.9, cond_drop=0.3,
                save_every=2)
    first = root / "resumed" / "ck.safetensors"
    train_anchored("tiny", BlobSequences(8), TrainConfig(steps=4, **args), device="cpu",
                   out=first, progress=False)
    step2 = first.with_name("ck.checkpoints") / "step-00000002"
    train_anchored("tiny", BlobSequences(8), TrainConfig(steps=4, **args), device="cpu",
                   out=first, progress=False, resume=step2)
    train_anchored("tiny", BlobSequences(8), TrainConfig(steps=4, **args), device="cpu",
                   out=root / "straight" / "ck.safetensors", progress=False)


def _all_scenarios(rank: int, root: str) -> None:
    root = Path(root)
    for name, options in SCENARIOS.items():
        _train_and_save(rank, root / name, options)
    _sample_parallel(rank, root)
    _anchored_ddp_resume(rank, root)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One spawn of 2 gloo ranks runs every scenario (starting processes dominates the cost)."""
    root = tmp_path_factory.mktemp("two_ranks")
    spawn(_all_scenarios, str(root))
    return root


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "ck.safetensors"
    losses = []
    train(tiny_system(), engine_config(), out=out,
          callback=lambda step, values: losses.append(values["loss"]))
    return out, losses


# Tolerance: the same fp32 sums in a different order (each rank reduces half the batch, then
# the gradients are averaged) differ by a few ulps (measured: 1.1e-7); AdamW's first steps move
# every weight by about lr * sign(gradient), so parameters agree to ~1e-7 absolute at lr 1e-3.
PARAM_ATOL = 1e-6


@pytest.mark.parametrize("mode", list(SCENARIOS))
def test_two_ranks_match_one_process_on_the_combined_batch(two_ranks, single_run, mode):
    single_out, single_losses = single_run
    ranked = load_file(str(two_ranks / mode / "rank0.safetensors"))
    torch.testing.assert_close(ranked["losses"], torch.tensor(single_losses, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    multi = load_checkpoint(two_ranks / mode / "ck.safetensors", system="toy-sdit")
    single = load_checkpoint(single_out)
    assert multi.extra["step"] == 3 and set(multi.model) == set(single.model)
    for which in ("model", "ema"):
        a, b = getattr(multi, which), getattr(single, which)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=PARAM_ATOL, msg=name)
    # the 2-rank checkpoint reloads on one process and gives the trained model's outputs
    model = SDiT(SDiTConfig.from_dict(multi.config))
    model.load_state_dict(multi.weights("model"))
    probe = {k: v[None] for k, v in FixedNoiseClips(2)[0].items()}
    with torch.no_grad():
        pred = model(probe["frames"], probe["t"], Conditions(probe["global"], probe["control"]))
    torch.testing.assert_close(pred, ranked["pred"], rtol=1e-5, atol=1e-6)


def test_fsdp2_checkpoint_resumes_on_one_process(two_ranks, tmp_path, capsys):
    import shutil

    run = tmp_path / "fsdp2"
    shutil.copytree(two_ranks / "fsdp2", run)
    out = run / "ck.safetensors"
    res = train(tiny_system(), engine_config(steps=4), out=out, resume=out)
    assert res.step == 4 and len(res.losses) == 1
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err


def test_anchor_parallel_sampling_equals_one_process(two_ranks):
    from samplers.anchored import anchored_sample, sdit_denoiser

    parallel = load_file(str(two_ranks / "parallel.safetensors"))["latents"]
    model, plan, cond, scheduler, frame_shape = sampling_setup()
    assert plan.batch == 5 and plan.anchor_pos.tolist() == [1] * 5  # one column (Eq. 1)
    for mode in ("override", "packed"):
        scheduler = sampling_setup()[3]
        den = sdit_denoiser(model, cond, guidance=2.0, anchor_mode=mode)
        single = anchored_sample(den, scheduler, plan, frame_shape,
                                 generator=torch.Generator().manual_seed(7), progress=False)
        # fp32: only the batch size of each matmul differs (5 sequences vs 3 + 2), ~1e-7
        # relative per forward; DDPM's x0 estimate divides by sqrt(alpha_bar) (~1/150 at
        # t=999), so the latents agree to ~1e-6 of their scale (measured 7e-7)
        scale = float(single.abs().max())
        torch.testing.assert_close(parallel, single, rtol=0, atol=5e-6 * scale, msg=mode)
    anchors = parallel[torch.arange(5), plan.anchor_pos]
    assert torch.equal(anchors, anchors[:1].expand_as(anchors))


def test_two_rank_resume_reproduces_the_uninterrupted_two_rank_run(two_ranks):
    from avatar_models.training.engine import metrics_path, read_metrics

    curves = [[(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(metrics_path(
        two_ranks / name / "ck.safetensors"))] for name in ("resumed", "straight")]
    assert [c[0] for c in curves[0]] == [1, 2, 3, 4]
    assert curves[0] == curves[1]                      # bitwise: per-rank RNG and data restored
    a = load_file(str(two_ranks / "resumed" / "ck.safetensors"))
    b = load_file(str(two_ranks / "straight" / "ck.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
