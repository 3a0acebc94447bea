"""Which model layer an ONNX node came from, so precision rules can name layers, not node ids.

The dynamo exporter records each node's module path in the `pkg.torch.onnx.name_scopes` metadata:
    ['', 'model', 'model.blocks.0', 'model.blocks.0.attn_space', 'model.blocks.0.attn_space.qkv', 'linear_3']
node_path() turns that into "blocks.0.attn_space.qkv/linear" (module path / op, numbering dropped);
patterns (regular expressions, re.search) select nodes by that path, by node name or by op type.
In the fused step graph the denoiser is the submodule `denoiser` (export/step_module.FusedStep): its
prefix is dropped too, so one pattern names the same layer in denoiser.onnx and step.onnx, and
step_nodes() picks the step's own arithmetic (guidance mix, clip, affine update).
"""
from __future__ import annotations

import ast
import re

# Ops that carry the weights and the compute that INT8 speeds up.
COMPUTE_OPS = ("MatMul", "Gemm", "Conv")


def _scopes(node) -> list[str]:
    props = {p.key: p.value for p in node.metadata_props}
    try:
        return ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return []


def node_path(node) -> str:
    scopes = _scopes(node)
    if len(scopes) < 2:
        return node.name
    module = re.sub(r"^(model|denoiser)\.?", "", scopes[-2])
    return f"{module}/{re.sub(r'_[0-9]+$', '', scopes[-1])}"


def step_nodes(model) -> list[str]:
    """Names of a fused step graph's own nodes: those of FusedStep.forward itself (scopes ['', op]),
    not of its denoiser submodule. Step graphs only: in denoiser.onnx this picks the model's top-level ops."""
    return [n.name for n in model.graph.node if len(scopes := _scopes(n)) == 2 and scopes[0] == ""]


def check_patterns(patterns) -> list[str]:
    from vdit_deploy.validate import regex
    return [regex(p, "layer pattern") for p in patterns]


def matches(node, patterns) -> bool:
    """A node matches a pattern if the pattern finds its layer path, its name, or equals its op type."""
    path = node_path(node)
    return any(p == node.op_type or re.search(p, path) or re.search(p, node.name) for p in patterns)


def select(model, patterns, op_types=None) -> list[str]:
    """Names of the nodes (of op_types, if given) that match any pattern."""
    check_patterns(patterns)
    return [n.name for n in model.graph.node
            if (op_types is None or n.op_type in op_types) and matches(n, patterns)]


def matching(model, patterns, op_types=None) -> list[str]:
    """The patterns that match some node (of op_types) of this graph: the rules that apply to it."""
    nodes = [n for n in model.graph.node if op_types is None or n.op_type in op_types]
    return [p for p in check_patterns(patterns) if any(matches(n, [p]) for n in nodes)]


def layer_groups(model, op_types=COMPUTE_OPS) -> dict[str, list[str]]:
    """{layer: node names} for the compute nodes: one group per Linear / Conv module and one per
    attention core (its QK^T and AV matmuls), in graph order."""
    groups: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type in op_types:
            path = node_path(n)
            key = path.rsplit("/", 1)[0] if path.endswith(("/linear", "/conv3d")) else path.replace("/", ".")
            groups.setdefault(key, []).append(n.name)
    return groups
