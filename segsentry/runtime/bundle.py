"""Loading a deployable ONNX bundle: the graph bytes plus its verified manifest (no onnx package needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segsentry.errors import BundleError
from segsentry.manifest import Manifest, read_manifest


@dataclass(frozen=True)
class Bundle:
    """An ONNX bundle in memory. ``model_bytes`` is what backends load; ``manifest`` was hash-checked."""

    path: Path
    model_bytes: bytes
    manifest: Manifest

    @property
    def weights_sha256(self) -> str:
        return self.manifest.weights_sha256


def load_bundle(path: str | Path, *, verify_hash: bool = True) -> Bundle:
    """Read ``path`` and its manifest; raise :class:`BundleError` on anything unusable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror or exc}") from exc
    manifest = read_manifest(data, verify_hash=verify_hash)
    return Bundle(path=path, model_bytes=data, manifest=manifest)
