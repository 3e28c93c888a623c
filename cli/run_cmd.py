"""Commands: run (a YAML recipe), recipes list, recipes show.

A recipe names a ``pipeline`` (or a list of ``steps``, each naming one) and sets that command's
options: the keys are its flags without the dashes, ``-`` written ``_`` (``--target-macs 0.5`` is
``target_macs: 0.5``; ``--no-guard`` is ``guard: false``). The schema of each pipeline is built
from the command itself, so the two cannot drift apart, and tightened where the command checks a
range only later (budgets, steps); it is validated before anything runs, and each error names the
key, what is allowed, and the line or override it came from. ``policy-train`` and ``policy-eval``
take the keys of their training/evaluation recipes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, List, Literal, Optional

import typer
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from metacompress.cli.app import JSON_OPTION, app, command, console, emit, table
from metacompress.cli.introspect import Param, callback, params_of
from metacompress.errors import UserError
from metacompress.progress import status
from metacompress.recipes import Recipe, read_recipe

RECIPES_DIR = Path(os.environ.get("METACOMPRESS_RECIPES", Path(__file__).resolve().parents[1] / "recipes"))
PIPELINES: dict[str, tuple[str, ...]] = {
    "train": ("train",), "compress": ("compress",), "quantize": ("quantize",), "fuse": ("fuse",),
    "meta-train": ("meta-train",), "sweep": ("sweep",), "policy-train": ("policy", "train"),
    "policy-eval": ("policy", "eval"),
}
FROM_FILE = ("policy-train", "policy-eval")  # these commands read their own recipe (--config)
NOT_IN_RECIPES = {"json", "config", "overrides", "trust_pickle"}  # run's --json; pickles only by flag

recipes_app = typer.Typer(help="The shipped recipes: list them, show one.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


def _text(value: Any) -> Any:
    """Options that take comma-separated text also take a YAML list or a number."""
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


Text = Annotated[str, BeforeValidator(_text)]
Fraction = dict(gt=0.0, le=1.0)
# Ranges the commands check only once they run: validated up front here.
RANGES: dict[str, dict[str, float]] = {
    "target_macs": Fraction, "target_params": Fraction, "target_latency": Fraction, "target_ms": dict(gt=0.0),
    "repair_steps": dict(ge=0), "repair_lr": dict(gt=0.0), "temperature": dict(gt=0.0), "alpha": dict(ge=0.0, le=1.0),
    "repair_samples_per_class": dict(ge=1), "calibration_samples": dict(ge=1), "students": dict(ge=1),
    "latency_batch": dict(ge=1), "threads": dict(ge=1),
    "meta_steps": dict(ge=1), "meta_batch": dict(ge=1), "inner_steps": dict(ge=1),
    "inner_lr": dict(gt=0.0), "outer_lr": dict(gt=0.0), "joint_steps": dict(ge=1), "latency_seconds": dict(ge=0.0),
}


def _ranges(name: str) -> dict[str, float]:
    """RANGES, and the fusion methods' declared bounds (``fuse`` checks the chosen method's own)."""
    from metacompress.meta.fusion import declared_params

    declared = declared_params().get(name)
    return {**(declared.limits() if declared else {}), **RANGES.get(name, {})}


def _choices() -> dict[str, tuple[str, ...]]:
    from metacompress.meta import ALGORITHMS
    from metacompress.meta.fusion import declared_params, method_names
    from metacompress.pipeline import QUANTIZE_MODES
    from metacompress.sweep import ALLOCATIONS, SWEEP_METRICS

    return {"allocation": ALLOCATIONS, "quantize": QUANTIZE_MODES, "metric": SWEEP_METRICS, "method": method_names(),
            "algo": tuple(ALGORITHMS), "dare_merge": declared_params()["dare_merge"].choices,
            "mode": ("auto", "static", "dynamic")}


Regime = Literal["bn", "short", "few", "generous"]


class Teacher(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    data: List[str] = Field(min_length=1)
    kwargs: List[dict] = [{}]
    seed: int = 0


class PolicyTrain(BaseModel):
    """The keys of ``policy train`` recipes (``policy.meta_train.MetaTrainConfig``)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    pipeline: Literal["policy-train"]
    teachers: List[Teacher] = Field(min_length=1)
    iterations: int = Field(60, ge=1)
    tasks_per_iteration: int = Field(4, ge=1)
    population: int = Field(16, ge=1)
    sigma: float = Field(0.1, gt=0)
    lr: float = Field(0.03, gt=0)
    budgets: List[Annotated[float, Field(gt=0, le=1)]] = Field([0.1, 0.7], min_length=2, max_length=2)
    regime_weights: List[Annotated[float, Field(ge=0)]] = Field([0.3, 0.3, 0.3, 0.1], min_length=4, max_length=4)
    workers: int = Field(2, ge=1)
    seed: int = 0
    repair_defaults: dict = {}
    init: Optional[str] = None
    train_only: List[str] = []
    frozen_experts: List[str] = []
    reward_repair: Literal["policy", "default"] = "policy"
    anchor: Optional[str] = None
    select_every: int = Field(0, ge=0)
    select_budgets: List[Annotated[float, Field(gt=0, le=1)]] = [0.5, 0.3, 0.15]
    checkpoint_every: int = Field(1, ge=0)
    out: str = "out/policy"


