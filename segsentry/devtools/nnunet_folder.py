"""Random-weight nnU-Net v2 model folders, for tests and benchmarks (needs the ``export`` extra: torch).

The folders look exactly like nnU-Net's own (plans.json in the 2.8 format, dataset.json,
fold_0/checkpoint_final.pth with numpy scalars in its log), so both segsentry and ``nnUNetPredictor`` load
them. They segment nothing meaningful: they exist to compare two inference pipelines on the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

@dataclass(frozen=True)
class ModelSpec:
    name: str
    channels: dict[str, str]
    labels: dict[str, int | list[int]]  # a list: a region (BraTS-style), then regions_class_order is needed
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]  # configuration spacing, transposed order
    normalization: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    transpose_forward: tuple[int, int, int] = (0, 1, 2)
    features: tuple[int, ...] = (4, 8, 16, 32)
    strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    regions_class_order: tuple[int, ...] | None = None

    @property
    def num_heads(self) -> int:
        """Network outputs: one per foreground region of a region-based spec, else one per label."""
        return len(self.labels) - 1 if self.regions_class_order is not None else len(self.labels)


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

# Region-based (BraTS-style): two sigmoid outputs, "whole" = labels {1, 2}, "core" = {2}; written 1 then 2.
REGION_SPEC = ModelSpec(
    name="Dataset903_TinyRegions",
    channels={"0": "T1", "1": "FLAIR"},
    labels={"background": 0, "whole": [1, 2], "core": [2]},
    patch_size=(16, 24, 24),
    spacing=(1.0, 1.0, 1.0),
    normalization=("ZScoreNormalization", "ZScoreNormalization"),
    use_mask_for_norm=(True, False),
    regions_class_order=(1, 2),
)

# Benchmark presets. SMALL: the reduced plan used for the demo model (features 8..128, patch 32x64x64).
# FULLRES: a 3d_fullres-sized CT network (6 stages 32..320, patch 64x128x128, ~31 M parameters, D = 2560).
SMALL_SPEC = ModelSpec(
    name="Dataset911_BenchSmall",
    channels={"0": "CT"},
    labels={"background": 0, "lesion": 1},
    patch_size=(32, 64, 64),
    spacing=(2.5, 0.8, 0.8),
    normalization=("CTNormalization",),
    use_mask_for_norm=(False,),
    features=(8, 16, 32, 64, 128),
    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
)

FULLRES_SPEC = ModelSpec(
    name="Dataset912_BenchFullres",
    channels={"0": "CT"},
    labels={"background": 0, "lesion": 1},
    patch_size=(64, 128, 128),
    spacing=(2.5, 0.8, 0.8),
    normalization=("CTNormalization",),
    use_mask_for_norm=(False,),
    features=(32, 64, 128, 256, 320, 320),
    strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
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


def make_model_folder(root: Path, spec: ModelSpec, *, seed: int = 0, folds: Sequence[int] = (0,),
                      mirror_axes: tuple[int, ...] | None = (0, 1, 2)) -> Path:
    """Write ``root/<Dataset>/nnUNetTrainer__nnUNetPlans__3d_fullres`` with random (He-initialised) weights.

    Each of ``folds`` gets ``fold_N/checkpoint_final.pth`` with its own weights (seed ``seed + 1000 * N``);
    ``mirror_axes`` is what the checkpoints record as ``inference_allowed_mirroring_axes`` (``None``: no key).
    """
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    plans = _plans(spec)
    dataset = {"channel_names": spec.channels, "labels": spec.labels, "numTraining": 4, "file_ending": ".nii.gz"}
    if spec.regions_class_order is not None:
        dataset["regions_class_order"] = list(spec.regions_class_order)
    folder = root / spec.name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    n = len(spec.features)
    for fold in folds:
        torch.manual_seed(seed + 1000 * int(fold))
        network = PlainConvUNet(
            len(spec.channels), n, list(spec.features), torch.nn.Conv3d, 3, [list(s) for s in spec.strides], [2] * n,
            spec.num_heads, [2] * (n - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
            deep_supervision=True,
        )
        network.apply(InitWeights_He(1e-2))
        with torch.no_grad():  # random affine norm parameters so the logits are not dominated by one class
            for module in network.modules():
                if isinstance(module, torch.nn.InstanceNorm3d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.3, 0.3)
        state = {
            "network_weights": network.state_dict(),
            "optimizer_state": None,
            "grad_scaler_state": None,
            "logging": {"ema_fg_dice": [np.float32(0.5)], "mean_fg_dice": [np.float32(0.4)]},
            "_best_ema": np.float32(0.5),
            "current_epoch": 1,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": int(fold), "dataset_json": dataset,
                          "device": "cpu"},
            "trainer_name": "nnUNetTrainer",
        }
        if mirror_axes is not None:
            state["inference_allowed_mirroring_axes"] = tuple(mirror_axes)
        (folder / f"fold_{fold}").mkdir()
        torch.save(state, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def rewrite_as_numpy1(checkpoint: Path) -> None:
    """Rewrite a ``torch.save`` checkpoint in place so its pickle names numpy's classes as numpy 1.x did.

    numpy 2 pickles ``np.float32`` scalars as ``numpy._core.multiarray.scalar``; checkpoints written under
    numpy 1 (most published nnU-Net models) carry ``numpy.core.multiarray.scalar``. The pickle's GLOBAL
    opcodes are text (``c<module>\\n<name>\\n``, protocol 2 as ``torch.save`` writes), so the module name is
    replaced byte for byte; every other entry of the zip archive is copied unchanged.
    """
    import zipfile

    with zipfile.ZipFile(checkpoint) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    pickles = [info.filename for info, _ in entries if info.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError(f"{checkpoint} is not a torch.save zip archive with one data.pkl")
    old_name, new_name = b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            if info.filename == pickles[0]:
                data = data.replace(old_name, new_name)
                if b"numpy._core" in data:
                    raise ValueError("the pickle still names numpy._core after the rewrite")
            archive.writestr(info, data)
    tmp.replace(checkpoint)
