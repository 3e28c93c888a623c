"""The Python API: compress a ``torch.nn.Module`` on the user's data, export it, verify it.

>>> import metacompress as mc
>>> small, report = mc.compress(model, x[:1], target=mc.Latency(0.5), train=train_set)
>>> mc.export_onnx(small, x[:1], "small.onnx")
>>> mc.verify("small.onnx", small, test_set)["top1_agreement"]
1.0

The CLI's ``compress`` runs the same stages (``pipeline``) on a model named by a spec string;
here the caller owns the model object and the data, and nothing is written to disk.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from metacompress.budget import BudgetSpec, as_budget
from metacompress.compress.checkpoint import USER_MODULE, load_compressed, save_compressed
from metacompress.compress.distill import RepairConfig
from metacompress.compress.groups import refuse_unsupported
from metacompress.compress.measure import composed_attention, count_macs, count_params
from metacompress.compress.robust import RobustConfig
from metacompress.data.inputs import is_token_ids, model_input
from metacompress.data.torchdata import DataLike, _pairs, from_torch
from metacompress.errors import UserError, first_line
from metacompress.logits import Key, as_classifier, forward_scores, logits_key, pick, restore_forward
from metacompress.meta.modules import eval_mode
from metacompress.pipeline import CompressConfig, Compressed, Timer, compress_prepared, prepare_model

_BUDGET_FIELDS = {"macs": "target_macs", "params": "target_params", "latency": "target_latency", "ms": "target_ms"}


@dataclass
class CompressionReport:
    """What one ``compress`` call asked for, chose and achieved (accuracies on ``test``)."""

    budget: dict[str, Any]
    achieved_macs_ratio: float
    achieved_params_ratio: float
    dense_accuracy: float
    accuracy: float
    accuracy_before_repair: float
    kept: dict[str, int]                 # group name -> kept units
    channels: dict[str, int]             # group name -> dense units
    round_to: int
    repair: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    guard: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None  # predicted kept fraction of the dense latency, by batch
    robust: dict[str, Any] | None = None   # what robustify did, when asked
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _example(example_inputs: torch.Tensor | tuple) -> torch.Tensor:
    x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1 else example_inputs
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise UserError("example_inputs must be one input tensor with a batch axis, e.g. x[:1]")
    return model_input(x)


def _num_outputs(model: nn.Module, example: torch.Tensor) -> tuple[int, Key]:
    """The number of classes ``model`` scores, and where its forward's output holds the scores."""
    try:
        with torch.no_grad():
            out = model(example[:1])
    except Exception as exc:  # the user's forward: its own error, on one line
        msg = first_line(exc)
        raise UserError(f"the model cannot run on {str(example.dtype).removeprefix('torch.')} inputs of shape "
                        f"{tuple(example.shape[1:])} (integer samples are fed as int64 token ids, others as "
                        f"float32): {msg}") from None
    key = logits_key(out)
    scores = pick(out, key)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise UserError(f"the model must return (N, classes) class scores; got "
                        f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    return int(scores.shape[1]), key


def _config(model: nn.Module, spec: BudgetSpec, repair: RepairConfig | None, **options: Any) -> CompressConfig:
    cfg = CompressConfig(model=USER_MODULE + type(model).__name__, data="user", weights="none",
                         latency_batch=spec.batch, threads=spec.threads, provider=spec.provider,
                         repair=copy.deepcopy(repair) if repair is not None else RepairConfig(),
                         repair_overrides=tuple(f.name for f in fields(RepairConfig)) if repair is not None else (),
                         **{_BUDGET_FIELDS[spec.metric]: spec.value}, **options)
    cfg.repair.validate()
    if cfg.robustify is not None:
        cfg.robustify.validate()
    if cfg.students < 1:
        raise UserError(f"students must be >= 1, got {cfg.students}")
    return cfg


@composed_attention()
def compress(model: nn.Module, example_inputs: torch.Tensor, *, target: BudgetSpec | float, train: DataLike,
             val: DataLike | None = None, test: DataLike | None = None, allocation: str = "meta",
             repair: RepairConfig | None = None, guard: bool = True, students: int = 1,
             round_to: int | str = "auto", policy: str | None = None, robustify: RobustConfig | None = None,
             seed: int = 0) -> tuple[nn.Module, CompressionReport]:
    """Prune ``model`` (left untouched) to ``target`` and repair it by distillation from itself.
    Its forward returns the class scores, or a tuple, dict or output object holding them
    (``metacompress.logits``); the returned model's forward returns the same form.

    ``target``: ``MACs(f)``, ``Params(f)``, ``Latency(f, batch=...)``, ``Milliseconds(ms)`` or a
    bare MACs fraction. ``train``/``val``/``test``: torch Datasets or DataLoaders of (input,
    label) pairs or of dicts (``data.torchdata.INPUT_KEYS``, ``LABEL_KEYS``), or (inputs, labels)
    tensors; ``val`` (choices) defaults to 10 % of ``train``, ``test`` (reported accuracy) to
    ``val``. ``allocation``: ``meta`` (the learned policy, guarded on validation) or a fixed rule
    (uniform, global-magnitude, lamp, global-taylor). ``repair``:
    settings that override the policy's (``RepairConfig(steps=0)``: BN recalibration only).
    ``robustify``: first meta-train the (copied) dense model so that its sub-networks recover
    quickly (``compress.robust``); it is then also the repair's teacher.

    >>> small, report = compress(model, x[:1], target=MACs(0.5), train=(x, y))
    >>> report.achieved_macs_ratio  # within 2 % of 0.5
    0.4987
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec = as_budget(target)
    example = _example(example_inputs)
    cfg = _config(model, spec, repair, allocation=allocation, guard=guard, students=students, round_to=round_to,
                  policy=policy, seed=seed, robustify=robustify)
    torch.manual_seed(seed)
    dense = copy.deepcopy(model).eval()
    classes, key = _num_outputs(dense, example)
    forward_scores(dense, key)  # a dict, output object or tuple: compression sees the scores only
    data = from_torch(train, val, test, num_classes=classes, seed=seed)
    if tuple(example.shape[1:]) != data.input_shape:
        raise UserError(f"example_inputs samples {tuple(example.shape[1:])} differ from the data's {data.input_shape}")
    refuse_unsupported(dense, example[:1])
    timer = Timer()
    prep = prepare_model(dense, data, spec, round_to, timer)
    try:
        c = compress_prepared(cfg, prep, timer)
    finally:
        if prep.budget.latency is not None:
            prep.budget.latency.close()
    report = _report(c, spec, timer)
    return (c.student if key is None else restore_forward(c.student)), report


def _report(c: Compressed, spec: BudgetSpec, timer: Timer) -> CompressionReport:
    from metacompress.training import accuracy

    prep, data = c.prep, c.prep.data
    latency = None
    if prep.budget.latency is not None:
        model = prep.budget.latency.model
        latency = {"target_fraction": prep.budget.target, "correction_rounds": prep.budget.latency.report(),
                   "predicted_fraction": {f"b{b}": model.predict_fraction(c.keep, b) for b in sorted(model.fits)}}
    return CompressionReport(
        budget=asdict(spec), dense_accuracy=prep.dense_accuracy,
        achieved_macs_ratio=count_macs(c.student, data.x_test[:1]) / prep.space.dense_macs,
        achieved_params_ratio=count_params(c.student) / prep.space.dense_params,
        accuracy=accuracy(c.student, data.x_test, data.y_test), accuracy_before_repair=c.pruned_accuracy[0],
        kept={g.name: k for g, k in zip(prep.space.groups, c.keep)},
        channels={g.name: g.channels for g in prep.space.groups}, round_to=prep.space.round_to,
        repair=c.repair.to_dict(), warnings=list(c.warnings), guard=c.guard, latency=latency, robust=prep.robust,
        timings_s=dict(timer.timings))


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | os.PathLike, *,
                simplify: bool = True, dynamo: bool = True) -> dict[str, Any]:
    """Write ``model`` as one ONNX file (dynamic batch axis, ``input`` -> ``logits``), simplified
    with onnxslim unless ``simplify=False``; the file appears only once it is complete.

    >>> export_onnx(small, x[:1], "small.onnx")["bytes"]
    61234
    """
    from metacompress.deploy.export import export_onnx as export
    from metacompress.deploy.simplify import simplify_onnx

    example = _example(example_inputs)
    info = export(as_classifier(model, example), example, path, dynamo=dynamo)
    if simplify:
        info.update(simplify_onnx(path, path))
    return info


def verify(path: str | os.PathLike, model: nn.Module | None, data: DataLike) -> dict[str, Any]:
    """Run the ONNX file in onnxruntime on ``data`` and compare it with ``model``: ``accuracy``,
    ``max_abs_diff``, ``top1_agreement``, ``opset``, ``bytes``, ``ops``.

    >>> verify("small.onnx", small, (x_test, y_test))["max_abs_diff"] < 1e-4
    True
    """
    from metacompress.deploy.verify import verify_onnx

    x, y = _pairs(data, "data")
    return verify_onnx(path, None if model is None else as_classifier(model, model_input(x[:1])), x, y)


def save(model: nn.Module, path: str | os.PathLike, example_inputs: torch.Tensor) -> None:
    """Save a compressed user module as tensors and layer widths (no pickled code): reload it with
    ``load_compressed(path, dense_instance)``.

    >>> save(small, "small.pt", x[:1]); load_compressed("small.pt", MyNet())[0]
    MyNet(...)
    """
    example = _example(example_inputs)
    with eval_mode(model):
        classes = _num_outputs(model, example)[0]
    save_compressed(path, model, USER_MODULE + type(model).__name__, tuple(example.shape[1:]), classes,
                    token_example=example if is_token_ids(example) else None)


__all__ = ["CompressionReport", "compress", "export_onnx", "load_compressed", "save", "verify"]
