"""Errors raised by segsentry.

Every error a user can trigger is a :class:`SegsentryError`; the CLI turns them into one-line messages and
a non-zero exit code. Messages say what was expected, what was found and what to do.
"""

from __future__ import annotations

import re

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[@-Z\\-_]")


class SegsentryError(Exception):
    """Base class of all errors meant for the user."""


class InputError(SegsentryError):
    """An input image or folder cannot be used (unreadable, wrong channel count, wrong dimension, NaN...)."""


class BundleError(SegsentryError):
    """An ONNX bundle is missing its manifest, has a mismatched weight hash, or is otherwise unusable."""


class ModelFolderError(SegsentryError):
    """An nnU-Net model folder (plans.json, dataset.json, fold_N/checkpoint) is incomplete or unsupported."""


class CalibrationError(SegsentryError):
    """Calibration cannot proceed (no training cases, degenerate features, ...)."""


class ExportError(SegsentryError):
    """Export to ONNX failed or the exported graph disagrees with torch."""


class BackendError(SegsentryError):
    """An inference backend cannot be created or failed while running."""


class MissingDependencyError(SegsentryError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed. "
            f"Install it with: pip install 'segsentry[{extra}]'"
        )
        self.package = package
        self.extra = extra


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (engines raise pages of it), or its type name when empty.

    Terminal escape codes (torch's weights-only error prints bold text) are removed: messages are for people
    and log files, not terminals."""
    text = _ANSI_ESCAPE.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
