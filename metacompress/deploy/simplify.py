"""Graph simplification with onnxslim before an ONNX model is saved for deployment.

The dynamo exporter leaves per-node debug metadata (module path, FX node, stack hierarchy) that
makes a small model's file ~20 % larger, and exported graphs can hold foldable constants and
redundant reshapes. onnxslim folds and fuses them and drops the metadata. It rewrites the graph,
so the caller must re-check parity against the reference afterwards (``verify_onnx``).
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import onnx
import onnxslim

from metacompress.deploy.verify import load_session, model_facts
from metacompress.errors import UserError
from metacompress.io import atomic_path, require_file


def strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop doc strings and per-node metadata (debug only; the runtime never reads them), in place."""
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    return model


def compact_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rename internal tensors to short ids and drop node names, in place; inputs/outputs keep theirs.

    A quantized graph carries two to three long generated names per weight (``..._quantized``,
    ``..._scale``, ``..._zero_point``) on ~5x as many nodes: on a small int8 model they are ~15 % of
    the file. Graphs with control-flow subgraphs are left alone, since a subgraph may refer to an
    outer tensor by name.
    """
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return model
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if name in keep:
            return name
        return short.setdefault(name, f"t{len(short):x}")

    for t in graph.initializer:
        t.name = rename(t.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for v in graph.value_info:
        v.name = rename(v.name)
    return model


def simplify_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, Any]:
    """Simplify ``src`` with onnxslim and write ``dst`` atomically (``dst`` may equal ``src``).

    Returns ``{"src_bytes", "bytes", "src_nodes", "nodes"}``. The result is loaded in
    onnxruntime before it replaces anything, so a bad rewrite never lands on disk.
    """
    src = require_file(src, "ONNX model")
    before = model_facts(src)
    load_session(src, threads=1)  # a truncated or non-ONNX file fails here with a UserError
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(onnx.load(str(src)))
    except Exception as exc:
        raise UserError(f"onnxslim could not simplify {src}: {' '.join(str(exc).split())[:200]}") from None
    strip_debug_info(slim)
    with atomic_path(dst) as tmp:
        onnx.save(slim, str(tmp))
        load_session(tmp, threads=1)
    after = model_facts(dst)
    return {"src_bytes": before["bytes"], "bytes": after["bytes"],
            "src_nodes": sum(before["ops"].values()), "nodes": sum(after["ops"].values())}


def export_simplified(model, example, path: str | os.PathLike, dynamo: bool = True) -> dict[str, Any]:
    """``export_onnx`` then ``simplify_onnx`` into ``path``: the file ``compress`` deploys, and so
    the file every latency measurement of a candidate must time (exporters and simplification
    change the graph the runtime runs, and its speed by up to ~10 %)."""
    from metacompress.deploy.export import export_onnx

    raw = f"{os.fspath(path)}.raw"
    info = export_onnx(model, example, raw, dynamo=dynamo)
    try:
        info.update(simplify_onnx(raw, path))
    finally:
        if os.path.exists(raw):
            os.remove(raw)
    return info
