"""``model.pt``: a pruned model saved as tensors and plain values, rebuilt without unpickling code.

The file holds the model spec, its build arguments, the state dict and each layer's shape
attributes. Loading builds the dense model from its spec, resizes every layer to the saved
shapes, then loads the weights, all under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from metacompress.compress.attention import match_saved_attention
from metacompress.errors import UserError
from metacompress.io import load_weights, save_torch
from metacompress.meta.modules import load_state
from metacompress.zoo import build_model

FORMAT = "metacompress.compressed/1"
_SHAPE_ATTRS = {
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),  # transposed ones too
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._NormBase: ("num_features",),  # BatchNorm and InstanceNorm
    nn.LayerNorm: ("normalized_shape",),
    nn.GroupNorm: ("num_groups", "num_channels"),
}


def _structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    out = {}
    for name, mod in model.named_modules():
        for cls, attrs in _SHAPE_ATTRS.items():
            if isinstance(mod, cls):
                out[name] = {a: (list(v) if isinstance(v, tuple) else v) for a in attrs for v in [getattr(mod, a)]}
    return out


def save_compressed(path: str | os.PathLike, model: nn.Module, spec: str, input_shape, num_classes: int,
                    model_kwargs: dict | None = None, meta: dict | None = None,
                    token_example: torch.Tensor | None = None) -> None:
    """``token_example``: for a model over token ids (``data.inputs``), one sample of them, which
    ``load_compressed`` converts the rebuilt model's attention with (ids of zeros may be padding
    throughout, and a block that attends to nothing is not reproduced)."""
    save_torch({
        "format": FORMAT,
        "model": spec,
        "input_shape": list(input_shape),
        **({} if token_example is None else {"token_example": token_example[:1].detach().long().clone()}),
        "num_classes": int(num_classes),
        "model_kwargs": dict(model_kwargs or {}),
        "structure": _structure(model),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }, path)


def resize_to(model: nn.Module, structure: dict, state_dict: dict) -> None:
    """Give every layer the saved shape attributes and parameter shapes (before loading weights)."""
    modules = dict(model.named_modules())
    for name, attrs in structure.items():
        mod = modules.get(name)
        if mod is None:
            raise UserError(f"saved layer '{name}' does not exist in the rebuilt model")
        for a, v in attrs.items():
            setattr(mod, a, tuple(v) if isinstance(v, list) else v)
    for key, tensor in state_dict.items():
        owner, _, leaf = key.rpartition(".")
        mod = modules.get(owner)
        if mod is None:
            continue
        if leaf in mod._parameters and mod._parameters[leaf] is not None:
            if mod._parameters[leaf].shape != tensor.shape:
                mod._parameters[leaf] = nn.Parameter(torch.empty_like(tensor), requires_grad=True)
        elif leaf in mod._buffers and mod._buffers[leaf] is not None:
            if mod._buffers[leaf].shape != tensor.shape:
                mod._buffers[leaf] = torch.empty_like(tensor)


USER_MODULE = "module:"  # spec prefix of a model the user built (rebuilt from the dense module they pass)


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by ``save_compressed``; returns (model in eval mode, the file's fields).

    ``model``: a dense instance of the saved architecture (needed for a user's own module, which
    cannot be rebuilt from a name); it is resized in place to the saved widths.
    """
    ckpt = load_weights(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a metacompress compressed model (format {FORMAT})")
    if model is None and str(ckpt["model"]).startswith(USER_MODULE):
        raise UserError(f"{path} holds a user module ({ckpt['model'][len(USER_MODULE):]}): pass a dense instance of it "
                        "to load_compressed(path, model)")
    if model is None:
        model = build_model(ckpt["model"], ckpt["input_shape"], ckpt["num_classes"], **ckpt["model_kwargs"])
    example = ckpt.get("token_example")
    match_saved_attention(model, ckpt["state_dict"], torch.zeros(1, *ckpt["input_shape"]) if example is None else example)
    resize_to(model, ckpt["structure"], ckpt["state_dict"])
    try:
        load_state(model, ckpt["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit the rebuilt model: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, ckpt
