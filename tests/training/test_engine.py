"""The training engine on one process: schedule, data position, checkpoints that resume to the
bit after SIGKILL, rejection of damaged checkpoints, metrics and loss plot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avatar_models.checkpoint import load_checkpoint
from avatar_models.training import run_state
from avatar_models.training.anchored import TrainConfig, train_anchored
from avatar_models.training.engine import (
    EngineConfig,
    TrainingSystem,
    metrics_path,
    plot_path,
    read_metrics,
    train,
    warmup_cosine,
)
from avatar_models.training.sharding import ShardedBatches
from avatar_models.training.synthetic import BlobSequences

ROOT = Path(__file__).resolve().parents[2]


def tiny_train(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, ema_decay=0.9, cond_drop=0.2,
                save_every=2, keep_last=3, grad_clip=1.0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def one_thread():
    """Bitwise comparisons need the same reduction order in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_warmup_cosine():
    f = warmup_cosine(10, 2, 0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(6) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)


def test_engine_config_rejects_bad_values():
    with pytest.raises(ValueError, match="keep_last is out of range: got 0"):
        EngineConfig(keep_last=0)
    with pytest.raises(ValueError, match="amp must be 'auto', 'bf16' or 'off', got 'fp8'"):
        EngineConfig(amp="fp8")


def test_sharded_batches_cover_each_epoch_once_and_resume_mid_epoch():
    data = torch.utils.data.TensorDataset(torch.arange(12))
    collate = lambda items: torch.stack([it[0] for it in items])  # noqa: E731
    ranks = [ShardedBatches(data, 2, rank=r, world=2, seed=3, collate=collate) for r in (0, 1)]
    epoch = torch.cat([torch.cat([next(b) for b in ranks]) for _ in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))          # every sample once per epoch
    one = ShardedBatches(data, 4, seed=3, collate=collate)    # 1 process, same global batch
    assert torch.cat([next(one) for _ in range(3)]).sort().values.tolist() == list(range(12))
    ref = ShardedBatches(data, 2, rank=1, world=2, seed=3, collate=collate)
    seen = [next(ref) for _ in range(4)]                      # into epoch 1
    again = ShardedBatches(data, 2, rank=1, world=2, seed=3, collate=collate)
    for _ in range(4):
        next(again)
    state = again.state_dict()
    assert state == {"epoch": 1, "consumed": 4}
    resumed = ShardedBatches(data, 2, rank=1, world=2, seed=3, collate=collate)
    resumed.load_state_dict(state)
    assert seen and all(torch.equal(next(ref), next(resumed)) for _ in range(5))


def test_metrics_plot_and_final_file(tmp_path):
    out = tmp_path / "run.safetensors"
    res = train_anchored("tiny", BlobSequences(8), tiny_train(steps=3, save_every=0), out=out,
                         device="cpu", progress=False)
    records = read_metrics(metrics_path(out))
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "mse", "vb", "lr", "grad_norm", "it_s", "peak_rss_mb", "lrs"):
        assert key in records[0], key
    assert records[0]["lrs"]["mapping"] == pytest.approx(0.1 * records[0]["lrs"]["sdit"])
    assert [r["loss"] for r in records] == pytest.approx(res.losses, rel=1e-6)
    assert plot_path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = load_checkpoint(out, system="anchored")
    assert ck.extra["step"] == 3 and ck.ema and ck.model
    steps = run_state.step_dirs(run_state.checkpoint_root(out))
    assert [p.name for p in steps] == ["step-00000003"]


def test_keep_last(tmp_path):
    out = tmp_path / "k.safetensors"
    train_anchored("tiny", BlobSequences(8), tiny_train(steps=6, save_every=1, keep_last=2),
                   out=out, device="cpu", progress=False)
    names = [p.name for p in run_state.step_dirs(run_state.checkpoint_root(out))]
    assert names == ["step-00000005", "step-00000006"]
    # a new run at the same --out replaces the previous run's checkpoints and metrics
    train_anchored("tiny", BlobSequences(8), tiny_train(steps=2, save_every=1, keep_last=2),
                   out=out, device="cpu", progress=False)
    names = [p.name for p in run_state.step_dirs(run_state.checkpoint_root(out))]
    assert names == ["step-00000001", "step-00000002"]
    assert [r["step"] for r in read_metrics(metrics_path(out))] == [1, 2]


