"""Merge methods as objects that declare their parameters, and the registry that finds them by name.

The pattern is mergekit's: a method is a class with a ``name``, the parameters it takes (``Param``:
name, type, default, allowed range or choices) and what else it needs (a base model, data); it is
registered with ``@register``. ``fuse`` and the ``fuse`` command's YAML config look methods up here
and validate the user's parameters against these declarations, so a new method needs no other
edit::

    @register
    class Scaled(MergeMethod):
        name = "scaled-mean"
        summary = "The mean of the models, scaled."
        params = (Param("scale", float, 1.0, "factor applied to the mean", gt=0.0),)

        def merge(self, ctx: MergeContext) -> dict[str, Tensor]:
            soup = uniform_soup(ctx.state_dicts)
            return {k: v * ctx.params["scale"] if v.is_floating_point() else v for k, v in soup.items()}
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from metacompress.meta.errors import UserError

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: its name, type, default and the values it accepts.

    ``default=None`` with ``required=True`` means the user must give it. Bounds follow pydantic's
    names (``gt``, ``ge``, ``lt``, ``le``); numbers must also be finite. ``only_with=(other, value)``
    makes the parameter apply only when parameter ``other`` has that value (DARE's density needs
    ``dare_merge: ties``).
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    required: bool = False
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()
    only_with: tuple[str, Any] | None = None

    def allowed(self) -> str:
        """The accepted values in words: ``in (0, 1)``, ``an integer >= 1``, ``one of average, ties``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        low = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else ""
        high = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else ""
        if low and high:
            bounds = f"in {low}, {high}"
        elif low:
            bounds = (">" if low[0] == "(" else ">=") + " " + low[1:]
        elif high:
            bounds = ("<" if high[-1] == ")" else "<=") + " " + high[:-1]
        else:
            bounds = ""
        if self.type is int:
            return f"an integer {bounds}".rstrip()
        if self.type is float:
            return bounds or "a finite number"
        return f"a {self.type.__name__}"

    def check(self, value: Any) -> Any:
        """``value`` as the declared type; a one-line ``UserError`` naming the parameter if it does not fit."""
        bad = UserError(f"{self.name} must be {self.allowed()}, got {value!r}")
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        number = isinstance(value, int) or (self.type is float and isinstance(value, float))
        if isinstance(value, bool) or not number or not math.isfinite(value):
            raise bad
        value = self.type(value)
        for bound, fits in ((self.gt, operator.gt), (self.ge, operator.ge), (self.lt, operator.lt), (self.le, operator.le)):
            if bound is not None and not fits(value, bound):
                raise bad
        return value

    def limits(self) -> dict[str, float]:
        """The bounds as keywords (``pydantic.Field(**limits)``)."""
        return {k: v for k, v in (("gt", self.gt), ("ge", self.ge), ("lt", self.lt), ("le", self.le)) if v is not None}


@dataclass(frozen=True)
class FusionData:
    """Data for the data-driven parts: train split for BN statistics and Fisher, val for scores."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


@dataclass
class MergeContext:
    """What a method's ``merge`` gets: the models, the checked parameters, and what ``fuse`` was given.

    ``params`` holds every declared parameter (the user's value or the default). ``prepare`` is
    applied by ``fuse`` to the result (it recomputes BatchNorm statistics when data is at hand);
    a method that scores candidates applies it itself and says so with ``prepares = True``.
    ``report`` is the report ``fuse`` returns: a method may add entries (greedy's ingredients).
    """

    state_dicts: Sequence[StateDict]
    labels: list[str]
    params: dict[str, Any]
    base: StateDict | None = None
    model: nn.Module | None = None
    data: FusionData | None = None
    seed: int = 0
    prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda sd: sd
    report: dict = field(default_factory=dict)


class MergeMethod:
    """A merge method: declarations (class attributes) and ``merge``.

    ``needs_base``: the method merges task vectors (model - base) and needs the base they were
    fine-tuned from (and refuses one otherwise). ``needs_data``: why it needs a model and data,
    or None if it does not.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    needs_base: ClassVar[bool] = False
    needs_data: ClassVar[str | None] = None
    prepares: ClassVar[bool] = False

    def merge(self, ctx: MergeContext) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def resolve(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """The user's parameters checked against the declarations, defaults filled in.

        ``None`` values count as not given (the CLI's unset options). Refused with a one-line
        ``UserError`` naming the parameter: an unknown name, a wrong type or range, a parameter
        that does not apply with the others given, a required one missing.
        """
        declared = {p.name: p for p in cls.params}
        given = {k: v for k, v in given.items() if v is not None}
        unknown = [k for k in given if k not in declared]
        if unknown:
            takes = ", ".join(declared) or "none"
            raise UserError(f"parameter {', '.join(map(repr, unknown))} does not apply to method '{cls.name}' "
                            f"(its parameters: {takes})")
        out = {name: p.check(given[name]) if name in given else p.default for name, p in declared.items()}
        for name, p in declared.items():
            if p.only_with and name in given and out[p.only_with[0]] != p.only_with[1]:
                raise UserError(f"{name} applies to method '{cls.name}' only with {p.only_with[0]} "
                                f"'{p.only_with[1]}'")
            if p.required and name not in given:
                raise UserError(f"method '{cls.name}' needs parameter '{name}' ({p.help}, {p.allowed()})")
        return out


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available to ``fuse`` and the CLI under ``cls.name``.

    The declarations are checked here, so that a broken method fails at import, not when a user
    picks it: a name not yet taken, unique parameter names of type int, float or str, defaults that pass their own checks.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} has no method name")
    if name in REGISTRY:
        raise ValueError(f"fusion method '{name}' is already registered ({REGISTRY[name].__name__})")
    names = [p.name for p in cls.params]
    if len(set(names)) != len(names):
        raise ValueError(f"{cls.__name__} declares a parameter twice: {names}")
    for p in cls.params:
        if p.type not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{p.name}: parameters are int, float or str, not {p.type.__name__}")
        if p.default is not None:
            p.check(p.default)
        if p.only_with and p.only_with[0] not in names:
            raise ValueError(f"{cls.__name__}.{p.name} depends on undeclared parameter {p.only_with[0]}")
    REGISTRY[name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The registered methods, in registration order."""
    return tuple(REGISTRY)


def lookup(name: str) -> type[MergeMethod]:
    """The method registered as ``name``; a one-line ``UserError`` listing the others if there is none."""
    if name not in REGISTRY:
        raise UserError(f"unknown fusion method '{name}': use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def declared_params() -> dict[str, Param]:
    """Every parameter name the registered methods declare, with its first declaration.

    For schemas that cover all methods at once (the ``run`` recipe's fuse step, checked before
    anything runs); the ``fuse`` command then checks the chosen method's own declarations.
    """
    out: dict[str, Param] = {}
    for cls in REGISTRY.values():
        for p in cls.params:
            out.setdefault(p.name, p)
    return out
