"""The reference PyTorch backend (the ``export`` extra): the real nnU-Net network, not the ONNX graph.

The network is rebuilt from the nnU-Net v2 model folder recorded in the bundle manifest's ``source``
(``model_dir``, ``fold``, ``checkpoint``, ``configuration``) and wrapped in the same :class:`FeatureTap`
(feature ``layer`` and pooling plan from the manifest) that ``ood-export`` traced. A calibrated bundle's
Mahalanobis head is applied in torch from the bundle's own ``ood_head/*`` initializers, with the formula of
:mod:`segsentry.calib.head` in float32::

    delta = features - mean
    distance = sum((delta @ components_t) ** 2, 1)                      # fits without a complement term
    distance = sum(((delta @ V) * span_scale) ** 2, 1) + complement_scale * sum((delta - (delta @ V) @ V^T) ** 2, 1)

A fold ensemble bundle is rebuilt fold by fold (``Manifest.folds``) into the exporter's ``EnsembleTap``;
each fold's head comes from ``ood_head/f<i>/*`` and the distance is the mean of the folds' distances, as in
the ONNX graph.

So this backend only works on a machine that holds the model folder. It runs eager, under
``torch.inference_mode()``, on the CPU (or a CUDA device with ``cuda=True``), with optional fp16 autocast on
CUDA only.

It lives here, beside the exporter whose model-folder loader and :class:`FeatureTap` it reuses, and is
registered by name (``torch``) in the runtime's backend table, which imports this module only when the torch
backend is created: the runtime itself never imports ``segsentry.export``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segsentry.contract import HEAD_SCOPE, L2_EPS, FeatureNorm, HeadInitializer, Output
from segsentry.errors import BackendError, ModelFolderError, first_line
from segsentry.manifest import Manifest
from segsentry.runtime.backends.base import BackendBase, import_optional
from segsentry.runtime.backends.options import BackendOptions

log = logging.getLogger(__name__)

PURPOSE = "The torch backend"


def bundle_initializers(model: bytes) -> dict[str, np.ndarray]:
    """Every initializer of the bundle graph as a numpy array, keyed by name (needs the ``onnx`` package)."""
    onnx = import_optional("onnx", package="onnx", extra="export", purpose=PURPOSE)
    numpy_helper = import_optional("onnx.numpy_helper", package="onnx", extra="export", purpose=PURPOSE)
    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # onnx raises DecodeError/ValueError
        raise BackendError(f"torch backend: not a valid ONNX model ({exc})") from exc
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def read_head(initializers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Mahalanobis-head initializers, keyed without the ``ood_head/`` prefix, as float32.

    ``mean`` ``(D,)`` and ``components_t`` ``(D, k)``, or, for shrinkage fits with ``N <= D``, ``basis``
    ``(D, r)``, ``span_scale`` ``(r,)`` (older bundles: ``components_t``) and ``complement_scale`` (one value).
    Empty for an uncalibrated bundle.
    """
    return {name[len(HEAD_SCOPE):]: np.array(value, dtype=np.float32)  # a writable copy, for torch.from_numpy
            for name, value in initializers.items() if name.startswith(HEAD_SCOPE)}


def _source_folder(manifest: Manifest) -> Path:
    source = manifest.source
    kind = source.get("kind")
    if kind != "nnunetv2":
        raise BackendError(
            f"the torch backend rebuilds the network from an nnU-Net v2 model folder, but this bundle's source is "
            f"kind '{kind}'; use --backend onnxruntime"
        )
    model_dir = Path(str(source.get("model_dir", "")))
    if not source.get("model_dir") or not model_dir.is_dir():
        raise BackendError(
            f"the torch backend needs the nnU-Net model folder '{model_dir}' recorded in the bundle, which does not "
            "exist on this machine; use --backend onnxruntime"
        )
    return model_dir


