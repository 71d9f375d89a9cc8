"""Checkpoint files: written all or nothing, read without running code.

* :func:`atomic_save` / :func:`atomic_write_text` write through a temporary
  file beside the target and rename it, so a kill, a full disk or an error
  leaves the previous file in place; a failure names the path and the cause,
  and the temporary file is removed.
* :func:`load_checkpoint` unpickles tensors and plain data only
  (``weights_only=True``): a crafted file is refused, not run. Every failure
  (missing, empty, not a torch file, truncated, wrong content) names the file.
* :func:`prepare_out_dir` checks an output folder before a run writes to it
  and sweeps temporary files a killed write left there.

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "ckpt.pt"
    >>> atomic_save({"config": {"lr": 0.1}, "model": {"w": torch.ones(2)}}, path)
    >>> load_checkpoint(path)["model"]["w"]
    tensor([1., 1.])
    >>> load_checkpoint(path.parent)
    Traceback (most recent call last):
    ...
    IsADirectoryError: ... is a directory, not a checkpoint file
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_save", "atomic_write_text", "load_checkpoint", "prepare_out_dir"]

#: temporary files of :func:`atomic_save` / :func:`atomic_write_text` and the write probe: ``.NAME.XXXXXXXX.tmp``
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _write_error(path: Path, exc: BaseException) -> OSError | None:
    """The OSError to raise for a failed write of ``path``: it names the path and the cause."""
    if isinstance(exc, OSError):
        cause = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return OSError(exc.errno, f"cannot write {path}: {cause}")
    if isinstance(exc, RuntimeError) and "unexpected pos" in str(exc):  # torch's zip writer on a short write
        return OSError(errno.EIO, f"cannot write {path}: short write ({exc}); is the disk full?")
    return None


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file beside it, then rename: never half-written.

    The temporary file is removed whatever happens; on failure ``path`` keeps its previous content.

    Raises:
        OSError: the write failed; the message names ``path`` and the cause ("no space left on
            device" for ENOSPC).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only say so here, before the rename
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        error = _write_error(path, exc)
        if error is None:
            raise
        raise error from exc


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never half-written.

    Raises:
        OSError: naming ``path`` and the cause; the previous file at ``path`` is kept.
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` like :func:`atomic_save`: all or nothing."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _sweep_temporary_files(out: Path) -> None:
    """Remove the temporary files a killed write left in ``out`` (only names our writes use)."""
    for entry in out.iterdir():
        if _TMP_NAME.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)


def prepare_out_dir(out: Path) -> None:
    """Create ``out``, sweep stale temporary files, and check that files can be written there.

    Raises:
        OSError: ``out`` cannot be created or written (naming it and the cause).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        _sweep_temporary_files(out)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe.", suffix=".tmp")
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        cause = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OSError(exc.errno, f"output directory {out} is not writable: {cause}") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _unsafe_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused (e.g. ``Unsupported global: GLOBAL os.system``)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\. Please|\n|$)", str(exc))
    return found.group(1).strip() if found else _first_line(exc)


def _read_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``, its failures as one clear error naming ``path``."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6; so does lobster-fx
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"PK"):
            raise ValueError(f"{path} is a damaged or truncated torch checkpoint (a zip archive without its "
                             "central directory, as a write cut short leaves)")
        raise ValueError(f"{path} is not a torch checkpoint (torch.save writes a zip archive; "
                         f"this file starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data: no code runs
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise ValueError(f"{path} holds Python objects other than tensors and plain data "
                             f"({_unsafe_reason(exc)}): refusing to load it, since unpickling them could run "
                             "code (lobster-fx checkpoints hold only tensors, numbers and strings)") from exc
        raise ValueError(f"{path} is not a readable torch checkpoint ({_first_line(exc)})") from exc


def load_checkpoint(path: str | Path, *, required: tuple[str, ...] = ("config", "model")) -> dict[str, Any]:
    """Load a ``lobster-fx train`` checkpoint without running code from it.

    Only tensors and plain data are unpickled (``weights_only=True``); anything else is refused.

    Raises:
        FileNotFoundError, IsADirectoryError: ``path`` is missing or a directory.
        ValueError: the file is empty, not a torch checkpoint, holds other Python objects, or
            lacks one of the ``required`` keys. Every message names ``path``.
    """
    path = Path(path)
    state = _read_checkpoint(path)
    if not isinstance(state, dict):
        raise ValueError(  # noqa: TRY004 -- a file with the wrong content, like the checks below
            f"{path} is not a lobster-fx training checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = [key for key in required if key not in state]
    if missing:
        keys = ", ".join(map(str, list(state)[:8])) + (", ..." if len(state) > 8 else "")
        raise ValueError(f"{path} is not a lobster-fx training checkpoint (no {', '.join(map(repr, missing))} "
                         f"{'key' if len(missing) == 1 else 'keys'}; keys: {keys or 'none'})")
    if "config" in required and not isinstance(state["config"], dict):
        raise ValueError(f"{path} is not a lobster-fx training checkpoint (its 'config' is not a dict)")
    return state
