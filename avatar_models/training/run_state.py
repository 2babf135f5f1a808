"""Resumable training checkpoints: safetensors files plus one small JSON state, no pickle.

Layout, for a run whose final weights go to ``runs/ck.safetensors``::

    runs/ck.checkpoints/step-00000200/model.safetensors  weights + EMA (load_checkpoint format)
    runs/ck.checkpoints/step-00000200/optimizer.safetensors  optimiser tensors
    runs/ck.checkpoints/step-00000200/state.json  step, configs, data position, RNG states of
        every rank, the optimiser's non-tensor state, size + sha256 of the two files above

A step directory is written under a temporary name, every file fsynced, then renamed, so a
process killed at any moment leaves whole checkpoints only. :func:`find_checkpoint` resolves
``--resume DIR_OR_FILE`` and walks back from the newest checkpoint to the first one whose files
match their recorded size and hash, saying which files it rejected and which one it uses.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from avatar_models.checkpoint import file_digest, fsync_dir, save_tensors_atomic, verify_file

STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = "avatar-kernels-train/1"
_STEP_PREFIX = "step-"


def checkpoint_root(out: str | os.PathLike) -> Path:
    """Directory of the resumable checkpoints of a run writing ``out`` (``ck.safetensors`` ->
    ``ck.checkpoints``)."""
    out = Path(out)
    return out.with_name(out.stem + ".checkpoints")


def step_dirs(root: Path) -> list[Path]:
    """Complete step directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX)
            and p.name[len(_STEP_PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(_STEP_PREFIX):]))


# ---- optimiser state <-> safetensors + JSON ---------------------------------------------------

def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A ``state_dict()`` of a torch optimiser (or ``get_optimizer_state_dict``) -> (tensors,
    JSON): tensors named ``state/<param key>/<field>``; everything else in the JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    keys = []
    for key, fields in state["state"].items():
        keys.append(key)
        for name, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{key}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(key), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in state["param_groups"]]
    return tensors, {"keys": keys, "scalars": scalars, "param_groups": groups}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key in meta["keys"]:
        fields = dict(meta["scalars"].get(str(key), {}))
        prefix = f"state/{key}/"
        fields.update({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
        state[key] = fields
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- RNG states --------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """JSON-able RNG states of this process: torch (CPU and CUDA), Python, NumPy and the named
    generators."""
    import numpy as np

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"torch": _b64(torch.get_rng_state()), "python": [version, list(mt), gauss],
           "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "generators": {k: _b64(g.get_state()) for k, g in generators.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    import numpy as np

    torch.set_rng_state(_from_b64(state["torch"]))
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    for k, g in generators.items():
        g.set_state(_from_b64(state["generators"][k]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])


# ---- writing -----------------------------------------------------------------------------------

def write_checkpoint(root: Path, step: int, files: dict[str, tuple[dict, dict | None]],
                     state: dict, keep_last: int) -> Path:
    """Write ``files`` (name -> (tensors, safetensors metadata)) and ``state`` (plus the files'
    sizes and hashes) as ``root/step-<step>``, atomically; then delete all but the newest
    ``keep_last`` step directories. Returns the step directory."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_STEP_PREFIX}{step:08d}"
    for leftover in root.glob(f".{_STEP_PREFIX}*"):  # of a writer killed mid-checkpoint
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    tmp.mkdir()
    digests = {}
    for name, (tensors, metadata) in files.items():
        save_tensors_atomic(tmp / name, tensors, metadata)
        digests[name] = file_digest(tmp / name)
    state = {"format": STATE_FORMAT, **state, "step": step, "files": digests}
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # a step re-written after a resume from an older checkpoint
        old = root / f".{final.name}.old{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    fsync_dir(root)
    for stale in step_dirs(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


# ---- finding and reading -----------------------------------------------------------------------

@dataclass
class FoundCheckpoint:
    """A verified step directory, its state, and the newer ones rejected on the way."""

    path: Path
    state: dict
    rejected: list[str] = field(default_factory=list)

    def tensors(self, name: str = MODEL_FILE) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / name))

    def message(self) -> str | None:
        if not self.rejected:
            return None
        return ("; ".join(self.rejected) + f"; resuming from the previous good checkpoint "
                f"{self.path / MODEL_FILE} instead")


def check_step_dir(path: Path) -> tuple[dict | None, str | None]:
    """(state, None) when every file of the step directory matches its recorded size and hash,
    else (None, why not)."""
    state_path = path / STATE_FILE
    if not state_path.is_file():
        return None, f"{state_path} is missing"
    try:
        state = json.loads(state_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{state_path} is not valid JSON ({err})"
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return None, f"{state_path} is not a training state file (format {STATE_FORMAT!r})"
    for name, expected in state.get("files", {}).items():
        problem = verify_file(path / name, expected)
        if problem is not None:
            return None, f"rejected {problem}"
    return state, None


def find_checkpoint(path: str | os.PathLike) -> FoundCheckpoint:
    """Resolve ``--resume DIR_OR_FILE`` to the newest intact checkpoint at or before it.

    ``path`` may be a run's final weights file (``ck.safetensors``: its ``ck.checkpoints``), a
    checkpoints directory, a step directory, or a file inside one. Raises FileNotFoundError when
    nothing is there and ValueError when no intact checkpoint is left.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume: {path} does not exist")
    if path.is_file():
        sibling = checkpoint_root(path)
        if path.parent.name.startswith(_STEP_PREFIX):
            path = path.parent
        elif sibling.is_dir():
            path = sibling
        else:
            raise ValueError(f"--resume: {path} has no training state: expected a checkpoints "
                             f"directory {sibling} beside it, a step directory, or a file in one")
    if (path / STATE_FILE).exists() or path.name.startswith(_STEP_PREFIX):
        candidates = [d for d in step_dirs(path.parent)
                      if int(d.name[len(_STEP_PREFIX):]) <= int(path.name[len(_STEP_PREFIX):])]
        candidates = candidates or [path]
    else:
        candidates = step_dirs(path)
        if not candidates:
            raise ValueError(f"--resume: no step-* checkpoint directories in {path}")
    rejected = []
    for candidate in reversed(candidates):
        state, problem = check_step_dir(candidate)
        if state is not None:
            return FoundCheckpoint(candidate, state, rejected)
        rejected.append(problem)
    raise ValueError("--resume: no intact checkpoint left: " + "; ".join(rejected))
