"""The class scores of a model whose forward returns more than one tensor.

Models often return a dict (``{"logits": ...}``), an output object with a ``logits`` field (as
Hugging Face's classifiers do) or a tuple whose first element is the scores (``(logits,
features)``). Compression, export and verification only need the (N, classes) scores, so they
read them from where the model puts them; the compressed model keeps the user's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from metacompress.errors import UserError

Key = str | int | None  # None: the output is the scores; "logits": a key or field; 0: a tuple's first element


def logits_key(out: Any) -> Key:
    """Where the class scores are in ``out``, a forward's output."""
    if isinstance(out, torch.Tensor):
        return None
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return "logits"
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return 0
    raise UserError(f"the model must return (N, classes) class scores: a tensor, a dict or output object with "
                    f"'logits', or a tuple that starts with them; got {type(out).__name__}")


def pick(out: Any, key: Key) -> Any:
    """The class scores in ``out`` at ``key`` (``logits_key``)."""
    if key is None:
        return out
    if isinstance(key, int) or isinstance(out, Mapping):
        return out[key]
    return getattr(out, key)


class _ScoresForward:
    """A forward that returns the scores of another (a callable object rather than a closure, so
    that a deep copy of the model calls the copy's own forward)."""

    def __init__(self, forward: Callable[[torch.Tensor], Any], key: Key) -> None:
        self.forward, self.key = forward, key

    def __call__(self, x: torch.Tensor) -> Any:  # one named input, as torch.export maps its shapes
        return pick(self.forward(x), self.key)


def forward_scores(model: nn.Module, key: Key) -> nn.Module:
    """Make ``model`` (a private copy) return its scores only, for tracing, pruning and repair;
    ``restore_forward`` undoes it. The forward lives on the instance, so deep copies keep it."""
    if key is not None:
        model.forward = _ScoresForward(model.forward, key)
    return model


def scores_only(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """``model`` made to return its scores (``forward_scores``) when its forward returns more; a
    model that cannot run on ``input_shape`` samples is returned as it is, for the caller's
    check to report."""
    try:
        return forward_scores(model, _output_key(model, torch.zeros(1, *input_shape)))
    except Exception:  # noqa: BLE001 - the forward check that follows names the problem
        return model


def _output_key(model: nn.Module, example: torch.Tensor) -> Key:
    """``logits_key`` of ``model``'s output on one sample in eval mode; its mode is restored."""
    training = model.training
    try:
        with torch.no_grad():
            return logits_key(model.eval()(example[:1]))
    finally:
        model.train(training)


def restore_forward(model: nn.Module) -> nn.Module:
    """Give ``model`` (a copy made from one that ``forward_scores`` changed) its class's forward back."""
    model.__dict__.pop("forward", None)
    return model


class ScoresOf(nn.Module):
    """``model`` seen as a classifier that returns its scores only (for export and verification;
    the wrapped model itself is not changed)."""

    def __init__(self, model: nn.Module, key: Key) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pick(self.model(x), self.key)


def as_classifier(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` itself when it returns a tensor, else a ``ScoresOf`` view of it (``model`` is run
    once on ``example`` in eval mode to find out, and left in the mode it was in)."""
    key = _output_key(model, example)
    return model if key is None else ScoresOf(model, key)
