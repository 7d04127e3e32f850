"""Test volumes with non-identity geometry, nnU-Net's predictor as an oracle, and the tiny model specs."""

from __future__ import annotations

from pathlib import Path

import subprocess
import sys
import textwrap

import numpy as np
import SimpleITK as sitk

from segsentry.devtools.nnunet_folder import CT_SPEC, MR_SPEC, ModelSpec, make_model_folder  # noqa: F401
from segsentry.devtools.nnunet_reference import nnunet_predict  # noqa: F401

ROTATED_DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90° about z


def write_volume(path: Path, array_zyx: np.ndarray, *, spacing_xyz, origin=(10.0, -20.0, 5.0),
                 direction=ROTATED_DIRECTION) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def ct_volume(rng: np.random.Generator, shape_zyx=(12, 80, 70), border: int = 3) -> np.ndarray:
    """An int16 'CT' in HU: air, a soft-tissue body with lungs and a bright blob, and a zero (cropped-FOV) border."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape_zyx], indexing="ij")
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    vol = np.where(body, 40.0, -1000.0)
    lungs = body & (((x - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1) | body & (((x + 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1)
    vol[lungs] = -850.0
    vol[body & ((x - 0.35) ** 2 + (y - 0.1) ** 2 + (z * 0.3) ** 2 < 0.03)] = 30.0
    vol += rng.normal(0, 25, shape_zyx)
    vol = vol.astype(np.int16)
    vol[:, :border, :] = 0
    vol[:, :, -border:] = 0
    return vol


def mr_volumes(rng: np.random.Generator, shape_zyx=(30, 40, 34)) -> list[np.ndarray]:
    """Two float32 'MR' channels of a head-like ellipsoid on an exactly-zero background."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape_zyx], indexing="ij")
    head = (z / 0.9) ** 2 + (y / 0.85) ** 2 + (x / 0.8) ** 2 < 1
    lesion = ((z - 0.2) ** 2 + (y + 0.3) ** 2 + (x - 0.1) ** 2) < 0.06
    t1 = np.where(head, 300 + rng.normal(0, 20, shape_zyx), 0).astype(np.float32)
    flair = np.where(head, 200 + rng.normal(0, 15, shape_zyx), 0).astype(np.float32)
    flair[lesion & head] += 250
    return [t1, flair]


_BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set({blocked!r})

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test)")
            return None

    sys.meta_path.insert(0, Block())
""")


def run_with_blocked_imports(blocked: list[str], body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a child interpreter where importing any of ``blocked`` fails as if not installed.

    ``body`` may use ``BLOCKED`` (the set) and ``sys``; it should print what the test checks.
    """
    code = _BLOCKER.format(blocked=blocked) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