class TorchBackend(BackendBase):
    """Eager PyTorch inference of the bundle's source network plus its calibrated head.

    ``run(batch)``: ``batch`` is ``(n, channels, *patch_size)`` float32; returns float32 arrays keyed by the
    bundle's ONNX output names: ``logits`` ``(n, classes, *patch_size)``, ``distance`` ``(n,)`` when the
    bundle is calibrated, ``features`` ``(n, D)`` when the manifest lists that output.

    ``options.threads`` calls ``torch.set_num_threads`` (process-wide). ``cuda=True`` runs on CUDA device
    ``options.device`` (default: the CPU, and ``device`` is ignored). ``options.precision="fp16"`` turns on
    float16 autocast for the network, on CUDA only; the head always runs in float32. ``low_memory``,
    ``cache_dir`` and ``max_batch`` are ignored.
    """

    name = "torch"

    def __init__(
        self,
        model: bytes,
        *,
        manifest: Manifest | None,
        channels: int,
        patch_size: Sequence[int],
        input_name: str = "image",
        options: BackendOptions = BackendOptions(),
        cuda: bool = False,
    ) -> None:
        super().__init__(channels=channels, patch_size=patch_size, options=options)
        self.precision = options.resolve_precision(self.name, ("fp32", "fp16"))
        threads, fp16 = options.threads, self.precision == "fp16"
        device = f"cuda:{options.device}" if cuda else "cpu"
        if manifest is None:
            raise BackendError("the torch backend needs the bundle manifest (create_backend(..., manifest=...))")
        model_dir = _source_folder(manifest)
        torch = import_optional("torch", package="torch", extra="export", purpose=PURPOSE)
        import_optional("dynamic_network_architectures", package="dynamic-network-architectures", extra="export",
                        purpose=PURPOSE)
        from segsentry.export.nnunet import load_model_folder
        from segsentry.export.wrapper import EnsembleTap, FeatureTap

        self._torch = torch
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise BackendError(f"torch backend: invalid device '{device}'") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"torch backend: device '{device}' requested but CUDA is not available")
        if fp16 and self.device.type != "cuda":
            raise BackendError(f"torch backend: fp16 autocast is supported on CUDA only, not on device '{device}'")
        self.fp16 = fp16
        if threads:
            torch.set_num_threads(int(threads))

        if manifest.calibration is not None and manifest.calibration.taps:
            raise BackendError(f"the torch backend scores one feature tap; this bundle fuses "
                               f"{1 + len(manifest.calibration.taps)} (segsentry fuse-taps): run it with "
                               "--backend onnxruntime or openvino")
        source = manifest.source
        folds = [f.fold for f in manifest.folds] if manifest.n_folds > 1 else [source.get("fold", 0)]
        initializers = bundle_initializers(model)
        taps = []
        for i, fold in enumerate(folds):
            try:
                nnunet = load_model_folder(model_dir, fold=fold,
                                           checkpoint=source.get("checkpoint", "checkpoint_final.pth"),
                                           configuration=source.get("configuration"))
            except ModelFolderError as exc:
                raise BackendError(f"the torch backend cannot rebuild the network from {model_dir}: {exc}") from exc
            if len(nnunet.channels) != channels or nnunet.patch_size != list(self.patch_size) \
                    or len(nnunet.labels) != manifest.num_classes:
                raise BackendError(
                    f"the model folder {model_dir} no longer matches the bundle (channels {len(nnunet.channels)}, "
                    f"patch {nnunet.patch_size}, classes {len(nnunet.labels)} vs {channels}, {list(self.patch_size)}, "
                    f"{manifest.num_classes}); re-export it"
                )
            # the exporter names a network's weights network.<path>, inside an ensemble taps.<i>.network.<path>
            self._check_weights(nnunet.network, initializers,
                                prefix="network." if len(folds) == 1 else f"taps.{i}.network.")
            taps.append(FeatureTap(nnunet.network, layer=manifest.features.layer, pooling=manifest.features.pooling))
        self.tap = (taps[0] if len(taps) == 1 else EnsembleTap(taps)).eval().to(self.device)

        self.output_names = dict(manifest.outputs)  # role -> ONNX output name
        has_distance = Output.DISTANCE.value in self.output_names
        head = read_head(initializers) if has_distance else {}
        del initializers
        # one head per fold: an ensemble's fold i has its own under ood_head/f<i>/ (segsentry.calib.head)
        scopes = [""] if len(folds) == 1 else [f"f{i}/" for i in range(len(folds))]
        self._heads: list[dict[str, Any]] = []
        self._complement_scales: list[float] = []
        for scope in scopes if has_distance else []:
            names = {k[len(scope):]: v for k, v in head.items() if k.startswith(scope) and "/" not in k[len(scope):]}
            whitening = {HeadInitializer.COMPONENTS_T.value} <= names.keys() or \
                {HeadInitializer.BASIS.value, HeadInitializer.SPAN_SCALE.value} <= names.keys()
            if HeadInitializer.MEAN.value not in names or not whitening:
                raise BackendError(f"the bundle lists a 'distance' output but has no ood_head/{scope}mean with "
                                   f"ood_head/{scope}components_t or ood_head/{scope}basis + span_scale")
            self._heads.append({k: torch.from_numpy(v).to(self.device) for k, v in names.items()
                                if k in (HeadInitializer.MEAN, HeadInitializer.COMPONENTS_T, HeadInitializer.BASIS,
                                         HeadInitializer.SPAN_SCALE)})
            scale = names.get(HeadInitializer.COMPLEMENT_SCALE.value)
            self._complement_scales.append(float(scale.reshape(-1)[0]) if scale is not None and scale.size else 0.0)
        calibration = manifest.calibration
        self._l2 = calibration is not None and FeatureNorm(calibration.feature_norm) is FeatureNorm.L2
        self.input_name = input_name
        log.debug("torch backend: %s folds %s on %s (fp16=%s, %d head(s))", model_dir, folds, self.device, fp16,
                  len(self._heads))

    @staticmethod
    def _check_weights(network: Any, initializers: dict[str, np.ndarray], *, prefix: str = "network.") -> None:
        """Refuse a checkpoint that changed since export: parameters found by name in the bundle must be equal.

        The exporter names initializers ``<prefix><parameter path>``, but may dedupe or fold some, so only the
        names present are compared (a bundle without any is logged and accepted).
        """
        compared = 0
        for name, tensor in network.state_dict().items():
            init = initializers.get(f"{prefix}{name}")
            if init is None:
                continue
            compared += 1
            if not np.array_equal(init, tensor.detach().cpu().numpy()):
                raise BackendError(
                    f"the checkpoint's '{name}' differs from the bundle's weights; the model folder changed since "
                    "export (re-export it, or use --backend onnxruntime)"
                )
        if compared == 0:
            log.warning("torch backend: no bundle initializer matched a network parameter; weights not verified")
        else:
            log.debug("torch backend: %d network parameters equal the bundle's initializers", compared)

    def _head_distance(self, features: Any) -> Any:
        """Squared Mahalanobis distance ``(n,)`` float32 of ``features``, as the folded ONNX head: ``(n, D)`` for
        one network, ``(n, folds, D)`` for an ensemble (the mean of the folds' distances, each by its own head)."""
        members = [features] if features.dim() == 2 else [features[:, i] for i in range(features.shape[1])]
        distances = [self._member_distance(z.float(), head, scale)
                     for z, head, scale in zip(members, self._heads, self._complement_scales, strict=True)]
        return distances[0] if len(distances) == 1 else self._torch.stack(distances, 0).mean(0)

    def _member_distance(self, z: Any, head: dict[str, Any], complement_scale: float) -> Any:
        if self._l2:  # Mahalanobis++: the head's ReduceL2 -> Max(L2_EPS) -> Div
            z = z / z.norm(dim=1, keepdim=True).clamp_min(L2_EPS)
        delta = z - head[HeadInitializer.MEAN.value]
        basis = head.get(HeadInitializer.BASIS.value)
        coef = None if basis is None else delta @ basis
        if HeadInitializer.COMPONENTS_T.value in head:  # no complement term, or an older bundle's head
            y = delta @ head[HeadInitializer.COMPONENTS_T.value]
        else:
            y = coef * head[HeadInitializer.SPAN_SCALE.value]
        distance = (y * y).sum(1)
        if coef is not None and complement_scale != 0.0:
            resid = delta - coef @ basis.T
            distance = distance + complement_scale * (resid * resid).sum(1)
        return distance

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        if self.tap is None:
            raise BackendError("the torch backend was closed")
        try:
            with torch.inference_mode():
                x = torch.from_numpy(batch if batch.flags.writeable else batch.copy()).to(self.device)
                with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.fp16):
                    logits, features = self.tap(x)
                roles: dict[str, Any] = {Output.LOGITS.value: logits.float(), Output.FEATURES.value: features.float()}
                if Output.DISTANCE.value in self.output_names:
                    roles[Output.DISTANCE.value] = self._head_distance(features)
                return {name: roles[role].cpu().numpy().astype(np.float32, copy=False)
                        for role, name in self.output_names.items() if role in roles}
        except BackendError:
            raise
        except Exception as exc:  # torch raises RuntimeError/ExportError with long messages
            raise BackendError(f"torch inference failed: {first_line(exc)}") from exc

    def close(self) -> None:
        self.tap = None
        self._heads = []
