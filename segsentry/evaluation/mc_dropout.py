"""MC dropout baseline: a graph pass that inserts test-time dropout after the encoder stages of a bundle.

The paper's MC dropout baseline (design.md §8) adds p = 0.5 dropout after the encoder stages at test time and
keeps it active: 10 stochastic passes, the uncertainty is the standard deviation of the foreground probability.
Here the variant is made from the bundle itself — no checkpoint, no torch — by :func:`add_mc_dropout`, a pure
``ModelProto -> ModelProto`` pass: every encoder stage's output tensor gets an always-active inverted dropout
(a fresh uniform draw per element, ``x / (1 - p)`` where kept, 0 elsewhere) in front of all its consumers (the
next stage and the decoder's skip connection).

Encoder stages are found through the module scopes the torch dynamo exporter records on every node
(``pkg.torch.onnx.name_scopes``, e.g. ``network.encoder.stages.2``); a bundle without them (an ONNX model not
exported by segsentry) is refused with a clear error. The random draws come from ``RandomUniformLike`` with a
per-node seed: onnxruntime draws a fresh mask on every call from a generator seeded once per session, so the
passes differ from each other and a run is reproducible. The graph plumbing (producer and consumer index, opset,
checker) is :mod:`segsentry.graph`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segsentry.evaluation.metrics import EvaluationError
from segsentry.graph import GraphIndex, check_model, require_opset

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
STAGE_SCOPE = re.compile(r"^(?:.*\.)?encoder\.stages\.(\d+)$")
MEMBER_SCOPE = re.compile(r"^taps\.\d+\.")  # one fold's network in an ensemble bundle (export.wrapper.EnsembleTap)
DROPOUT_PREFIX = "mc_dropout/"
# onnxruntime seeds a minstd engine with int(seed): seeds 0 and 1 (and fractions) give the same stream, so the
# node seeds are distinct integers far from 0.
SEED_BASE, SEED_STRIDE = 1000, 1000


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in value] if isinstance(value, (list, tuple)) else []
    return []


def encoder_stage_outputs(model: onnx.ModelProto) -> dict[int, list[str]]:
    """Stage index -> the tensors a stage hands to nodes outside it (its outputs), in graph order.

    A stage's nodes are those whose recorded module scopes include ``...encoder.stages.K``; in a fold ensemble
    bundle each fold's network (``taps.<i>.network...``) contributes its own stage K, so a stage has one output
    per fold.
    """
    graph = model.graph
    members: dict[int, set[int]] = {}
    scope_of: dict[tuple[str, int], str] = {}
    for i, node in enumerate(graph.node):
        for scope in _scopes(node):
            match = STAGE_SCOPE.match(scope)
            if match:
                member = MEMBER_SCOPE.match(scope)
                key = (member.group(0) if member else "", int(match.group(1)))
                scope_of.setdefault(key, scope)
                if scope == scope_of[key]:  # the encoder's own stages, not a second module of the same name
                    members.setdefault(key[1], set()).add(i)
    index = GraphIndex(graph)
    graph_outputs = set(index.outputs)
    outputs: dict[int, list[str]] = {}
    for stage, nodes in sorted(members.items()):
        produced = {t: i for i in nodes for t in graph.node[i].output if t}
        leaving = [t for t in produced if t in graph_outputs or set(index.consumers(t)) - nodes]
        outputs[stage] = sorted(leaving, key=lambda t: produced[t])
    return outputs


def _dropout_nodes(tensor: str, dropped: str, name: str, *, ratio: str, scale: str, zero: str,
                   seed: int) -> list[onnx.NodeProto]:
    """Inverted dropout spelled out (``where(u >= p, x / (1 - p), 0)``, ``u ~ U[0, 1)`` per element).

    Not the ONNX ``Dropout`` op: onnxruntime's graph optimiser removes ``Dropout`` nodes even with
    ``training_mode = true``; a random op is never folded away, by any engine.
    """
    u, keep, scaled = f"{name}/uniform", f"{name}/keep", f"{name}/scaled"
    return [
        helper.make_node("RandomUniformLike", [tensor], [u], name=f"{name}/RandomUniformLike",
                         dtype=onnx.TensorProto.FLOAT, seed=float(seed)),  # integral and >= 2: see add_mc_dropout
        helper.make_node("GreaterOrEqual", [u, ratio], [keep], name=f"{name}/GreaterOrEqual"),
        helper.make_node("Mul", [tensor, scale], [scaled], name=f"{name}/Mul"),
        helper.make_node("Where", [keep, scaled, zero], [dropped], name=f"{name}/Where"),
    ]


def add_mc_dropout(model: onnx.ModelProto, *, p: float = 0.5, seed: int = 0,
                   stages: Sequence[int] | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` with inverted dropout (rate ``p``, always active) after each encoder stage.

    ``stages`` limits the stages (default: all). Each dropout node gets its own random seed derived from ``seed``
    (``seed`` in [0, 1000) keeps them distinct across runs).
    Raises :class:`EvaluationError` when the graph records no encoder stages or ``p`` is not in [0, 1).
    """
    if not 0 <= seed < SEED_STRIDE:
        raise EvaluationError(f"MC dropout seed must be in [0, {SEED_STRIDE}); got {seed}")
    if not 0.0 <= p < 1.0:
        raise EvaluationError(f"MC dropout probability must be in [0, 1); got {p}")
    require_opset(model, minimum=16, purpose="MC dropout (GreaterOrEqual, Where on float32)", error=EvaluationError)
    found = encoder_stage_outputs(model)
    if not found:
        raise EvaluationError(
            "MC dropout: the bundle's graph records no encoder stages (no 'encoder.stages.K' module scopes in the "
            f"'{SCOPES_KEY}' node metadata); export the network with ood-export (torch >= 2.5 dynamo exporter)")
    chosen = sorted(found) if stages is None else list(stages)
    missing = [s for s in chosen if s not in found]
    if missing:
        raise EvaluationError(f"MC dropout: encoder stages {missing} not in the graph (it has {sorted(found)})")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = GraphIndex(graph)  # node positions stay valid: the new nodes are inserted after the rewiring
    graph_outputs = set(index.outputs)
    ratio, scale, zero = (f"{DROPOUT_PREFIX}{n}" for n in ("ratio", "scale", "zero"))
    graph.initializer.extend([numpy_helper.from_array(np.array(p, dtype=np.float32), ratio),
                              numpy_helper.from_array(np.array(1.0 / (1.0 - p), dtype=np.float32), scale),
                              numpy_helper.from_array(np.array(0.0, dtype=np.float32), zero)])
    inserts: list[tuple[int, list[onnx.NodeProto]]] = []
    outputs = [(stage, tensor) for stage in chosen for tensor in found[stage]]  # one per fold and stage
    for k, (stage, tensor) in enumerate(outputs):
        if tensor in graph_outputs:
            raise EvaluationError(f"MC dropout: stage {stage}'s output '{tensor}' is a graph output")
        dropped = f"{DROPOUT_PREFIX}stage{stage}/{tensor}"
        for i in index.consumers(tensor):
            node = graph.node[i]
            for j, name in enumerate(node.input):
                if name == tensor:
                    node.input[j] = dropped
        producer = index.producer(tensor)
        assert producer is not None  # a stage output is produced by a stage node
        inserts.append((producer, _dropout_nodes(tensor, dropped, f"{DROPOUT_PREFIX}stage{stage}/{tensor}",
                                                 ratio=ratio, scale=scale, zero=zero,
                                                 seed=SEED_BASE + SEED_STRIDE * seed + k)))
    nodes = list(graph.node)
    for position, new in sorted(inserts, key=lambda item: item[0], reverse=True):
        nodes[position + 1:position + 1] = new
    del graph.node[:]
    graph.node.extend(nodes)
    return check_model(out, message="MC dropout: the graph with dropout does not validate", error=EvaluationError)
