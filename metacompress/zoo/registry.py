"""Resolve a model spec string to an ``nn.Module`` sized for the data."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from metacompress.data.inputs import is_token_ids
from metacompress.errors import UserError, first_line
from metacompress.logits import logits_key, pick, scores_only
from metacompress.zoo import models as m

BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "mlp": m.MLP,
    "mlp-64": partial(m.MLP, hidden=64, depth=1),  # the seed's example: one hidden layer of 64 units
    "lenet5": m.LeNet5,
    "vgg-small": m.VGGSmall,
    "resnet20": partial(m.CifarResNet, depth=20),
    "resnet56": partial(m.CifarResNet, depth=56),
    "mobilenet-small": m.MobileNetSmall,
    "vit-tiny": m.ViTTiny,
}


def is_builtin(spec: str) -> bool:
    return spec in BUILTIN


# Auxiliary classifiers that run only in train mode: torch-pruning traces in eval mode and never
# sees them, so after pruning their inputs no longer fit (googlenet in BN recalibration: "expected
# input to have 512 channels, but got 352"), and in train mode the model returns a tuple, not logits.
# They only help training from scratch; the compressed model serves inference.
TRAIN_ONLY_HEADS_OFF = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def _torchvision(name: str, input_shape, num_classes: int, mean: float, std: float) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise UserError("torchvision models need torchvision: pip install 'metacompress[vision]'") from None
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"unknown torchvision classification model '{name}' (see torchvision.models.list_models())")
    m._require_image(f"torchvision:{name}", input_shape)
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **TRAIN_ONLY_HEADS_OFF.get(name, {}))
    layers: list[nn.Module] = [m.Normalize(mean, std)]
    if input_shape[0] == 1:  # torchvision models take RGB: replicate a grey channel inside the graph
        layers.append(_GreyToRGB())
    return nn.Sequential(*layers, net)


def native_image_size(spec: str) -> int | None:
    """The square input size a model is made for (torchvision: the crop size of its published
    weights' evaluation transform, read from metadata, nothing downloaded); None for models that
    size themselves to the data (the built-in zoo, user factories)."""
    if not spec.startswith("torchvision:"):
        return None
    try:
        from torchvision.models import get_model_weights
        weights = list(get_model_weights(spec.split(":", 1)[1]))
    except (ImportError, ValueError, KeyError):  # no torchvision, or a name build_model will refuse
        return None
    crop = weights[0].transforms.keywords.get("crop_size") if weights else None
    return int(crop) if crop else None


class _GreyToRGB(nn.Module):
    def forward(self, x):
        return x.expand(-1, 3, -1, -1)


def _user_factory(spec: str) -> Callable[..., Any]:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        mod_spec = importlib.util.spec_from_file_location(f"_metacompress_user_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            raise UserError(f"cannot import model file {path}: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UserError(f"cannot import module '{target}' for model '{spec}': {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"'{attr}' in {target} is not a callable model factory")
    return factory


def build_model(spec: str, input_shape, num_classes: int, mean: float = 0.0, std: float = 1.0,
                **kwargs: Any) -> nn.Module:
    """Build the model a spec names, sized for ``input_shape`` samples and ``num_classes`` outputs.

    ``kwargs`` reach built-in constructors (widths, depths) and user factories that accept them.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if spec in BUILTIN:
        try:
            return BUILTIN[spec](input_shape, num_classes, mean, std, **kwargs)
        except TypeError as exc:
            raise UserError(f"bad options for model '{spec}': {exc}") from None
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], input_shape, num_classes, mean, std)
    if ":" in spec:
        factory = _user_factory(spec)
        params = inspect.signature(factory).parameters
        offered = {"input_shape": input_shape, "num_classes": num_classes, **kwargs}
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        arguments = {k: v for k, v in offered.items() if accepts_any or k in params}
        # the data's normalisation, as the built-in models get it: only to a factory that names it
        # (a **kwargs factory may pass its keywords on to a constructor that takes no such thing)
        arguments |= {k: v for k, v in (("mean", mean), ("std", std)) if k in params and k not in kwargs}
        model = factory(**arguments)
        if not isinstance(model, nn.Module):
            raise UserError(f"factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
        return scores_only(model, input_shape)  # a tuple, dict or output object: its class scores
    known = ", ".join(BUILTIN)
    raise UserError(f"unknown model '{spec}': use one of {known}, torchvision:NAME, file.py:factory or module:factory")


def check_forward(model: nn.Module, sample: torch.Tensor, num_classes: int, spec: str = "model") -> None:
    """Fail early, with a one-line reason, when the model cannot run on the data."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample[:2])
    except Exception as exc:
        msg = first_line(exc)
        dtype = str(sample.dtype).removeprefix("torch.")
        embeds = any(isinstance(m, nn.Embedding) for m in model.modules())
        hint = " (its nn.Embedding takes token ids: npz:PATH:tokens)" if embeds and not is_token_ids(sample) else ""
        raise UserError(f"{spec} cannot run on {dtype} inputs of shape {tuple(sample.shape[1:])}{hint}: {msg}") from None
    out = pick(out, logits_key(out))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise UserError(f"{spec} gives outputs of shape {tuple(out.shape)}; expected (N, {num_classes}) class scores")
    if not torch.isfinite(out).all():
        raise UserError(f"{spec} gives NaN or infinite outputs: check its weights")
