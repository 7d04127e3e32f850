"""Test volumes with non-identity geometry, nnU-Net's predictor as an oracle, and the tiny model specs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segsentry.devtools.nnunet_folder import CT_SPEC, MR_SPEC, REGION_SPEC, ModelSpec, make_model_folder  # noqa: F401
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


def skip_without_native_bf16() -> None:
    """Skip the calling test unless OpenVINO is installed and its CPU device runs bf16 natively (AVX512_BF16 or
    AMX): what ``--precision bf16`` needs (the backend's own check, ``cpu_capabilities``)."""
    ov = pytest.importorskip("openvino")
    from segsentry.runtime.backends.openvino import cpu_capabilities

    if "BF16" not in cpu_capabilities(ov.Core()):
        pytest.skip("this CPU has no native bf16 (AVX512_BF16 or AMX)")


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net's network-space geometry, recomputed from plans.json and the image files alone (design.md formulas), so
# tests can check the runtime's tiling and its box mapping without calling either.


def nnunet_tile_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
    """Tile starts along one axis: ``num_steps = ceil((size - patch) / (patch·step)) + 1``, starts
    ``round(i·(size - patch)/(num_steps - 1))`` (``round`` is half-to-even, as ``np.round`` in nnU-Net)."""
    assert size >= patch, "pad to the patch size first"
    n = math.ceil((size - patch) / (patch * step)) + 1
    if n == 1:
        return [0]
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class NetworkGeometry:
    """Where a case lands in network space. Every tuple is in the transposed (network) axis order, except
    ``transpose_forward`` itself, which maps network axis ``j`` to input numpy axis ``transpose_forward[j]``."""

    transpose_forward: tuple[int, int, int]
    bbox: tuple[tuple[int, int], ...]  # nonzero bbox, [start, stop) in the transposed, uncropped volume
    shape_cropped: tuple[int, int, int]
    shape_preprocessed: tuple[int, int, int]
    pad_below: tuple[int, int, int]  # zero padding before the volume (centred, like acvl_utils pad_nd_image)
    patch: tuple[int, int, int]
    tiles: tuple[tuple[tuple[int, int], ...], ...]  # patch boxes in padded coordinates, nnU-Net's z-y-x order


def nnunet_network_geometry(model_dir: Path, files: list[Path], *,
                            configuration: str = "3d_fullres") -> NetworkGeometry:
    """Network-space geometry of one case (channel files ``files``) for the model folder's ``plans.json``."""
    plans = json.loads((Path(model_dir) / "plans.json").read_text())
    config = plans["configurations"][configuration]
    forward = tuple(int(a) for a in plans["transpose_forward"])
    images = [sitk.ReadImage(str(f)) for f in files]
    data = np.stack([sitk.GetArrayFromImage(i) for i in images]).transpose([0, *[a + 1 for a in forward]])
    spacing = np.array(images[0].GetSpacing()[::-1], dtype=np.float64)[list(forward)]
    nonzero = (data != 0).any(axis=0)  # filling holes cannot move a bounding box
    bbox = []
    for axis in range(3):
        hits = np.flatnonzero(nonzero.any(axis=tuple(b for b in range(3) if b != axis)))
        assert hits.size, "test volumes are never all zero"
        bbox.append((int(hits[0]), int(hits[-1]) + 1))
    bbox = tuple(bbox)
    cropped = tuple(b - a for a, b in bbox)
    target = np.array(config["spacing"], dtype=np.float64)
    preprocessed = tuple(int(round(v)) for v in spacing / target * np.array(cropped))  # nnU-Net compute_new_shape
    patch = tuple(int(p) for p in config["patch_size"])
    padded = tuple(max(s, p) for s, p in zip(preprocessed, patch))
    pad_below = tuple((n - s) // 2 for n, s in zip(padded, preprocessed))
    starts = [nnunet_tile_starts(n, p) for n, p in zip(padded, patch)]
    tiles = tuple(((z, z + patch[0]), (y, y + patch[1]), (x, x + patch[2]))
                  for z in starts[0] for y in starts[1] for x in starts[2])
    return NetworkGeometry(forward, bbox, cropped, preprocessed, pad_below, patch, tiles)


def network_box_to_input_ranges(box, geometry: NetworkGeometry) -> list[list[int]]:
    """The input voxels (numpy z, y, x ranges ``[start, stop)``) a padded network-space box covers: drop the
    padding, clip to the volume, scale to the cropped grid (outward: floor the start, ceil the stop, in exact
    integer arithmetic), shift by the crop bbox, undo the transpose."""
    transposed = []
    for (a, b), below, n_pre, n_crop, (offset, _) in zip(box, geometry.pad_below, geometry.shape_preprocessed,
                                                         geometry.shape_cropped, geometry.bbox):
        lo, hi = min(max(a - below, 0), n_pre), min(max(b - below, 0), n_pre)
        transposed.append([offset + (lo * n_crop) // n_pre, offset + -((-hi * n_crop) // n_pre)])
    backward = [int(j) for j in np.argsort(geometry.transpose_forward)]
    return [transposed[j] for j in backward]
