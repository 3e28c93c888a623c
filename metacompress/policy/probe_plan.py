"""What the loss-curve probes of one model cost, and which groups they measure within a budget.

A probe of a group is a forward pass with that group's units masked. Two things keep the probes
of a large model within a few seconds of CPU:

* **Prefix reuse.** Masking acts at the group's first consumer layer, so every layer called
  before it computes exactly what the unmasked pass did. ``PrefixCache`` records the outputs of
  the model's unit calls (leaf modules, and modules like ``nn.MultiheadAttention`` that compute
  with their own weights) once and serves them to the probes instead of recomputing them: a
  group deep in the network costs only the layers after it. The loss values are the same, bit for
  bit (``tests/policy/test_probe_plan.py``).
* **Group subsampling.** When probing every group would still exceed ``PROBE_COST_BUDGET``, the
  probes measure an evenly spread subset of groups (in execution order) and each other group
  shares the curve of its nearest measured group of the same kind (dense layers of one DenseNet
  block, blocks of one ResNet stage). The policy's meta-training and held-out models are small
  enough that every group is measured.

Cost is counted deterministically, not timed: multiply-accumulates of convolutions and linear
layers plus ``ACTIVATION_MACS`` per output element of every layer. MACs alone misjudge CPU time
across families: on two cores a depthwise-heavy EfficientNet-B0 (0.4 GMACs) takes 1.5x the time of
ResNet-18 (1.8 GMACs) per image, because moving activations, not arithmetic, dominates.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from metacompress.compress.groups import Group, is_conv, kernel_area

ACTIVATION_MACS = 256      # MACs one output element costs in time on CPU (fitted on resnet18 and
                           # efficientnet_b0 at 224 on two cores; it predicts convnext_tiny within 10 %)
PROBE_COST_BUDGET = 2.5e12  # MAC-equivalents all loss-curve probes of one model may spend: ~15 s on two cores
PREFIX_CACHE_BYTES = 2 << 30  # most memory the recorded layer outputs may take; beyond it probes run whole


def _tensors(output) -> list[torch.Tensor]:
    """The tensors a module returned (one, or the tensor items of a tuple/list)."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for t in output if isinstance(t, torch.Tensor)] if isinstance(output, (tuple, list)) else []


def _replayable(output) -> bool:
    """A tensor, or a tuple/list of tensors and Nones (``nn.MultiheadAttention``'s output)."""
    if isinstance(output, torch.Tensor):
        return True
    return isinstance(output, (tuple, list)) and all(t is None or isinstance(t, torch.Tensor) for t in output)


def _copy(output):
    if isinstance(output, torch.Tensor):
        return output.clone()
    return type(output)(None if t is None else t.clone() for t in output)


def call_cost(module: nn.Module, output) -> float:
    """MAC-equivalents of one call on one sample: the layer's MACs plus its output's traffic."""
    main = _tensors(output)
    size = float(sum(t.numel() for t in main))
    width = float(main[0].numel()) if main else 0.0
    macs = 0.0
    if is_conv(module):
        macs = width * module.in_channels // module.groups * kernel_area(module)
    elif isinstance(module, nn.Linear):
        macs = width * module.in_features
    elif isinstance(module, nn.MultiheadAttention):  # q/k/v/out projections, then QK^T and AV
        tokens = width / module.embed_dim
        macs = width * 4 * module.embed_dim + 2 * tokens * width
    return macs + ACTIVATION_MACS * size


_NOT_REPLAYABLE = object()
INPLACE_BY_CODE = 1 << 62  # ``ForwardProfile.mutated_by`` of an output that code between layers changes in place


