"""nnU-Net's own ``nnUNetPredictor`` on a model folder: the reference that segsentry's runtime must match.

Uses ``manual_initialization`` (nnU-Net's trainer lookup imports timm/torchvision, which cannot be imported
beside the pinned torch here) and nnU-Net's own network builder, plans manager and SimpleITK reader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def make_predictor(model_dir: Path, *, configuration: str = "3d_fullres", fold: int | str = 0,
                   folds: Sequence[int | str] | None = None, use_mirroring: bool = False):
    """An initialised ``nnUNetPredictor(tile_step_size=0.5, use_mirroring=..., device=cpu)``.

    ``folds`` (default: ``[fold]``) are ensembled as ``use_folds`` does; the allowed mirroring axes come from the
    first fold's checkpoint, as in ``initialize_from_trained_model_folder``.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((model_dir / "plans.json").read_text())
    dataset = json.loads((model_dir / "dataset.json").read_text())
    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    label_manager = manager.get_label_manager(dataset)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, len(dataset["channel_names"]),
                                     label_manager.num_segmentation_heads, allow_init=False, deep_supervision=False)
    checkpoints = [torch.load(model_dir / f"fold_{f}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
                   for f in ([fold] if folds is None else folds)]
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(network, manager, config, [c["network_weights"] for c in checkpoints], dataset,
                                    checkpoints[0].get("trainer_name", "nnUNetTrainer"),
                                    checkpoints[0].get("inference_allowed_mirroring_axes"))
    return predictor


def predict_files(predictor, files: list[Path]) -> np.ndarray:
    """Read with nnU-Net's SimpleITKIO and predict; returns the mask in the input's numpy order (z, y, x)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image, properties = SimpleITKIO().read_images([str(f) for f in files])
    return predictor.predict_single_npy_array(image, properties)


def nnunet_predict(model_dir: Path, files: list[Path], *, folds: Sequence[int | str] = (0,),
                   use_mirroring: bool = False) -> np.ndarray:
    """One-shot oracle mask for ``files`` with the final checkpoints of ``folds`` (default: fold 0, no mirroring)."""
    return predict_files(make_predictor(model_dir, folds=folds, use_mirroring=use_mirroring), files)
