"""Delta checkpoints on disk: ``delta.safetensors`` (tensors only, no pickle) + ``delta_config.json``.

The JSON holds the format version, the deltatune version, the method configs, a fingerprint of the base
model and the SHA-256 of the tensor file, so a checkpoint that is corrupt, truncated, from a newer
deltatune, or for another base model is refused with a message instead of loading wrong.
Writes are atomic at the directory level: everything goes to a temporary sibling that is renamed into
place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import quant
from .errors import BaseModelMismatchError, CheckpointError, CheckpointNotFoundError, ConfigError
from .inject import named_base_parameters

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture and parameter shapes of the *base* model (delta parameters excluded).

    Shapes are the full-precision ones (a 4-bit weight is stored packed), so a delta trained on a quantized
    base loads onto the same model at full precision and the other way round."""
    shapes = sorted((name, list(quant.logical_shape(p))) for name, p in named_base_parameters(model))
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None),
            "num_parameters": sum(math.prod(shape) for _, shape in shapes), "shapes_sha256": digest}


def check_fingerprint(saved: dict[str, Any], model: nn.Module, where: Path) -> None:
    """Raise BaseModelMismatchError when ``model`` is not the base the checkpoint was saved from."""
    now = fingerprint(model)
    saved = saved if isinstance(saved, dict) else {}  # a hand-edited JSON: report it as a mismatch, not a crash
    if saved.get("shapes_sha256") == now["shapes_sha256"]:
        return
    count = saved.get("num_parameters")
    count = f"{count:,}" if isinstance(count, int) else "?"
    raise BaseModelMismatchError(
        f"checkpoint {where} was saved for a {saved.get('class')} ({saved.get('model_type')}, "
        f"{count} parameters) but this model is a {now['class']} ({now['model_type']}, "
        f"{now['num_parameters']:,} parameters) with different parameter shapes. Load it onto the base model it "
        f"was trained from, or pass check_base=False if you know the shapes of the delta still fit.")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoint checksums, data-cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_directory(target: Path) -> _AtomicDir:
    return _AtomicDir(Path(target))


