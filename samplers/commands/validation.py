"""Checks of ``avatar-kernels`` options and input files, run before any model is loaded.

Every failure names the option (and file), what was expected and what was received:

- argparse ``type=`` factories (:func:`positive_int`, :func:`int_range`, :func:`float_range`,
  :func:`output_file`) reject a bad value while parsing;
- :class:`OptionError` (a ValueError) is what the runners raise for checks that need more than
  one option or a look at a file; :func:`is_user_error` tells ``samplers.cli.main`` which
  exceptions are the user's (one line, exit status 2) and which are bugs (a traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import struct
import sys
from pathlib import Path

# safetensors' header-size field is a little-endian u64; the library refuses headers > 100 MB
_SAFETENSORS_MAX_HEADER = 100_000_000
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class OptionError(ValueError):
    """A user error in an option or an input file; the message names it and the fix."""


def is_user_error(exc: BaseException) -> bool:
    """Exceptions the CLI reports as one line with exit status 2 (everything else is a bug and
    keeps its traceback): OptionError, a missing/unreadable path, and any ValueError *subclass*
    (NoFaceFoundError, checkpoint errors), which library code raises only for bad input files;
    a plain ValueError or TypeError from deep inside is treated as a bug."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        PermissionError)):
        return True
    return isinstance(exc, ValueError) and type(exc) is not ValueError


# --------------------------------------------------------------------------- argparse types