@dataclass(frozen=True)
class ForwardProfile:
    """The unit calls of one forward pass (module calls with no module call inside), in order."""

    names: tuple[str, ...]     # module called
    cost: np.ndarray           # MAC-equivalents per sample of each call
    cacheable: np.ndarray      # the call returned what can be replayed (``_replayable``)
    mutated_by: np.ndarray     # last call that changes this call's output in place (-1: none; or INPLACE_BY_CODE)
    elements: int              # output elements per sample over all calls (the cache's size)

    def first_call(self, modules: Sequence[str]) -> int:
        """Index of the first call of any of ``modules`` (0: none is called, nothing precedes)."""
        wanted = set(modules)
        return next((i for i, n in enumerate(self.names) if n in wanted), 0)

    def reusable_prefix(self, modules: Sequence[str]) -> int:
        """How many leading calls a probe that masks at ``modules`` can take from the cache."""
        cut = self.first_call(modules)
        blocked = np.flatnonzero(~self.cacheable[:cut])
        return int(blocked[0]) if len(blocked) else cut

    def units(self, model: nn.Module) -> list[nn.Module]:
        """The modules the profiled calls are made by."""
        modules = dict(model.named_modules())
        return [modules[name] for name in dict.fromkeys(self.names)]


class _Recorder:
    """Hooks on every module that log each unit call (one with no module call inside: a leaf, or a
    module computing with its own weights, like ``nn.MultiheadAttention``) and which earlier
    outputs it changes in place (tensor version counters), telling a unit's own in-place change
    from the model code's between units."""

    def __init__(self):
        self.names: list[str] = []
        self.cost: list[float] = []
        self.outputs: list = []
        self.versions: list[list[int]] = []
        self.mutated_by: list[int] = []
        self.inner: list[bool] = []  # per open call: has a module call inside

    def _changed(self, by: int) -> None:
        for i, out in enumerate(self.outputs):
            now = [t._version for t in _tensors(out)]
            if now != self.versions[i]:
                self.versions[i] = now
                self.mutated_by[i] = max(self.mutated_by[i], by)

    def before(self, module, inputs) -> None:
        self._changed(INPLACE_BY_CODE)  # since the last call ended: the model's own code
        if self.inner:
            self.inner[-1] = True
        self.inner.append(False)

    def after(self, module, inputs, output, name: str) -> None:
        if self.inner.pop():
            self._changed(INPLACE_BY_CODE)
            return
        self._changed(len(self.names))  # during this call: the unit itself
        self.names.append(name)
        self.cost.append(call_cost(module, output))
        self.outputs.append(output if _replayable(output) else _NOT_REPLAYABLE)
        self.versions.append([t._version for t in _tensors(output)])
        self.mutated_by.append(-1)

    def profile(self) -> ForwardProfile:
        self._changed(INPLACE_BY_CODE)
        cacheable = [o is not _NOT_REPLAYABLE for o in self.outputs]
        elements = sum(t.numel() for o in self.outputs for t in _tensors(o))
        return ForwardProfile(tuple(self.names), np.asarray(self.cost, dtype=np.float64),
                              np.asarray(cacheable, dtype=bool), np.asarray(self.mutated_by, dtype=np.int64),
                              int(elements))


def profile_forward(model: nn.Module, example: torch.Tensor) -> ForwardProfile:
    """One forward pass of one sample of ``example`` (the model in the mode the probes run in),
    recording every unit call."""
    rec = _Recorder()
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(rec.before))
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: rec.after(m, i, o, name)))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return rec.profile()


def masked_modules(group: Group) -> list[str]:
    """The modules a probe of ``group`` hooks (``probes.masked``): where its effect starts."""
    return [group.name] if group.kind == "attention" else list(group.in_layers)


@dataclass(frozen=True)
class ProbePlan:
    """Which groups the probes measure, how many leading calls each reuses, and who shares whose curve."""

    probed: tuple[int, ...]    # indices of the measured groups
    prefix: tuple[int, ...]    # per group: leading calls served from the cache
    source: tuple[int, ...]    # per group: the measured group whose curve it takes (itself if measured)
    cost: float                # MAC-equivalents the planned probes spend


