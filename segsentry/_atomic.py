"""Atomic file writes: write into a hidden temporary folder beside the target, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


PARTIAL = ".partial-"  # in the name of every temporary folder: ``.NAME.partial-XXXX``


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a path with ``target``'s own name inside a hidden temporary folder beside it; on success move what
    was written there onto ``target`` (and its companion files) and remove the folder.

    The temporary folder's name ends in no file ending, so a glob for ``*.nii.gz`` in the target folder never
    picks up a half-written file; writers that choose their format by ending (SimpleITK) see the real name; and
    multi-file formats (``.mhd`` + ``.raw``, ``.hdr`` + ``.img``) land complete, the named file last. On error
    the folder is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name.split('.')[0]}{PARTIAL}", dir=target.parent))
    tmp = folder / target.name
    try:
        yield tmp
        companions = sorted(p for p in folder.iterdir() if p.name != target.name)
        mode = 0o666 & ~current_umask()  # mkstemp/mkdtemp-style files are 0600; give them the usual permissions
        for written in [*companions, tmp]:
            os.chmod(written, mode)
            os.replace(written, target.parent / written.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def leftover_partials(folder: str | Path) -> list[Path]:
    """Temporary folders :func:`atomic_path` left in ``folder`` because its writer was killed mid-write (a
    process killed with SIGKILL runs no ``finally``). Only safe to remove once no writer uses the folder."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(f".*{PARTIAL}*") if p.is_dir()) if folder.is_dir() else []