class PolicyEval(BaseModel):
    """The keys of ``policy eval`` recipes (``policy.evaluate.EvalConfig``)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    pipeline: Literal["policy-eval"]
    teachers: List[Teacher] = Field(min_length=1)
    budgets: List[Annotated[float, Field(gt=0, le=1)]] = Field([0.5, 0.3, 0.15], min_length=1)
    regimes: List[Regime] = Field(["bn", "short", "few", "generous"], min_length=1)
    seeds: int = Field(3, ge=1)
    es_search_evals: int = Field(0, ge=0)
    es_search_budgets: List[Annotated[float, Field(gt=0, le=1)]] = [0.3, 0.15]
    es_search_regimes: List[Regime] = ["bn", "short", "few"]
    workers: int = Field(2, ge=1)
    repair_defaults: dict = {}


def command_params(pipeline: str) -> list[Param]:
    """The recipe keys of a pipeline's command, in declaration order."""
    return [p for p in params_of(callback(app, PIPELINES[pipeline])) if p.key not in NOT_IN_RECIPES]


def _field(param: Param, choices: dict[str, tuple[str, ...]]) -> tuple[Any, Any]:
    """The pydantic type and default of one command option or argument."""
    info, name = param.info, param.key
    limits = _ranges(name)
    limits.update({k: v for k, v in (("ge", info.min), ("le", info.max)) if v is not None})
    kind = param.base_type
    if kind is bool:
        typ: Any = bool
    elif kind is int:
        typ = Annotated[int, Field(**limits)]
    elif kind is float:
        typ = Annotated[float, Field(**limits)]
    elif name in choices:
        typ = Literal[choices[name]]
    else:
        typ = Text
    if info.default is ...:
        return typ, ...
    return (Optional[typ] if info.default is None else typ), info.default


def schema(pipeline: str) -> type[BaseModel]:
    """The schema of one pipeline's recipe (built from its command)."""
    if pipeline == "policy-train":
        return PolicyTrain
    if pipeline == "policy-eval":
        return PolicyEval
    choices = _choices()
    fields = {p.key: _field(p, choices) for p in command_params(pipeline)}
    config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    return create_model(f"{pipeline}_recipe", __config__=config, pipeline=(Literal[pipeline], ...), **fields)


def _error(recipe: Recipe, prefix: tuple, err: dict[str, Any], model: type[BaseModel]) -> str:
    key = (*prefix, *err["loc"])
    name = ".".join(map(str, key))
    where = recipe.where(key)
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(k for k in model.model_fields) if len(err["loc"]) == 1 else "see the pipeline's keys"
        return f"unknown key '{name}'{where}: allowed keys are {allowed}"
    if err["type"] == "missing":
        return f"missing key '{name}'{where or ''}: the pipeline needs it"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return f"key '{name}'{where}: {err['msg'][0].lower()}{err['msg'][1:]}, got {shown[:60]}"


def validate(recipe: Recipe) -> list[dict[str, Any]]:
    """The recipe's steps, each validated against its pipeline's schema (UserError naming the key)."""
    data = {k: v for k, v in recipe.data.items() if k != "vars"}
    if "steps" in data:
        extra = sorted(set(data) - {"steps"})
        if extra:
            raise UserError(f"recipe {recipe.path}: with 'steps', put '{extra[0]}' in a step{recipe.where((extra[0],))}")
        steps = data["steps"]
        if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
            raise UserError(f"recipe {recipe.path}: 'steps' must be a list of mappings, each with a pipeline"
                            f"{recipe.where(('steps',))}")
        prefixes = [("steps", i) for i in range(len(steps))]
    else:
        steps, prefixes = [data], [()]
    return [_validate_step(recipe, step, prefix) for step, prefix in zip(steps, prefixes)]


def _validate_step(recipe: Recipe, step: dict[str, Any], prefix: tuple) -> dict[str, Any]:
    pipeline = step.get("pipeline")
    key = ".".join(map(str, (*prefix, "pipeline")))
    if not isinstance(pipeline, str) or pipeline not in PIPELINES:
        got = "missing" if pipeline is None else f"got {pipeline!r}"
        raise UserError(f"recipe {recipe.path}: key '{key}'{recipe.where((*prefix, 'pipeline'))} must be one of "
                        f"{', '.join(PIPELINES)} ({got})")
    model = schema(pipeline)
    try:
        return model.model_validate(step).model_dump(exclude_unset=True)  # the command's defaults apply
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"recipe {recipe.path}: {_error(recipe, prefix, errors[0], model)}{more}") from None


def _command_line(step: dict[str, Any]) -> str:
    if step["pipeline"] in FROM_FILE:
        return f"metacompress {' '.join(PIPELINES[step['pipeline']])} --config <the step's {len(step) - 1} keys>"
    options, positional = _argv(step)
    return " ".join(["metacompress", *options, *positional])


