"""The commands of the Typer app read from their declarations: what ``run`` builds recipe schemas
from and ``docs`` writes docs/cli.md from, so neither can drift from the command line."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, get_args, get_type_hints

import typer

ARGUMENT_KEYS = {"model_spec": "model"}  # fuse's MODEL_SPEC is `model` in recipes, as in its --config


@dataclass
class Param:
    """One option or argument of a command, read from its Typer declaration."""

    name: str
    annotation: Any
    info: Any            # typer's OptionInfo or ArgumentInfo

    @property
    def is_argument(self) -> bool:
        return isinstance(self.info, typer.models.ArgumentInfo)

    @property
    def key(self) -> str:
        """Its recipe key: the flag without dashes, ``-`` as ``_`` (the name, for an argument)."""
        if self.is_argument:
            return ARGUMENT_KEYS.get(self.name, self.name)
        return self.flags[0].lstrip("-").replace("-", "_")

    @property
    def flags(self) -> tuple[str, str | None]:
        """('--guard', '--no-guard'), ('--target-macs', None)."""
        decl = (self.info.param_decls or [f"--{self.name.replace('_', '-')}"])[0]
        on, _, off = decl.partition("/")
        return on, off or None

    @property
    def base_type(self) -> Any:
        """int for ``Optional[int]``, list for ``List[str]``."""
        args = [a for a in get_args(self.annotation) if a is not type(None)]
        kind = args[0] if args and len(args) == 1 and type(None) in get_args(self.annotation) else self.annotation
        return getattr(kind, "__origin__", kind)


def commands(app: typer.Typer, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command of ``app`` and its sub-apps: (path, command info), in registration order."""
    for c in app.registered_commands:
        yield (*prefix, c.name), c
    for g in app.registered_groups:
        yield from commands(g.typer_instance, (*prefix, g.name))


def callback(app: typer.Typer, path: tuple[str, ...]) -> Callable:
    """The function behind ``metacompress PATH...``."""
    return next(info.callback for p, info in commands(app) if p == path)


def params_of(fn: Callable) -> list[Param]:
    """The options and arguments of a command function, in declaration order."""
    fn = inspect.unwrap(fn)
    hints = get_type_hints(fn)
    return [Param(name, hints.get(name, str), p.default) for name, p in inspect.signature(fn).parameters.items()
            if isinstance(p.default, typer.models.ParameterInfo)]
