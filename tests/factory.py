"""Tiny random-weight nnU-Net v2 model folders and test volumes with non-identity geometry.

The folders look exactly like nnU-Net's own (plans.json in the 2.8 format, dataset.json,
fold_0/checkpoint_final.pth with numpy scalars in its log), so both segsentry and nnUNetPredictor load them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROTATED_DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90° about z


@dataclass(frozen=True)
class ModelSpec:
    name: str
    channels: dict[str, str]
    labels: dict[str, int]
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]  # configuration spacing, transposed order
    normalization: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    transpose_forward: tuple[int, int, int] = (0, 1, 2)
    features: tuple[int, ...] = (4, 8, 16, 32)
    strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))


CT_SPEC = ModelSpec(
    name="Dataset901_TinyCT",
    channels={"0": "CT"},
    labels={"background": 0, "lesion": 1, "vessel": 2},
    patch_size=(16, 32, 32),
    spacing=(2.5, 1.1, 1.0),
    normalization=("CTNormalization",),
    use_mask_for_norm=(False,),
    transpose_forward=(0, 2, 1),
)

MR_SPEC = ModelSpec(
    name="Dataset902_TinyMR",
    channels={"0": "T1", "1": "FLAIR"},
    labels={"background": 0, "tumour": 1},
    patch_size=(16, 24, 24),
    spacing=(1.0, 1.0, 1.0),
    normalization=("ZScoreNormalization", "ZScoreNormalization"),
    use_mask_for_norm=(True, False),
    strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
)

CT_PROPERTIES = {"0": {"max": 1500.0, "mean": -350.0, "median": -300.0, "min": -1024.0,
                       "percentile_00_5": -1000.0, "percentile_99_5": 900.0, "std": 420.0}}


def _plans(spec: ModelSpec) -> dict:
    n = len(spec.features)
    transpose_backward = [int(i) for i in np.argsort(spec.transpose_forward)]
    return {
        "dataset_name": spec.name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spec.spacing),
        "original_median_shape_after_transp": [32, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(spec.transpose_forward),
        "transpose_backward": transpose_backward,
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(spec.patch_size),
                "median_image_size_in_voxels": [32, 64, 64],
                "spacing": list(spec.spacing),
                "normalization_schemes": list(spec.normalization),
                "use_mask_for_norm": list(spec.use_mask_for_norm),
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": n,
                        "features_per_stage": list(spec.features),
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n,
                        "strides": [list(s) for s in spec.strides],
                        "n_conv_per_stage": [2] * n,
                        "n_conv_per_stage_decoder": [2] * (n - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": CT_PROPERTIES if spec.normalization[0] == "CTNormalization"
        else {c: {"max": 3.0, "mean": 1.0, "median": 1.0, "min": 0.0, "percentile_00_5": 0.0,
                  "percentile_99_5": 2.5, "std": 0.5} for c in spec.channels},
    }


def make_model_folder(root: Path, spec: ModelSpec, *, seed: int = 0) -> Path:
    """Write ``root/<Dataset>/nnUNetTrainer__nnUNetPlans__3d_fullres`` with random (He-initialised) weights."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    plans = _plans(spec)
    dataset = {"channel_names": spec.channels, "labels": spec.labels, "numTraining": 4, "file_ending": ".nii.gz"}
    folder = root / spec.name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    torch.manual_seed(seed)
    n = len(spec.features)
    network = PlainConvUNet(
        len(spec.channels), n, list(spec.features), torch.nn.Conv3d, 3, [list(s) for s in spec.strides], [2] * n,
        len(spec.labels), [2] * (n - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )
    network.apply(InitWeights_He(1e-2))
    with torch.no_grad():  # random affine norm parameters so the logits are not dominated by one class
        for module in network.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    torch.save({
        "network_weights": network.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {"ema_fg_dice": [np.float32(0.5)], "mean_fg_dice": [np.float32(0.4)]},
        "_best_ema": np.float32(0.5),
        "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                      "device": "cpu"},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }, folder / "fold_0" / "checkpoint_final.pth")
    return folder


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


def nnunet_predict(model_dir: Path, files: list[Path]) -> np.ndarray:
    """nnU-Net's own nnUNetPredictor (no mirroring, CPU, step 0.5) on ``files``: the oracle mask (z, y, x)."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((model_dir / "plans.json").read_text())
    dataset = json.loads((model_dir / "dataset.json").read_text())
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, len(dataset["channel_names"]),
                                     len(dataset["labels"]), allow_init=False, deep_supervision=False)
    checkpoint = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(network, manager, config, [checkpoint["network_weights"]], dataset,
                                    "nnUNetTrainer", None)
    image, properties = SimpleITKIO().read_images([str(f) for f in files])
    return predictor.predict_single_npy_array(image, properties)
