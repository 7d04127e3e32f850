"""Rebuild a trained nnU-Net v2 network from its model folder, without nnU-Net's trainer lookup.

A model folder is ``nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG/`` holding ``plans.json``,
``dataset.json`` and ``fold_N/checkpoint_*.pth``. The network is built with
``dynamic_network_architectures`` from the plans' ``architecture`` entry; the checkpoint is read with
``torch.load(weights_only=True)`` and a small allowlist of numpy types (nnU-Net only stores numpy scalars
in its training log), so no arbitrary code is unpickled.
"""

from __future__ import annotations

import copy
import json
import pydoc
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segsentry.errors import ModelFolderError, first_line
from segsentry.manifest import Preprocessing

SUPPORTED_RESAMPLING = "resample_data_or_seg_to_shape"
DEFAULT_LAYER = "encoder.stages.-1"


@dataclass
class NnunetModel:
    """A rebuilt nnU-Net network plus everything the manifest needs from plans.json and dataset.json."""

    network: nn.Module
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration_name: str
    configuration: dict[str, Any]
    checkpoint_path: Path
    trainer_name: str
    fold: str
    mirror_axes: list[int]  # the checkpoint's inference_allowed_mirroring_axes ([] when it records none)

    @property
    def patch_size(self) -> list[int]:
        return [int(p) for p in self.configuration["patch_size"]]

    @property
    def channels(self) -> dict[str, str]:
        names = self.dataset.get("channel_names", self.dataset.get("modality"))
        return {str(k): str(v) for k, v in names.items()}

    @property
    def regions(self) -> list[list[int]] | None:
        """Region-based training (BraTS-style): the labels each output channel covers, else None."""
        return dataset_regions(self.dataset)[0]

    @property
    def regions_class_order(self) -> list[int] | None:
        return dataset_regions(self.dataset)[1]

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> the value written in the mask (a region model writes ``regions_class_order``)."""
        regions, order = dataset_regions(self.dataset)
        if regions is None:
            return {str(k): int(v) for k, v in self.dataset["labels"].items()}
        names = [k for k, v in self.dataset["labels"].items() if k != "ignore" and not _is_background(v)]
        background = [k for k, v in self.dataset["labels"].items() if _is_background(v)]
        return {**{str(k): 0 for k in background[:1]}, **{str(k): int(c) for k, c in zip(names, order)}}

    @property
    def num_heads(self) -> int:
        """Output channels of the network: one per region, else one per label (nnU-Net's segmentation heads)."""
        regions = self.regions
        return len(self.dataset["labels"]) if regions is None else len(regions)

    def preprocessing(self) -> Preprocessing:
        config = self.configuration
        schemes = list(config["normalization_schemes"])
        properties = self.plans.get("foreground_intensity_properties_per_channel", {})
        return Preprocessing(
            transpose_forward=[int(i) for i in self.plans["transpose_forward"]],
            transpose_backward=[int(i) for i in self.plans["transpose_backward"]],
            spacing=[float(s) for s in config["spacing"]],
            normalization_schemes=schemes,
            use_mask_for_norm=[bool(u) for u in config["use_mask_for_norm"]],
            intensity_properties={
                str(c): {k: float(v) for k, v in properties.get(str(c), {}).items()} for c in range(len(schemes))
            },
            crop_to_nonzero=True,
            resampling_data=_resampling_kwargs(config, "data"),
            resampling_probabilities=_resampling_kwargs(config, "probabilities"),
        )


def _is_background(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and set(int(v) for v in value) == {0}) or value == 0


def dataset_regions(dataset: dict[str, Any]) -> tuple[list[list[int]] | None, list[int] | None]:
    """``(regions, regions_class_order)`` as nnU-Net's LabelManager reads them, or ``(None, None)``.

    A model is region-based when a label maps to a list of more than one value; each non-background label
    (``ignore`` excluded) is then one sigmoid output covering those values, and ``regions_class_order`` gives
    the value written where that output's probability exceeds 0.5, in order (later regions overwrite).
    """
    labels = dataset.get("labels", {})
    if not any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values()):
        return None, None
    regions = [[int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
               for k, v in labels.items() if k != "ignore" and not _is_background(v)]
    order = dataset.get("regions_class_order")
    if order is None or len(order) != len(regions):
        raise ModelFolderError(f"region-based labels in dataset.json need 'regions_class_order' with one value per "
                               f"region ({len(regions)}); found {order!r}")
    if "ignore" in labels:
        raise ModelFolderError("region-based models with an 'ignore' label are not supported")
    return regions, [int(c) for c in order]


def _resampling_kwargs(config: dict[str, Any], kind: str) -> dict[str, Any]:
    name = config.get(f"resampling_fn_{kind}", SUPPORTED_RESAMPLING)
    if name != SUPPORTED_RESAMPLING:
        raise ModelFolderError(
            f"plans use resampling function '{name}' for {kind}; segsentry reproduces only "
            f"'{SUPPORTED_RESAMPLING}' (nnU-Net's default)"
        )
    kwargs = dict(config.get(f"resampling_fn_{kind}_kwargs", {}))
    if kwargs.get("is_seg"):
        raise ModelFolderError(f"plans resample {kind} as a segmentation (is_seg=True); not supported")
    return {
        "order": int(kwargs.get("order", 3 if kind == "data" else 1)),
        "order_z": int(kwargs.get("order_z", 0)),
        "force_separate_z": kwargs.get("force_separate_z"),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelFolderError(f"{path.name} not found in {path.parent}; is this an nnU-Net v2 model folder?") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {path}: {exc}") from exc


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """Resolve ``inherits_from`` chains the way nnU-Net's PlansManager does."""
    configurations = plans.get("configurations", {})
    seen: list[str] = []
    chain: list[dict[str, Any]] = []
    while True:
        if name not in configurations:
            raise ModelFolderError(
                f"configuration '{name}' not in plans.json (available: {', '.join(configurations)})"
            )
        if name in seen:
            raise ModelFolderError(f"circular 'inherits_from' in plans.json: {' -> '.join([*seen, name])}")
        seen.append(name)
        config = configurations[name]
        chain.append(config)
        parent = config.get("inherits_from")
        if parent is None:
            break
        name = parent
    resolved: dict[str, Any] = {}
    for config in reversed(chain):
        resolved.update(copy.deepcopy(config))
    return resolved


# numpy classes an nnU-Net checkpoint may pickle (numpy scalars in its training log), allowlisted for
# torch.load(weights_only=True): nothing is executed, only these constructors are looked up by name.
_NUMPY_DTYPE_CLASSES = ("Float16DType", "Float32DType", "Float64DType", "Int32DType", "Int64DType", "BoolDType")


def _numpy_safe_globals() -> list[Any]:
    """``np.dtype``, the scalar constructor under both its numpy 2 and numpy 1 pickle names
    (``numpy._core.multiarray.scalar`` / ``numpy.core.multiarray.scalar``: checkpoints written before numpy 2,
    most published nnU-Net models), and the per-dtype classes a dtype's pickled state is applied to."""
    core = getattr(np, "_core", None) or getattr(np, "core")
    scalar = core.multiarray.scalar
    allowed: list[Any] = [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
                          (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in _NUMPY_DTYPE_CLASSES if hasattr(dtypes, n)]
    return allowed


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelFolderError(f"checkpoint {path} not found") from exc
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError with long messages
        raise ModelFolderError(
            f"cannot load checkpoint {path} with weights_only=True ({first_line(exc)}); segsentry only loads checkpoints "
            "that contain tensors, numbers and numpy scalars"
        ) from exc


def build_network(plans: dict[str, Any], configuration: dict[str, Any], *, in_channels: int, num_classes: int) -> nn.Module:
    """Instantiate the architecture named in ``configuration['architecture']`` (deep supervision off)."""
    arch = configuration.get("architecture")
    if arch is None:
        raise ModelFolderError(
            "plans.json uses the pre-2.3 format without an 'architecture' entry; re-run nnUNetv2_plan_experiment"
        )
    class_name = arch["network_class_name"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            located = pydoc.locate(kwargs[key])
            if located is None:
                raise ModelFolderError(f"plans.json names '{kwargs[key]}' for '{key}', which cannot be imported")
            kwargs[key] = located
    if "timm" in class_name or class_name.rsplit(".", 1)[-1].lower().startswith(("primus", "eva")):
        raise ModelFolderError(f"architecture {class_name} needs timm, which segsentry does not support")
    network_class = pydoc.locate(class_name)
    if network_class is None:
        raise ModelFolderError(f"network class {class_name} cannot be imported; install dynamic-network-architectures")
    kwargs["deep_supervision"] = False
    try:
        network = network_class(input_channels=in_channels, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ModelFolderError(f"cannot build {class_name} from plans.json: {exc}") from exc
    return network


def available_folds(model_dir: str | Path, *, checkpoint: str = "checkpoint_final.pth") -> list[str]:
    """Every ``fold_N`` of ``model_dir`` holding ``checkpoint``, by number (``fold_all`` excluded), as
    ``nnUNetPredictor.auto_detect_available_folds`` finds them."""
    model_dir = Path(model_dir)
    found = [int(m.group(1)) for p in (model_dir.iterdir() if model_dir.is_dir() else [])
             if (m := re.fullmatch(r"fold_(\d+)", p.name)) and (p / checkpoint).is_file()]
    return [str(f) for f in sorted(found)]


def load_folds(
    model_dir: str | Path,
    folds: Sequence[int | str] | None = None,
    *,
    checkpoint: str = "checkpoint_final.pth",
    configuration: str | None = None,
) -> list[NnunetModel]:
    """Load the networks of ``folds`` (default: :func:`available_folds`), in that order, for one ensemble.

    Every fold must share the configuration and the network shape; mirroring axes, like nnU-Net's, come from
    the first fold (the others are checked equal).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"model folder {model_dir} does not exist or is not a directory")
    _read_json(model_dir / "plans.json")  # says what is wrong with a folder that is no model folder at all
    names = [str(f) for f in folds] if folds is not None else available_folds(model_dir, checkpoint=checkpoint)
    if not names:
        raise ModelFolderError(f"no fold_N/{checkpoint} in {model_dir}; give the folds to export with --folds")
    if len(set(names)) != len(names):
        raise ModelFolderError(f"folds {names} name a fold twice")
    models = [load_model_folder(model_dir, fold=f, checkpoint=checkpoint, configuration=configuration) for f in names]
    first = models[0]
    for name, model in zip(names[1:], models[1:]):
        if model.configuration_name != first.configuration_name:
            raise ModelFolderError(f"fold {name} was trained with configuration '{model.configuration_name}', fold "
                                   f"{names[0]} with '{first.configuration_name}'; an ensemble needs one configuration")
        if model.mirror_axes != first.mirror_axes:
            raise ModelFolderError(f"fold {name} allows mirroring axes {model.mirror_axes}, fold {names[0]} "
                                   f"{first.mirror_axes}; nnU-Net would use the first fold's for all")
    return models


def load_model_folder(
    model_dir: str | Path,
    *,
    fold: int | str = 0,
    checkpoint: str = "checkpoint_final.pth",
    configuration: str | None = None,
) -> NnunetModel:
    """Load plans, dataset and one fold's checkpoint; return the rebuilt network in eval mode."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"model folder {model_dir} does not exist or is not a directory")
    plans = _read_json(model_dir / "plans.json")
    dataset = _read_json(model_dir / "dataset.json")
    checkpoint_path = model_dir / f"fold_{fold}" / checkpoint
    state = _load_checkpoint(checkpoint_path)
    if "network_weights" not in state:
        raise ModelFolderError(f"{checkpoint_path} has no 'network_weights'; is it an nnU-Net v2 checkpoint?")
    init_args = state.get("init_args", {})
    config_name = configuration or init_args.get("configuration")
    if config_name is None:
        config_name = model_dir.name.split("__")[-1]
    config = resolve_configuration(plans, config_name)
    if len(config.get("patch_size", [])) != 3:
        raise ModelFolderError(f"configuration '{config_name}' is not 3D (patch {config.get('patch_size')}); "
                               "segsentry supports 3D configurations only")
    if config.get("previous_stage") is not None:
        raise ModelFolderError(f"configuration '{config_name}' is a cascade stage; cascades are not supported")
    labels = dataset.get("labels", {})
    regions, _ = dataset_regions(dataset)
    channel_names = dataset.get("channel_names", dataset.get("modality"))
    if not channel_names or not labels:
        raise ModelFolderError("dataset.json needs 'channel_names' and 'labels'")
    network = build_network(plans, config, in_channels=len(channel_names),
                            num_classes=len(labels) if regions is None else len(regions))
    weights = state["network_weights"]
    weights = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in weights.items()}
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        raise ModelFolderError(f"checkpoint weights do not fit the network in plans.json: {str(exc)[:300]}") from exc
    network.eval()
    return NnunetModel(
        network=network,
        plans=plans,
        dataset=dataset,
        configuration_name=config_name,
        configuration=config,
        checkpoint_path=checkpoint_path,
        trainer_name=str(state.get("trainer_name", "unknown")),
        fold=str(fold),
        mirror_axes=_mirror_axes(state.get("inference_allowed_mirroring_axes"), checkpoint_path),
    )


def _mirror_axes(value: Any, checkpoint_path: Path) -> list[int]:
    """The checkpoint's allowed mirroring axes as a list (nnU-Net mirrors over none when the key is absent)."""
    if value is None:
        return []
    try:
        axes = [int(a) for a in value]
    except (TypeError, ValueError) as exc:
        raise ModelFolderError(f"{checkpoint_path}: inference_allowed_mirroring_axes is {value!r}, expected a "
                               "tuple of axes") from exc
    if any(not 0 <= a < 3 for a in axes) or len(set(axes)) != len(axes):
        raise ModelFolderError(f"{checkpoint_path}: inference_allowed_mirroring_axes {axes} are not distinct axes of "
                               "a 3D patch (0, 1, 2)")
    return axes
