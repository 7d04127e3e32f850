"""nnU-Net's own ``nnUNetPredictor`` on a model folder: the reference that segsentry's runtime must match.

Uses ``manual_initialization`` (nnU-Net's trainer lookup imports timm/torchvision, which cannot be imported
beside the pinned torch here) and nnU-Net's own network builder, plans manager and SimpleITK reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def make_predictor(model_dir: Path, *, configuration: str = "3d_fullres", fold: int | str = 0):
    """An initialised ``nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=cpu)``."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((model_dir / "plans.json").read_text())
    dataset = json.loads((model_dir / "dataset.json").read_text())
    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, len(dataset["channel_names"]),
                                     len(dataset["labels"]), allow_init=False, deep_supervision=False)
    checkpoint = torch.load(model_dir / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(network, manager, config, [checkpoint["network_weights"]], dataset,
                                    checkpoint.get("trainer_name", "nnUNetTrainer"), None)
    return predictor


def predict_files(predictor, files: list[Path]) -> np.ndarray:
    """Read with nnU-Net's SimpleITKIO and predict; returns the mask in the input's numpy order (z, y, x)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image, properties = SimpleITKIO().read_images([str(f) for f in files])
    return predictor.predict_single_npy_array(image, properties)


def nnunet_predict(model_dir: Path, files: list[Path]) -> np.ndarray:
    """One-shot oracle mask for ``files`` with the fold-0 final checkpoint."""
    return predict_files(make_predictor(model_dir), files)
