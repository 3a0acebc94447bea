"""Graph rewrites at export, so that every runtime runs what torch.onnx writes.

    bool Where   masked_fill on a bool tensor (HunyuanVideo's attention mask) exports as Where(c, x, y)
                 with bool x and y, for which ONNX Runtime has no kernel ("Could not find an implementation
                 for Where(16)"): the same truth table as Or(And(c, x), And(Not(c), y)), which every
                 runtime has. Broadcasting is the same (all three are multidirectional).
"""
from __future__ import annotations


def rewrite_bool_where(model) -> int:
    """In an onnx_ir Model (torch.onnx's ONNXProgram.model), in place; returns how many were rewritten."""
    import onnx_ir as ir

    count = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx"):
            continue
        cond, x, y = node.inputs
        if x is None or x.dtype != ir.DataType.BOOL:
            continue
        name = node.name or f"where_{count}"
        not_c = ir.Node("", "Not", [cond], name=f"{name}/not")
        keep_x = ir.Node("", "And", [cond, x], name=f"{name}/and_x")
        keep_y = ir.Node("", "And", [not_c.outputs[0], y], name=f"{name}/and_y")
        either = ir.Node("", "Or", [keep_x.outputs[0], keep_y.outputs[0]], name=f"{name}/or")
        out = node.outputs[0]
        either.outputs[0].dtype, either.outputs[0].shape = out.dtype, out.shape
        graph = node.graph
        graph.insert_before(node, [not_c, keep_x, keep_y, either])
        out.replace_all_uses_with(either.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count
