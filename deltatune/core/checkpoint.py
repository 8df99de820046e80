"""Delta checkpoints on disk: ``delta.safetensors`` (tensors only, no pickle) + ``delta_config.json``.

The JSON holds the format version, the deltatune version, the method configs, a fingerprint of the base
model and the SHA-256 of the tensor file, so a checkpoint that is corrupt, truncated, from a newer
deltatune, or for another base model is refused with a message instead of loading wrong.
Writes are atomic at the directory level: everything goes to a temporary sibling that is renamed into
place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import BaseModelMismatchError, CheckpointError, CheckpointNotFoundError
from .inject import named_base_parameters

FORMAT_VERSION = 1
TENSORS_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture and parameter shapes of the *base* model (delta parameters excluded)."""
    shapes = sorted((name, list(p.shape)) for name, p in named_base_parameters(model))
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None),
            "num_parameters": sum(p.numel() for _, p in named_base_parameters(model)), "shapes_sha256": digest}


def check_fingerprint(saved: dict[str, Any], model: nn.Module, where: Path) -> None:
    """Raise BaseModelMismatchError when ``model`` is not the base the checkpoint was saved from."""
    now = fingerprint(model)
    if saved.get("shapes_sha256") == now["shapes_sha256"]:
        return
    raise BaseModelMismatchError(
        f"checkpoint {where} was saved for a {saved.get('class')} ({saved.get('model_type')}, "
        f"{saved.get('num_parameters'):,} parameters) but this model is a {now['class']} ({now['model_type']}, "
        f"{now['num_parameters']:,} parameters) with different parameter shapes. Load it onto the base model it "
        f"was trained from, or pass check_base=False if you know the shapes of the delta still fit.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_directory(target: Path) -> _AtomicDir:
    return _AtomicDir(Path(target))


class _AtomicDir:
    """Context manager yielding a temp dir that replaces ``target`` only if the block succeeds."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.target.with_name(f".{self.target.name}.old")
        if self.target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.target.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the tensor file and the JSON (with the tensor file's checksum) into ``directory``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, directory / TENSORS_FILE, metadata={"format": "pt", "deltatune": "delta"})
    meta = {**meta, "format_version": FORMAT_VERSION,
            "tensors": {"file": TENSORS_FILE, "sha256": _sha256(directory / TENSORS_FILE)}}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    for name in (TENSORS_FILE, CONFIG_FILE):
        with open(directory / name, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write a checkpoint directory (replacing an older one only once the new one is complete)."""
    directory = Path(directory)
    try:
        with atomic_directory(directory) as tmp:
            write_files(tmp, tensors, meta)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint to {directory}: {e.strerror or e}. "
                              f"Check that the directory is writable and the disk has space.") from e
    return directory


def _resolve(directory: Path) -> Path:
    """The checkpoint dir, or the complete older copy left by a crash between the two renames."""
    if (directory / CONFIG_FILE).exists():
        return directory
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and (old / CONFIG_FILE).exists():
        return old
    if not directory.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {directory}: the directory does not exist")
    raise CheckpointNotFoundError(f"{directory} is not a deltatune checkpoint: {CONFIG_FILE} is missing "
                                  f"(found {sorted(p.name for p in directory.iterdir())[:8]})")


def read_meta(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    directory = _resolve(Path(directory))
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise CheckpointError(f"{directory / CONFIG_FILE} has no format_version: not a deltatune checkpoint")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{directory} uses checkpoint format {meta['format_version']}, newer than this "
                              f"deltatune supports ({FORMAT_VERSION}); upgrade deltatune "
                              f"(saved by {meta.get('deltatune_version', '?')})")
    return directory, meta


def read_tensors(directory: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load the tensor file after checking it against the checksum recorded in the JSON."""
    info = meta.get("tensors", {})
    path = directory / info.get("file", TENSORS_FILE)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} is missing; the checkpoint is incomplete")
    if info.get("sha256") and _sha256(path) != info["sha256"]:
        raise CheckpointError(f"{path} does not match the checksum in {CONFIG_FILE}: the file is truncated or "
                              f"corrupt. Re-save the delta or use another checkpoint.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e


def check_keys(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: Path) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys (if any)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [f"{k}: checkpoint {list(found[k].shape)} vs model {list(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    if not (missing or extra or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[:2]})")
    raise CheckpointError(f"checkpoint {where} does not fit the attached delta: {'; '.join(parts)}. "
                          f"Was it saved with a different method config or base model?")
