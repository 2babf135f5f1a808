"""The one training engine: every system trains through :func:`train`.

A system hands over four things in a :class:`TrainingSystem`: its model, its loss on a batch,
its parameter groups (learning rates per group) and its dataset. The engine owns the rest:

- precision (bf16 autocast on CUDA), gradient accumulation, gradient clipping, optional
  activation checkpointing of the model's blocks, an EMA of the weights, AdamW with a linear
  warm-up then cosine learning-rate schedule;
- ``torchrun``: the same call runs on N processes, DDP by default, FSDP2 (``fully_shard`` of each
  block, then of the model) with ``fsdp=True``; NCCL on GPUs, gloo on CPUs; each rank reads its
  own shard of the data (:mod:`avatar_models.training.sharding`), the global batch is split
  over ranks and accumulation micro-steps;
- atomic, verified, resumable checkpoints (:mod:`avatar_models.training.run_state`) every
  ``checkpoint_every`` steps and at the end, the newest ``keep_last`` kept; ``resume=`` restores
  model, EMA, optimiser, schedule position, RNG of every rank and data position, so the loss
  curve continues as if the run had never stopped (bitwise on CPU);
- a tqdm bar on rank 0 (loss, lr, it/s), ``<out stem>.metrics.jsonl`` (one JSON line per step:
  step, loss terms, lr, grad norm, it/s, peak memory) and ``<out stem>.loss.png`` at the end.

Example (a complete toy system)::

    import torch
    from avatar_models.training.engine import EngineConfig, TrainingSystem, train

    class Pairs(torch.utils.data.Dataset):        # map-style: shuffled and sharded per rank
        def __len__(self):
            return 64
        def __getitem__(self, i):
            x = torch.randn(4, generator=torch.Generator().manual_seed(i))
            return {"x": x, "y": x.sum(0, keepdim=True)}

    def loss(model, batch, generator):           # model: the DDP/FSDP-wrapped module; batch:
        err = model(batch["x"]) - batch["y"]     # this rank's micro-batch, on its device
        return {"loss": err.square().mean()}     # "loss" is minimised; other keys are logged

    net = torch.nn.Linear(4, 1)
    system = TrainingSystem("toy", net, loss, Pairs(), param_groups=lambda m: [
        {"params": list(m.parameters()), "lr": 1e-2, "name": "all"}])
    result = train(system, EngineConfig(steps=100, batch_size=16), out="runs/toy.safetensors")

and ``torchrun --nproc_per_node=4 script.py`` runs the same script data-parallel. The final
weights (``model.*`` and ``ema.*``) are written to ``out`` in the
:func:`avatar_models.checkpoint.load_checkpoint` format.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from avatar_models.checkpoint import checkpoint_contents
from avatar_models.training import run_state
from avatar_models.training.distributed import (
    World,
    all_mean,
    barrier,
    broadcast_module,
    gather_to_main,
    setup_world,
)
from avatar_models.training.ema import EMA
from avatar_models.training.sharding import ShardedBatches, stack_collate

LossFn = Callable[[nn.Module, dict, torch.Generator], Mapping[str, torch.Tensor]]


@dataclass
class TrainingSystem:
    """What a system hands to the engine.

    Attributes:
        name: the system's name, recorded in checkpoints (``"anchored"``).
        model: the module to train (built and seeded by the system, on any device).
        loss: ``loss(model, batch, generator) -> {"loss": scalar, ...}``: the mean loss of a
            micro-batch (``batch`` is this rank's part, collated, its tensors already on the
            model's device), computed through ``model``
            (which may be the DDP / FSDP wrapper); draw randomness from ``generator`` (a CPU
            generator per rank, saved in checkpoints). Extra scalar terms are logged.
        dataset: a map-style Dataset or an iterable of sample dicts (see ``sharding``).
        param_groups: ``fn(module) -> [{"params": [...], "lr": float, "name": str}, ...]``
            (called after wrapping); None: one group at ``EngineConfig.lr``.
        config: the model config (JSON), stored in every checkpoint as ``config``.
        metadata: JSON stored in every checkpoint as ``extra`` (with ``step`` added).
        blocks: ``fn(module) -> modules``: the units of FSDP2 sharding and activation
            checkpointing; None: ``module.blocks`` when it exists.
        collate: list of samples -> batch (default: stack each key).
        unused_parameters: True when some parameters may get no gradient in a step (DDP then
            searches for them every step, which costs a graph traversal).
    """

    name: str
    model: nn.Module
    loss: LossFn
    dataset: object
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    blocks: Callable[[nn.Module], Iterable[nn.Module]] | None = None
    collate: Callable[[list], dict] = stack_collate
    unused_parameters: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine decides (a system's own hyperparameters live in the system)."""

    steps: int = 1000
    batch_size: int = 16            # global: all ranks and all accumulation micro-steps
    grad_accum: int = 1             # micro-steps per optimizer step
    lr: float = 1e-4                # only when the system gives no param groups
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0           # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.0       # cosine ends at lr * min_lr_ratio
    grad_clip: float = 0.0          # max global grad norm; 0: no clipping
    ema_decay: float = 0.9999       # 0: no EMA
    ema_warmup: bool = True
    amp: str = "auto"               # "auto" (bf16 autocast on CUDA), "bf16", "off"
    activation_checkpointing: bool = False
    fsdp: bool = False              # FSDP2 instead of DDP when running on several processes
    seed: int = 0
    checkpoint_every: int = 0       # steps between checkpoints (0: only at the end)
    keep_last: int = 3              # resumable checkpoints kept
    num_workers: int = 0
    progress: bool = True
    device: str | None = None       # default: cuda:LOCAL_RANK when available, else cpu

    def __post_init__(self):
        checks = {"steps": self.steps >= 0, "batch_size": self.batch_size >= 1,
                  "grad_accum": self.grad_accum >= 1, "warmup_steps": self.warmup_steps >= 0,
                  "grad_clip": self.grad_clip >= 0, "checkpoint_every": self.checkpoint_every >= 0,
                  "keep_last": self.keep_last >= 1, "ema_decay": 0 <= self.ema_decay <= 1,
                  "min_lr_ratio": 0 <= self.min_lr_ratio <= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"EngineConfig.{name} is out of range: got "
                                 f"{getattr(self, name)!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"EngineConfig.amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainOutcome:
    model: nn.Module             # the trained module (sharded DTensors under FSDP2)
    ema: nn.Module | None        # a frozen copy holding the EMA weights (None under FSDP2)
    losses: list[float]          # mean loss over ranks of every step run by this call
    checkpoint: Path | None      # the final weights file (``out``)
    step: int                    # optimizer steps done, counting resumed ones


def warmup_cosine(steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier at 0-based step: linear warm-up to 1 over ``warmup_steps`` steps, then a
    cosine from 1 down to ``min_lr_ratio`` at ``steps``."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def metrics_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".metrics.jsonl")


def plot_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".loss.png")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_blocks(module: nn.Module) -> list[nn.Module]:
    blocks = getattr(module, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def checkpoint_activations(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass instead of storing them
    (non-reentrant ``torch.utils.checkpoint``; parameter names are unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective: every rank must call), a tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_cuda_mb": round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)}
    import resource

    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


class _Run:
    """State of one :func:`train` call (kept in one object so that saving and resuming read the
    same fields)."""

    def __init__(self, system: TrainingSystem, config: EngineConfig, world: World,
                 out: Path | None):
        self.system, self.config, self.world, self.out = system, config, world, out
        per_step = config.batch_size
        if per_step % (world.size * config.grad_accum):
            raise ValueError(f"batch_size={config.batch_size} must be divisible by world size "
                             f"{world.size} x grad_accum {config.grad_accum}")
        self.micro_batch = per_step // (world.size * config.grad_accum)
        model = system.model.to(world.device)
        blocks = (system.blocks or default_blocks)(model)
        self.fsdp = config.fsdp and world.distributed
        if config.fsdp and not world.distributed and world.is_main:
            print("note: fsdp: one process (not started by torchrun); training unsharded",
                  file=sys.stderr)
        self.ema = None
        if config.ema_decay > 0 and not self.fsdp:  # copy before wrapping
            self.ema = EMA(model, config.ema_decay, config.ema_warmup)
        if config.activation_checkpointing:
            checkpoint_activations(blocks)
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            broadcast_module(model)
            mesh = init_device_mesh(world.device.type, (world.size,))
            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.wrapped = model
            if config.ema_decay > 0:
                self.ema = EMA(model, config.ema_decay, config.ema_warmup, copy_model=False)
        elif world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [world.device.index] if world.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=system.unused_parameters)
        else:
            self.wrapped = model
        self.module = model
        groups = (system.param_groups(model) if system.param_groups is not None else
                  [{"params": list(model.parameters()), "lr": config.lr, "name": "all"}])
        self.base_lrs = [g["lr"] for g in groups]
        self.hyper = [{k: g.get(k, d) for k, d in (("weight_decay", config.weight_decay),
                                                   ("betas", config.betas))} for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.schedule = warmup_cosine(config.steps, config.warmup_steps, config.min_lr_ratio)
        self.data = ShardedBatches(system.dataset, self.micro_batch, rank=world.rank,
                                   world=world.size, seed=config.seed, collate=system.collate,
                                   num_workers=config.num_workers)
        self.generator = torch.Generator().manual_seed(config.seed + 1 + 1_000_003 * world.rank)
        self.amp = config.amp == "bf16" or (config.amp == "auto" and world.device.type == "cuda")
        self.step = 0

    # ---- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.config
        factor = self.schedule(self.step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        totals: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(next(self.data), self.world.device)
            last = micro == cfg.grad_accum - 1
            with self._sync(last), torch.autocast(self.world.device.type, torch.bfloat16,
                                                  enabled=self.amp):
                terms = self.system.loss(self.wrapped, batch, self.generator)
                if "loss" not in terms:
                    raise ValueError(f"system {self.system.name!r}: loss() must return a dict "
                                     f"with a 'loss' entry, got keys {sorted(terms)}")
                (terms["loss"] / cfg.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        params = [p for p in self.module.parameters() if p.grad is not None]
        # max_norm=inf when not clipping: the norm is still computed (logged), the scale is 1.0
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module)
        self.step += 1
        names = sorted(totals)
        # reduced on the model's device: NCCL cannot reduce CPU tensors
        means = all_mean(torch.stack([totals[k] for k in names]), self.world).cpu()
        values = {k: float(v) for k, v in zip(names, means)}
        values["grad_norm"] = float(_full(norm))
        return values

    def _sync(self, last: bool):
        if self.fsdp:
            self.module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.world.distributed and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write the resumable checkpoint of the current step and refresh ``out`` (collective
        under FSDP2: every rank must call)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.module, options=options)
        optim_sd = get_optimizer_state_dict(self.module, self.optimizer, options=options)
        ema_sd = None
        if self.ema is not None:   # gathered one tensor at a time; only rank 0 keeps a copy
            ema_sd = {}
            for name, tensor in self.ema.shadow.items():
                full = _full(tensor).detach()
                if self.world.is_main:
                    ema_sd[name] = full.cpu()
        rng = gather_to_main(run_state.capture_rng({"loss": self.generator}), self.world)
        path = None
        if self.world.is_main:
            keys = set(model_sd)
            ema_sd = None if ema_sd is None else {k: v for k, v in ema_sd.items() if k in keys}
            extra = {**self.system.metadata, "step": self.step}
            model_file = checkpoint_contents(model_sd, system=self.system.name,
                                             config=self.system.config, ema=ema_sd, extra=extra)
            optim_tensors, optim_meta = run_state.flatten_optimizer(optim_sd)
            state = {"system": self.system.name, "config": self.system.config,
                     "engine": self.config.to_dict(), "world_size": self.world.size,
                     "data": self.data.state_dict(), "rng": rng, "optimizer": optim_meta,
                     "ema_updates": None if self.ema is None else self.ema.updates,
                     "base_lrs": self.base_lrs}
            step_dir = run_state.write_checkpoint(
                run_state.checkpoint_root(self.out), self.step,
                {run_state.MODEL_FILE: model_file, run_state.OPTIMIZER_FILE: (optim_tensors, None)},
                state, self.config.keep_last)
            path = _publish(step_dir / run_state.MODEL_FILE, self.out)
        barrier(self.world)
        return path

    def resume(self, where: str | os.PathLike) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        found = _find_on_main(where, self.world)
        say = functools.partial(print, file=sys.stderr) if self.world.is_main else _quiet
        if found.message():
            say(found.message())
        state = found.state
        if state["system"] != self.system.name:
            raise ValueError(f"--resume: {found.path} is a {state['system']!r} run, this is "
                             f"{self.system.name!r}")
        tensors = found.tensors(run_state.MODEL_FILE)
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        ema_sd = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        options = StateDictOptions(full_state_dict=True)
        differs = {k: (v, self.system.config.get(k)) for k, v in state["config"].items()
                   if self.system.config.get(k) != v}
        try:
            set_model_state_dict(self.module, model_sd, options=options)
        except (RuntimeError, KeyError, ValueError) as err:
            raise ValueError(f"--resume: the weights in {found.path} do not fit this model; "
                             f"config fields that differ from the checkpoint's (checkpoint, "
                             f"requested): {differs}: {err}") from err
        for k, (old, new) in differs.items():
            say(f"resume: model config {k} {old!r} -> {new!r} applies (the weights fit)")
        optim = run_state.unflatten_optimizer(found.tensors(run_state.OPTIMIZER_FILE),
                                              state["optimizer"])
        set_optimizer_state_dict(self.module, self.optimizer, optim, options=options)
        for group, hyper in zip(self.optimizer.param_groups, self.hyper):
            group.update(hyper)          # this call's weight decay / betas apply
        if self.ema is not None:
            if ema_sd:
                self.ema.load_shadow(ema_sd)
                self.ema.updates = int(state.get("ema_updates") or 0)
            else:
                self.ema.load_shadow(model_sd)
                say(f"resume: {found.path} has no EMA; the EMA restarts from its weights")
        self.data.load_state_dict(state["data"])
        rng = state["rng"]
        if len(rng) == self.world.size:
            run_state.restore_rng(rng[self.world.rank], {"loss": self.generator})
        else:
            say(f"resume: the checkpoint was written by {len(rng)} process(es), this run has "
                f"{self.world.size}: data order continues exactly, random draws do not")
        self.step = int(state["step"])
        changed = {k: (v, getattr(self.config, k)) for k, v in state["engine"].items()
                   if k not in ("progress", "device")
                   and json.dumps(v) != json.dumps(_jsonable(getattr(self.config, k, None)))}
        for k, (old, new) in changed.items():
            say(f"resume: {k} {old!r} -> {new!r} (this run's value applies)")
        if self.world.is_main and self.out is not None:
            _truncate_metrics(metrics_path(self.out), self.step)
        say(f"resumed {self.system.name} from {found.path} at step {self.step}")


def _find_on_main(where: str | os.PathLike, world: World) -> run_state.FoundCheckpoint:
    """:func:`run_state.find_checkpoint` on rank 0 only (it hashes every file), its answer (or
    its error) sent to every rank."""
    if not world.distributed:
        return run_state.find_checkpoint(where)
    import torch.distributed as dist

    box = [None]
    if world.is_main:
        try:
            found = run_state.find_checkpoint(where)
            box = [("ok", str(found.path), found.state, found.rejected)]
        except (FileNotFoundError, ValueError) as err:
            box = [(type(err).__name__, str(err), None, None)]
    dist.broadcast_object_list(box, src=0)
    kind, text, state, rejected = box[0]
    if kind == "FileNotFoundError":
        raise FileNotFoundError(text)
    if kind != "ok":
        raise ValueError(text)
    return run_state.FoundCheckpoint(Path(text), state, rejected)


def _to_device(batch, device: torch.device):
    """Tensors of a (nested) batch moved to ``device``; everything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _jsonable(value):
    return json.loads(json.dumps(value))


def _quiet(*args, **kwargs) -> None:
    return None


def _publish(step_file: Path, out: Path) -> Path:
    """Make ``out`` the given step's weights: a hard link (no copy of large files), a copy
    where links are not possible; replaced atomically."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(step_file, tmp)
    except OSError:
        shutil.copyfile(step_file, tmp)
    os.replace(tmp, out)
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_metrics(records: list[dict], path: Path, title: str = "") -> Path | None:
    """:func:`plot_curves` of every loss term of ``metrics.jsonl`` records."""
    if not records:
        return None
    skip = {"step", "lr", "lrs", "grad_norm", "it_s", "peak_cuda_mb", "peak_rss_mb", "time_s"}
    curves = {k: [r[k] for r in records] for k in records[0] if k not in skip}
    return plot_curves(curves, path, title, steps=[r["step"] for r in records])


def plot_curves(curves: dict[str, list[float]], path: str | os.PathLike, title: str = "", *,
                steps: list[int] | None = None) -> Path:
    """Each curve per step (light) and its running mean over 1/50 of the run (dark); log scale
    when every value is positive. Written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    positive = True
    for i, (label, values) in enumerate(curves.items()):
        v = torch.tensor(values, dtype=torch.float64)
        x = torch.arange(1, len(v) + 1) if steps is None else torch.tensor(steps)
        k = max(1, len(v) // 50)
        positive &= bool((v > 0).all())
        ax.plot(x, v, color=f"C{i}", alpha=0.25, lw=0.5)
        if len(v) >= k:
            ax.plot(x[k - 1:], v.unfold(0, k, 1).mean(1), color=f"C{i}", lw=1.5,
                    label=f"{label} ({k}-step mean)")
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def train(system: TrainingSystem, config: EngineConfig | None = None, *,
          out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          callback: Callable[[int, dict], None] | None = None) -> TrainOutcome:
    """Train ``system`` for ``config.steps`` optimizer steps (see the module docstring).

    Args:
        out: final weights file (``.safetensors``); its resumable checkpoints go to
            ``<stem>.checkpoints/``, metrics to ``<stem>.metrics.jsonl`` and the loss plot to
            ``<stem>.loss.png``. None: nothing is written.
        resume: a checkpoint to continue from (see :func:`run_state.find_checkpoint`); this
            call's ``config`` applies (e.g. more ``steps``), the model shape comes from the
            system.
        callback: ``callback(step, values)`` after every step on every rank (0-based step;
            values: loss terms averaged over ranks, ``grad_norm``).
    """
    from tqdm.auto import tqdm

    config = config or EngineConfig()
    world = setup_world(config.device)
    out = None if out is None else Path(out)
    run = _Run(system, config, world, out)
    if resume is not None:
        run.resume(resume)
    log = None
    if out is not None and world.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        root = run_state.checkpoint_root(out)
        if resume is None and (root.exists() or metrics_path(out).exists()):
            # a new run replaces the previous run's files at this --out, as it replaces --out
            print(f"note: new run: replacing the previous run's {root} and "
                  f"{metrics_path(out).name}", file=sys.stderr)
            shutil.rmtree(root, ignore_errors=True)
            metrics_path(out).unlink(missing_ok=True)
        log = open(metrics_path(out), "a")
    barrier(world)
    losses: list[float] = []
    bar = tqdm(total=config.steps, initial=min(run.step, config.steps),
               desc=f"train {system.name}", disable=not (config.progress and world.is_main))
    smooth, path = None, None
    saved_at = run.step if resume is not None else -1
    start = time.perf_counter()
    try:
        while run.step < config.steps:
            tick = time.perf_counter()
            values = run.train_step()
            rate = 1.0 / max(1e-9, time.perf_counter() - tick)
            losses.append(values["loss"])
            smooth = values["loss"] if smooth is None else 0.9 * smooth + 0.1 * values["loss"]
            lrs = [g["lr"] for g in run.optimizer.param_groups]
            if log is not None:
                record = {"step": run.step, **values, "lr": lrs[0], "it_s": round(rate, 3),
                          **_peak_memory(world.device),
                          "time_s": round(time.perf_counter() - start, 3)}
                if len(lrs) > 1:
                    record["lrs"] = {g.get("name", str(i)): g["lr"]
                                     for i, g in enumerate(run.optimizer.param_groups)}
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lrs[0]:.2e}")
            if callback is not None:
                callback(run.step - 1, values)
            if out is not None and config.checkpoint_every and \
                    run.step % config.checkpoint_every == 0:
                path, saved_at = run.save(), run.step
        if out is not None and saved_at != run.step:
            path = run.save()
    finally:
        bar.close()
        if log is not None:
            log.close()
    if out is not None and world.is_main:
        plot_metrics(read_metrics(metrics_path(out)), plot_path(out),
                     f"{system.name}: {run.step} steps, global batch {config.batch_size}, "
                     f"{world.size} process(es)")
        if config.progress and losses:
            elapsed = time.perf_counter() - start
            print(f"trained {len(losses)} steps ({len(losses) / elapsed:.2f} it/s), final "
                  f"loss {smooth:.4f}" + (f", checkpoint {path}" if path else ""))
    ema_model = None if run.ema is None else run.ema.model
    return TrainOutcome(run.module, ema_model, losses, path if world.is_main else None,
                        run.step)