def _argv(step: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The command line of one validated step: options, then arguments."""
    args: list[str] = list(PIPELINES[step["pipeline"]])
    positional: list[str] = []
    for p in command_params(step["pipeline"]):
        value = step.get(p.key)
        if value is None:
            continue
        on, off = p.flags
        if p.is_argument:
            positional.append(str(value))
        elif isinstance(value, bool):
            args += [on] if value else ([off] if off else [])  # a plain flag set false is its absence
        else:
            args += [on, str(value)]
    return args, positional


def _run_step(step: dict[str, Any], as_json: bool) -> Any:
    """Run one step through its command (the very code the command line runs); its JSON result."""
    with contextlib.ExitStack() as stack:
        if step["pipeline"] in FROM_FILE:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mc-recipe-"))
            path = Path(tmp) / "recipe.yaml"
            path.write_text(yaml.safe_dump({k: v for k, v in step.items() if k != "pipeline"}))
            argv = [*PIPELINES[step["pipeline"]], "--config", str(path), *(["--json"] if as_json else [])]
        else:
            options, positional = _argv(step)
            argv = [*options, *(["--json"] if as_json else []), "--", *positional]
        buf = io.StringIO()
        if as_json:
            stack.enter_context(contextlib.redirect_stdout(buf))
        try:
            rc = app(args=argv, prog_name="metacompress", standalone_mode=False)
        except Exception as exc:  # the command line parser's usage errors (the schema should prevent them)
            if not hasattr(exc, "format_message"):
                raise
            raise UserError(f"step {step['pipeline']}: {exc.format_message()}") from None
    if rc:
        raise typer.Exit(rc)  # the command has printed its one-line reason
    return json.loads(buf.getvalue()) if as_json and buf.getvalue().strip() else None


def find_recipe(name: str) -> Path:
    """A recipe file, or a shipped recipe by name (``quickstart``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name}.yaml"
    if shipped.is_file() and "/" not in name:
        return shipped
    known = ", ".join(r.stem for r in shipped_recipes()) or "none found"
    raise UserError(f"recipe not found: {name} (a YAML file, or a shipped recipe: {known})")


def shipped_recipes() -> list[Path]:
    """Recipe files in recipes/ that ``run`` takes (they name a pipeline or steps)."""
    out = []
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        with contextlib.suppress(yaml.YAMLError, OSError, UnicodeDecodeError):
            doc = yaml.safe_load(p.read_text())
            if isinstance(doc, dict) and ("pipeline" in doc or "steps" in doc):
                out.append(p)
    return out


@command("run")
def run(
    recipe: str = typer.Argument(..., help="A YAML recipe file, or the name of a shipped one (metacompress recipes list)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, dotted for nested keys: "
                                                               "repair_steps=20, steps.0.epochs=2, vars.out=out/x."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe and print its steps; run nothing."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a recipe: every pipeline (train, compress, quantize, fuse, meta-train, policy-train, policy-eval, sweep)."""
    doc = read_recipe(find_recipe(recipe), overrides or [])
    steps = validate(doc)
    if dry_run:
        emit({"recipe": str(doc.path), "steps": steps}, as_json, lambda r: console.print(
            f"{r['recipe']}: valid; " + "; ".join(_command_line(s) for s in r["steps"]), highlight=False))
        return
    results = []
    for i, step in enumerate(steps):
        status(f"recipe {doc.path.name}: step {i + 1}/{len(steps)}: {step['pipeline']}")
        results.append(_run_step(step, as_json))
    if as_json:
        out = results[0] if len(results) == 1 else {"recipe": str(doc.path), "steps": results}
        sys.stdout.write(json.dumps(out) + "\n")


@command("list", target=recipes_app)
def list_recipes(as_json: bool = JSON_OPTION) -> None:
    """The shipped recipes: name, pipeline(s) and what each does."""
    rows = []
    for p in shipped_recipes():
        doc = yaml.safe_load(p.read_text())
        pipes = [doc["pipeline"]] if "pipeline" in doc else [s.get("pipeline", "?") for s in doc["steps"]]
        first = next((ln.lstrip("# ").strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        rows.append({"name": p.stem, "pipeline": " -> ".join(map(str, pipes)), "about": first, "path": str(p)})

    def render(r: dict) -> None:
        t = table(title=f"recipes in {RECIPES_DIR} (metacompress run NAME \\[key=value ...])")
        for col in ("name", "pipeline", "about"):
            t.add_column(col)
        for row in r["recipes"]:
            t.add_row(row["name"], row["pipeline"], row["about"])
        console.print(t)

    emit({"recipes": rows}, as_json, render)


@command("show", target=recipes_app)
def show_recipe(name: str = typer.Argument(..., help="A shipped recipe's name (or a recipe file)."),
                as_json: bool = JSON_OPTION) -> None:
    """Print a recipe's YAML, to read or to copy and edit."""
    p = find_recipe(name)
    emit({"name": p.stem, "path": str(p), "text": p.read_text()}, as_json,
         lambda r: sys.stdout.write(r["text"]))