def test_write_checkpoint_records_digests_and_clears_a_killed_writers_leftovers(tmp_path):
    leftover = tmp_path / ".step-00000009.tmp123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    step = run_state.write_checkpoint(tmp_path, 3, {"w.safetensors": ({"w": torch.ones(2)}, None)},
                                      {"note": "x"}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]
    state = json.loads((step / run_state.STATE_FILE).read_text())
    assert state["step"] == 3 and state["note"] == "x"
    assert state["files"]["w.safetensors"] == run_state.file_digest(step / "w.safetensors")
    assert run_state.check_step_dir(step) == (state, None)


KILLED_RUN = """
import sys, time
from avatar_models.training.anchored import TrainConfig, train_anchored
from avatar_models.training.synthetic import BlobSequences
cfg = TrainConfig(**{args})
def wait_for_the_kill(step, values):
    if step == 4:            # the 5th step, after the checkpoint of step 4 (the 2nd one)
        print("waiting", flush=True)
        time.sleep(120)
train_anchored("tiny", BlobSequences(12), cfg, device="cpu", out=sys.argv[1], progress=False,
               callback=wait_for_the_kill)
"""


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path, one_thread):
    args = dict(steps=8, batch_size=4, lr=1e-3, warmup_steps=2, ema_decay=0.9, cond_drop=0.2,
                save_every=2, keep_last=3, grad_clip=1.0)
    killed = tmp_path / "killed" / "ck.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN.replace("{args}", repr(args)),
                             str(killed)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    second = run_state.checkpoint_root(killed) / "step-00000004"
    deadline = time.monotonic() + 120
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    assert second.exists(), "the run did not reach its second checkpoint in 120 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(metrics_path(killed))][-1] >= 4

    train_anchored("tiny", BlobSequences(12), TrainConfig(**args), device="cpu", out=killed,
                   progress=False, resume=killed)
    full = tmp_path / "full" / "ck.safetensors"
    train_anchored("tiny", BlobSequences(12), TrainConfig(**args), device="cpu", out=full,
                   progress=False)

    curve = lambda p: [(r["step"], r["loss"], r["mse"], r["vb"], r["grad_norm"])  # noqa: E731
                       for r in read_metrics(metrics_path(p))]
    assert [c[0] for c in curve(killed)] == list(range(1, 9))
    assert curve(killed) == curve(full)                      # bitwise: floats compared exactly
    a, b = load_file(str(killed)), load_file(str(full))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = lambda p: run_state.step_dirs(run_state.checkpoint_root(p))[-1]  # noqa: E731
    oa = load_file(str(last(killed) / run_state.OPTIMIZER_FILE))
    ob = load_file(str(last(full) / run_state.OPTIMIZER_FILE))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _pickle_in_place(path: Path) -> None:
    """A torch.save pickle under the safetensors name, with a state file that records it (so
    only the format check can catch it)."""
    torch.save({"w": torch.zeros(3)}, path)
    state_path = path.parent / run_state.STATE_FILE
    state = json.loads(state_path.read_text())
    state["files"][path.name] = run_state.file_digest(path)
    state_path.write_text(json.dumps(state))


@pytest.mark.parametrize("damage, expected", [
    (_truncate, "bytes, the state file recorded"),
    (_flip_byte, "sha256"),
    (_pickle_in_place, "not a safetensors file"),
])
def test_damaged_checkpoint_is_rejected_and_the_previous_one_used(tmp_path, capsys, damage,
                                                                   expected):
    out = tmp_path / "ck.safetensors"
    train_anchored("tiny", BlobSequences(8), tiny_train(steps=4), out=out, device="cpu",
                   progress=False)
    root = run_state.checkpoint_root(out)
    newest = root / "step-00000004" / run_state.MODEL_FILE
    damage(newest)
    found = run_state.find_checkpoint(out)
    assert found.path == root / "step-00000002"
    message = found.message()
    assert expected in message and str(newest) in message
    assert str(root / "step-00000002" / run_state.MODEL_FILE) in message
    capsys.readouterr()
    res = train_anchored("tiny", BlobSequences(8), tiny_train(steps=4), out=out, device="cpu",
                         progress=False, resume=root)
    err = capsys.readouterr().err
    assert str(newest) in err and "previous good checkpoint" in err
    assert len(res.losses) == 2                               # steps 3 and 4 again
    assert [r["step"] for r in read_metrics(metrics_path(out))] == [1, 2, 3, 4]