class _AtomicDir:
    """Context manager yielding a temp dir that replaces ``target`` only if the block succeeds.

    OS errors (read-only directory, full disk) become a CheckpointError that says which and what to do,
    and leave ``target`` as it was. An existing ``target`` is replaced only when it holds nothing but
    names the new version also writes (an earlier save of the same kind): deltatune never deletes files
    it did not write, e.g. when pointed at a directory that holds the user's other work.
    """

    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> Path:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            # the writer's pid in the name lets a later save recognise the debris of a killed writer
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{self._temp_prefix()}{os.getpid()}-", dir=self.target.parent))
        except OSError as e:
            raise write_error(self.target, e) from e
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, (OSError, SafetensorError)) and not isinstance(exc, CheckpointError):
                raise write_error(self.target, exc) from exc
            return
        try:
            self._check_replaceable()
            self._swap()
        except (OSError, CheckpointError) as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(e, CheckpointError):
                raise
            raise write_error(self.target, e) from e
        self._remove_dead_writers_temps()

    def _temp_prefix(self) -> str:
        return f".{self.target.name}.tmp-"

    def _remove_dead_writers_temps(self) -> None:
        """Delete temp dirs left next to ``target`` by writers killed mid-save (kill -9, OOM killer), so a
        preempted job that resumes many times doesn't pile them up. Only dirs whose writer pid is no longer
        running on this machine; anything else (a live writer, a name without a pid) is left alone."""
        if os.name != "posix":  # os.kill(pid, 0) is a liveness probe only on POSIX
            return
        prefix = self._temp_prefix()
        for path in self.target.parent.glob(glob.escape(prefix) + "*"):
            pid = path.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _is_running(int(pid)):
                shutil.rmtree(path, ignore_errors=True)

    def _check_replaceable(self) -> None:
        if not self.target.exists():
            return
        if not self.target.is_dir():
            raise CheckpointError(f"cannot save to {self.target}: it exists and is a file, not a directory; "
                                  f"choose another path or remove the file")
        foreign = sorted(set(os.listdir(self.target)) - set(os.listdir(self.tmp)))
        if foreign:
            raise CheckpointError(f"cannot save to {self.target}: it already holds files this save would not "
                                  f"write ({foreign[:5]}), and replacing it would delete them. Save to a new or "
                                  f"empty directory (or a subdirectory), or remove those files first.")

    def _swap(self) -> None:
        """Two renames; a crash between them leaves the complete ``.old`` copy, which ``_resolve`` reads."""
        old = self.target.with_name(f".{self.target.name}.old")
        if self.target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        try:
            os.replace(self.tmp, self.target)
        except OSError:
            if old.exists() and not self.target.exists():
                os.replace(old, self.target)  # put the previous version back
            raise
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.target.parent)


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_error(target: Path, error: BaseException) -> CheckpointError:
    """A CheckpointError for a failed write, saying whether the disk is full or the place not writable."""
    code = getattr(error, "errno", None)
    if code is None:  # safetensors reports I/O failures as SafetensorError("... (os error 28)")
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    reason = getattr(error, "strerror", None) or str(error)
    if code in _DISK_FULL:
        hint = "the disk is full: free some space or save to another disk"
    elif code in _NOT_WRITABLE:
        hint = "the directory is not writable (permissions or a read-only file system): choose a writable one"
    else:
        hint = "check that the directory is writable and the disk has space"
    return CheckpointError(f"could not write {target}: {reason}; {hint}. Nothing was changed at {target}.")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


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
            "tensors": {"file": TENSORS_FILE, "sha256": file_sha256(directory / TENSORS_FILE)}}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    for name in (TENSORS_FILE, CONFIG_FILE):
        with open(directory / name, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write a checkpoint directory (replacing an older one only once the new one is complete)."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:  # raises CheckpointError naming a full disk or unwritable dir
        write_files(tmp, tensors, meta)
    return directory


def _resolve(directory: Path) -> Path:
    """The checkpoint dir, or the complete older copy left by a crash between the two renames."""
    if (directory / CONFIG_FILE).exists():
        return directory
    if directory.exists() and not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory} is a file; a deltatune checkpoint is a directory holding "
                                      f"{CONFIG_FILE} and {TENSORS_FILE}: pass that directory")
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
    if not isinstance(meta["format_version"], int) or isinstance(meta["format_version"], bool):
        raise CheckpointError(f"{directory / CONFIG_FILE}: format_version is {meta['format_version']!r}, not an "
                              f"integer; the file is corrupt or was not written by deltatune")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{directory} uses checkpoint format {meta['format_version']}, newer than this "
                              f"deltatune supports ({FORMAT_VERSION}); upgrade deltatune "
                              f"(saved by {meta.get('deltatune_version', '?')})")
    return directory, meta


def load_safetensors(path: Path, error: type[CheckpointError | ConfigError] = CheckpointError,
                     what: str = "") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with an unreadable file reported as ``error`` (``what`` prefixes it)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{what}{path} is not a readable safetensors file ({e})") from e


def read_tensors(directory: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load the tensor file after checking it against the checksum recorded in the JSON."""
    info = meta.get("tensors", {})
    name = info.get("file", TENSORS_FILE) if isinstance(info, dict) else None
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        # a checkpoint from an untrusted source must not point at files outside its own directory
        raise CheckpointError(f"{directory / CONFIG_FILE}: 'tensors' must name a file inside the checkpoint "
                              f"directory, got {info!r}; the file is corrupt or was not written by deltatune")
    path = directory / name
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} is missing; the checkpoint is incomplete")
    if info.get("sha256") and file_sha256(path) != info["sha256"]:
        raise CheckpointError(f"{path} does not match the checksum in {CONFIG_FILE}: the file is truncated or "
                              f"corrupt. Re-save the delta or use another checkpoint.")
    tensors = load_safetensors(path)
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:  # loadable, but the outputs will be NaN: say so instead of failing silently later
        log.warning("%s holds NaN/inf values in %d tensor(s) (e.g. %s): the run that saved it probably diverged; "
                    "an earlier checkpoint may be usable", path, len(bad), bad[:3])
    return tensors


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