def plan_probes(groups: Sequence[Group], profile: ForwardProfile, samples: int, points: int,
                budget: float | None = None) -> ProbePlan:
    """Measure every group if ``points`` probes of ``samples`` each fit ``budget``; otherwise the
    largest evenly spread subset (in execution order) that does (``budget``: PROBE_COST_BUDGET)."""
    budget = PROBE_COST_BUDGET if budget is None else budget
    cache = samples * profile.elements * 4 <= PREFIX_CACHE_BYTES
    prefix = [profile.reusable_prefix(masked_modules(g)) if cache else 0 for g in groups]
    suffix = np.concatenate([np.cumsum(profile.cost[::-1])[::-1], [0.0]])  # cost of the calls from i on
    each = points * samples * suffix[prefix]
    order = sorted(range(len(groups)), key=lambda i: (profile.first_call(masked_modules(groups[i])), i))
    chosen = order
    for k in range(len(order), 0, -1):
        chosen = sorted({order[int(round(j))] for j in np.linspace(0, len(order) - 1, k)})
        if each[chosen].sum() <= budget:
            break
    position = {g: p for p, g in enumerate(order)}
    source = [i if i in chosen else _nearest(i, chosen, groups, position) for i in range(len(groups))]
    return ProbePlan(tuple(chosen), tuple(prefix), tuple(source), float(each[chosen].sum()))


def _nearest(i: int, chosen: Sequence[int], groups: Sequence[Group], position: dict[int, int]) -> int:
    """The measured group closest to group ``i`` in execution order, of the same kind if any is measured."""
    same = [j for j in chosen if groups[j].kind == groups[i].kind] or list(chosen)
    return min(same, key=lambda j: (abs(position[j] - position[i]), position[j]))


class PrefixCache:
    """Leaf outputs of one unmasked forward pass, replayed to the probes that cannot change them.

    ``record`` runs the pass and keeps each unit call's output; inside ``replaying(n)`` the first
    ``n`` unit calls of the next forward pass return their recorded output instead of computing it.
    An output that something changes in place later in the pass (``ReLU(inplace=True)``) is kept
    as a copy, and handed out as a copy when what changes it still runs after the replayed calls.
    """

    def __init__(self, model: nn.Module, profile: ForwardProfile):
        self.model = model
        self.profile = profile
        self.outputs: list[torch.Tensor | None] = []

    def record(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x``, keeping every unit call's output."""
        self.outputs = []
        mutated = self.profile.mutated_by

        def keep(m, inputs, output):
            i = len(self.outputs)
            replayable = _replayable(output)
            copy = replayable and i < len(mutated) and mutated[i] >= 0
            self.outputs.append(_copy(output) if copy else output if replayable else None)

        handles = [m.register_forward_hook(keep) for m in self.profile.units(self.model)]
        try:
            return self.model(x)
        finally:
            for h in handles:
                h.remove()

    @property
    def usable(self) -> bool:
        """The recorded pass made the profiled calls (a pass whose calls depend on the batch does not)."""
        return len(self.outputs) == len(self.profile.names)

    @contextmanager
    def replaying(self, calls: int) -> Iterator[None]:
        """Serve the first ``calls`` unit calls of the next forward pass from the record (one pass
        per block: the count does not restart)."""
        if calls <= 0 or not self.usable:
            yield
            return
        counter = [0]
        copy = self.profile.mutated_by >= calls  # changed in place by what runs: hand out a copy
        saved = []
        for module in self.profile.units(self.model):
            original = module.forward

            def forward(*args, original=original, **kwargs):
                i = counter[0]
                counter[0] += 1
                if i >= calls:
                    return original(*args, **kwargs)
                return _copy(self.outputs[i]) if copy[i] else self.outputs[i]

            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward
        try:
            yield
        finally:
            for module, own in saved:
                if own is None:
                    del module.forward
                else:
                    module.forward = own