def test_non_safetensors_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not a readable checkpoint: not a safetensors file"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="has no training state"):
        run_state.find_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_state.find_checkpoint(tmp_path / "nothing")


def test_resume_with_a_different_architecture_raises(tmp_path):
    out = tmp_path / "ck.safetensors"
    train_anchored("tiny", BlobSequences(8), tiny_train(steps=2), out=out, device="cpu",
                   progress=False)
    from avatar_models.anchored_diffusion import SDiTConfig

    wider = SDiTConfig.from_name("tiny", hidden=32)
    with pytest.raises(ValueError, match=r"do not fit this model.*'hidden': \(64, 32\)"):
        train_anchored(wider, BlobSequences(8), tiny_train(steps=4), out=out, device="cpu",
                       progress=False, resume=out)


def test_accumulation_equals_one_big_batch():
    """grad_accum=2 over micro-batches of 2 == one batch of 4 (deterministic loss)."""
    torch.manual_seed(0)
    xs, ys = torch.randn(8, 5), torch.randn(8, 1)
    data = torch.utils.data.TensorDataset(xs, ys)

    def loss(model, batch, generator):
        x, y = batch
        return {"loss": (model(x) - y).square().mean()}

    results = []
    for accum in (1, 2):
        torch.manual_seed(1)
        net = torch.nn.Linear(5, 1)
        system = TrainingSystem("toy", net, loss, data,
                                collate=lambda items: tuple(map(torch.stack, zip(*items))))
        out = train(system, EngineConfig(steps=3, batch_size=4, grad_accum=accum, lr=0.1,
                                         ema_decay=0, progress=False, device="cpu"))
        results.append(torch.cat([p.detach().flatten() for p in out.model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_gives_the_same_training(one_thread):
    runs = []
    for ckpt in (False, True):
        res = train_anchored("tiny", BlobSequences(8), tiny_train(
            steps=2, save_every=0, activation_checkpointing=ckpt), device="cpu", progress=False)
        runs.append(res)
    assert runs[0].losses == runs[1].losses
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.gpu
def test_cuda_bf16_run_resumes_and_loads_on_cpu(tmp_path):
    """GPU lane (not run on the CPU machines): bf16 autocast on CUDA, CUDA RNG states in the
    checkpoint, peak CUDA memory in the metrics; the resumed curve matches to bf16 tolerance
    (CUDA reductions need not be bitwise reproducible)."""
    args = dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, ema_decay=0.9, save_every=2)
    full = tmp_path / "full" / "ck.safetensors"
    train_anchored("tiny", BlobSequences(8), TrainConfig(**args), device="cuda", out=full,
                   progress=False)
    cut = tmp_path / "cut" / "ck.safetensors"
    train_anchored("tiny", BlobSequences(8), TrainConfig(**args), device="cuda", out=cut,
                   progress=False)
    step2 = run_state.checkpoint_root(cut) / "step-00000002"
    assert "cuda" in run_state.find_checkpoint(step2).state["rng"][0]
    train_anchored("tiny", BlobSequences(8), TrainConfig(**args), device="cuda", out=cut,
                   progress=False, resume=step2)
    a, b = read_metrics(metrics_path(full)), read_metrics(metrics_path(cut))
    assert [r["step"] for r in b] == [1, 2, 3, 4] and a[0]["peak_cuda_mb"] > 0
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=2e-2)
    assert load_checkpoint(cut, device="cpu").extra["step"] == 4