def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_range(low: int | None = None, high: int | None = None):
    """argparse type: an int in [low, high] (either bound optional)."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an int {_bounds(low, high)}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in "invalid int value" messages
    return parse


def float_range(low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False):
    """argparse type: a finite float in [low, high] ((low, ...) with ``low_open``)."""
    def parse(text: str) -> float:
        value = _number(text, float)
        bad = ((low is not None and (value <= low if low_open else value < low))
               or (high is not None and (value >= high if high_open else value > high)))
        if bad:
            raise argparse.ArgumentTypeError(
                f"expected a number {_bounds(low, high, low_open, high_open)}, got {value:g}")
        return value
    parse.__name__ = "float"
    return parse


def _bounds(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0.0, low_open=True)
non_negative_float = float_range(0.0)
probability = float_range(0.0, 1.0)


def output_file(*suffixes: str):
    """argparse type: a path to write whose suffix is one of ``suffixes`` (case-insensitive)
    and that is not an existing folder."""
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"{text!r} must end in {' or '.join(suffixes)}, got "
                f"{path.suffix or 'no extension'}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file path")
        return path
    parse.__name__ = "path"
    return parse


def input_file(what: str, suffixes: tuple[str, ...] = ()):
    """argparse type: an existing file (``suffixes``: accepted extensions, any when empty)."""
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{what} not found: {text!r}")
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text!r} must be {what} ({', '.join(suffixes)}), "
                                             f"got {path.suffix or 'no extension'}")
        return path
    parse.__name__ = "path"
    return parse


image_file = input_file("an image file", _IMAGE_SUFFIXES)


# --------------------------------------------------------------------------- devices

def add_device_argument(parser) -> None:
    """``--device``, resolved by :func:`resolve_device` (the same rule for every verb)."""
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def resolve_device(text: str | None, option: str = "--device"):
    """The one device rule of every verb: ``None`` -> cuda when available, else cpu; otherwise
    ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise OptionError(f"{option} {text!r} is not a device; use cpu, cuda or cuda:N "
                          f"(e.g. cuda:0)") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"{option} {text!r}: only cpu, cuda and cuda:N are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{option} {text}: CUDA is not available on this machine "
                              f"(torch.cuda.is_available() is False); use --device cpu or leave "
                              f"{option} out")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise OptionError(f"{option} {text}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    return device


# --------------------------------------------------------------------------- KEY=VALUE options

def parse_assignments(items: list[str], option: str) -> dict:
    """``["a=1", "b-c=x"]`` -> ``{"a": 1, "b_c": "x"}``; values parsed as JSON where they parse."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[key.strip().replace("-", "_")] = parsed
    return out


def dataclass_overrides(cls, items: list[str], option: str, defaults: dict | None = None) -> dict:
    """``--set FIELD=VALUE`` items checked against the fields of dataclass ``cls``: unknown
    fields and values of the wrong type raise OptionError naming the item. ``defaults`` (a
    field -> value dict, e.g. a named config) gives the expected types; else the field defaults.
    Ints are accepted for float fields (and converted)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in parse_assignments(items, option).items():
        if key not in fields:
            raise OptionError(f"{option} {key}=...: {cls.__name__} has no field {key!r}; "
                              f"expected one of {sorted(fields)}")
        ref = (defaults or {}).get(key, fields[key].default)
        expected = type(ref) if ref is not None and ref is not dataclasses.MISSING else None
        given = f"{option} {key}={value if not isinstance(value, str) else repr(value)}"
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is tuple and isinstance(value, list):   # JSON lists for tuple fields
            value = tuple(value)
        if expected is not None and type(value) is not expected:
            raise OptionError(f"{given}: {key} must be {expected.__name__}, got "
                              f"{type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"{given}: {key} must be finite")
        out[key] = value
    return out


# --------------------------------------------------------------------------- files and folders

def read_safetensors_header(path: Path, option: str) -> dict:
    """The JSON header of a safetensors file, checked for truncation and garbage without
    trusting it: an empty, truncated, text or pickle file raises OptionError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {str(path)!r}: file not found")
    size = path.stat().st_size
    bad = f"{option} {str(path)!r} is not a safetensors checkpoint"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise OptionError(f"{bad}: the file has {size} bytes (empty or truncated)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _SAFETENSORS_MAX_HEADER) or length < 2:
            raise OptionError(f"{bad}: its first 8 bytes give a header of {length} bytes, the "
                              f"file has {size} (truncated, or a text / pickle / other file)")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise OptionError(f"{bad}: its header is not JSON (a corrupt or other file)") from None
    if not isinstance(header, dict):
        raise OptionError(f"{bad}: its header is not a JSON object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise OptionError(f"{bad}: tensor {name!r} has no valid data_offsets")
        data_end = max(data_end, int(offsets[1]))
    if 8 + length + data_end > size:
        raise OptionError(f"{option} {str(path)!r} is truncated: its header describes "
                          f"{8 + length + data_end} bytes, the file has {size}")
    return header


def check_checkpoint_file(path: Path, option: str, system: str) -> dict:
    """A readable ``avatar-kernels`` checkpoint of ``system``; returns its metadata with
    ``config`` and ``extra`` parsed (nothing but the header is read)."""
    from avatar_models.checkpoint import FORMAT

    meta = read_safetensors_header(path, option).get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise OptionError(f"{option} {str(path)!r} is a safetensors file but not an "
                          f"avatar-kernels checkpoint (format {meta.get('format')!r}, expected "
                          f"{FORMAT!r}); pass a file written by `avatar-kernels train`")
    if meta.get("system") != system:
        raise OptionError(f"{option} {str(path)!r} holds a {meta.get('system')!r} model, "
                          f"expected {system!r}")
    try:
        return {**meta, "config": json.loads(meta["config"]),
                "extra": json.loads(meta.get("extra", "{}"))}
    except (KeyError, json.JSONDecodeError):
        raise OptionError(f"{option} {str(path)!r}: its config metadata is missing or not "
                          f"JSON (a corrupt checkpoint)") from None


# what a model folder's config.json must say, per kind of folder
_MODEL_KINDS = {
    "vae": ("a diffusers AutoencoderKL folder", lambda c: c.get("_class_name") == "AutoencoderKL"),
    "clip": ("a transformers CLIPModel folder",
             lambda c: c.get("model_type") == "clip" or "vision_config" in c),
    "wav2vec2": ("a transformers Wav2Vec2Model folder",
                 lambda c: c.get("model_type") == "wav2vec2"),
}


def check_model_folder(path: Path, option: str, kind: str) -> Path:
    """A local model folder of ``kind`` ("vae", "clip" or "wav2vec2"): raises FileNotFoundError (the
    documented error of the loaders) naming the option, the folder and what it must hold."""
    from avatar_models.conditioning._checks import resolve_model_dir

    expected, matches = _MODEL_KINDS[kind]
    try:
        folder = resolve_model_dir(path, kind, expected)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{option}: {exc}") from None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FileNotFoundError(f"{option} {str(folder)!r}: config.json is not JSON; expected "
                                f"{expected}") from None
    if not isinstance(config, dict) or not matches(config):
        found = config.get("_class_name") or config.get("model_type") \
            if isinstance(config, dict) else None
        raise FileNotFoundError(f"{option} {str(folder)!r} is not {expected} (its config.json "
                                f"describes {found!r})")
    return folder


def check_video_file(path: Path, option: str, min_frames: int = 2):
    """An existing, decodable video with at least ``min_frames`` frames; returns its
    :class:`~avatar_models.media.VideoInfo`. A still image is refused by name."""
    from avatar_models.media import video_info

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {str(path)!r}: file not found")
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        raise OptionError(f"{option} {str(path)!r} is a still image; {option} needs a video "
                          f"(.mp4 ...) with at least {min_frames} frames")
    try:
        info = video_info(path)
    except Exception as exc:  # PyAV raises many types for undecodable files
        raise OptionError(f"{option} {str(path)!r} is not a readable video "
                          f"({type(exc).__name__}: {exc})") from None
    if info.num_frames < min_frames:
        raise OptionError(f"{option} {str(path)!r} has {info.num_frames} frame(s); it must have "
                          f"at least {min_frames}")
    return info


def print_note(message: str) -> None:
    """A line about something a command skipped or assumed, on stderr."""
    print(f"note: {message}", file=sys.stderr)


def check_sd15_folder_option(path: Path, check_config, option: str = "--sd15") -> Path:
    """An SD1.5 UNet folder (``path/unet`` or ``path``) whose config.json passes
    ``check_config(sd_config, where)`` (a system's check, raising ValueError): the folder, or
    FileNotFoundError / OptionError naming the option."""
    from avatar_models.sd15_weights import read_sd15_config, sd15_unet_folder

    try:
        folder = sd15_unet_folder(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{option}: {exc}") from None
    try:
        check_config(read_sd15_config(folder), str(folder / "config.json"))
    except ValueError as exc:
        raise OptionError(f"{option}: {exc}") from None
    return folder
