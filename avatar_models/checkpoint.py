"""Safetensors checkpoints: weights plus JSON metadata, no pickle anywhere.

One file holds ``model.<name>`` tensors (the trained weights) and optionally ``ema.<name>``
tensors (their exponential moving average); the safetensors header metadata (string -> string)
holds ``format``, ``system`` (e.g. "anchored"), ``config`` (the model config as JSON) and
``extra`` (any JSON: diffusion schedule, conditioning setup, training step ...). Writes are atomic
(temporary file, fsync, rename), so a crash leaves either the old file or the new one.
:func:`file_digest` (size and sha256) lets a caller record what it wrote and :func:`verify_file`
detect a truncated, altered or non-safetensors file later.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "avatar-kernels/1"


@dataclass
class Checkpoint:
    system: str
    config: dict
    extra: dict = field(default_factory=dict)
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)

    def weights(self, which: str = "ema") -> dict[str, torch.Tensor]:
        """``"ema"`` (falls back to the raw weights when the file has no EMA) or ``"model"``."""
        if which not in ("ema", "model"):
            raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
        return self.ema if which == "ema" and self.ema else self.model


def _state(module_or_dict) -> dict[str, torch.Tensor]:
    sd = module_or_dict if isinstance(module_or_dict, dict) else module_or_dict.state_dict()
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(path: str | os.PathLike, model, *, system: str, config: dict,
                    ema=None, extra: dict | None = None) -> Path:
    """Write ``model`` (an nn.Module or a state dict), optional ``ema``, config and extra."""
    tensors, metadata = checkpoint_contents(model, system=system, config=config, ema=ema,
                                            extra=extra)
    return save_tensors_atomic(path, tensors, metadata)


def checkpoint_contents(model, *, system: str, config: dict, ema=None,
                        extra: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The (tensors, metadata) pair :func:`save_checkpoint` writes."""
    tensors = {f"model.{k}": v for k, v in _state(model).items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in _state(ema).items()})
    metadata = {"format": FORMAT, "system": system, "config": json.dumps(config),
                "extra": json.dumps(extra or {})}
    return tensors, metadata


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_tensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
    """safetensors ``save_file`` to a temporary name, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; give what open() would
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def file_digest(path: str | os.PathLike) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file (read in 8 MiB chunks)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` starts with a well-formed safetensors header that fits the file, else
    why not (catches pickles, text and truncated files without reading the tensors)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"not a safetensors file (header length {n} exceeds the {size}-byte file)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if 8 + n + end != size:
        return f"truncated or padded: the header describes {8 + n + end} bytes, the file has {size}"
    return None


def verify_file(path: str | os.PathLike, expected: dict | None = None) -> str | None:
    """None when ``path`` is an intact safetensors file (and matches ``expected`` size / sha256
    from :func:`file_digest`), else a sentence saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    if expected is not None:
        size = path.stat().st_size
        if size != expected["size"]:
            return (f"{path} has {size} bytes, the state file recorded {expected['size']} "
                    f"(truncated or replaced)")
        digest = file_digest(path)["sha256"]
        if digest != expected["sha256"]:
            return (f"{path} has sha256 {digest[:16]}..., the state file recorded "
                    f"{expected['sha256'][:16]}... (corrupt)")
    problem = safetensors_problem(path)
    return None if problem is None else f"{path}: {problem}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, *, system: str | None = None,
                    device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (``system`` checked when given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    problem = safetensors_problem(path)
    if problem is not None:
        raise ValueError(f"{path} is not a readable checkpoint: {problem}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an avatar-kernels checkpoint (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        if system is not None and meta.get("system") != system:
            raise ValueError(f"{path} holds a {meta.get('system')!r} model, expected {system!r}")
        ckpt = Checkpoint(meta["system"], json.loads(meta["config"]),
                          json.loads(meta.get("extra", "{}")))
        for key in f.keys():
            group, _, name = key.partition(".")
            getattr(ckpt, group)[name] = f.get_tensor(key)
    return ckpt
