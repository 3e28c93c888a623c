"""The compression pipeline, stage by stage:

load -> measure -> (robustify) -> allocate -> prune -> repair -> (fuse) -> export -> verify -> report

(with the meta policy, a guard stage after prune screens the fixed rules, repairs four
candidates and keeps the best on validation: policy/guard.py).

Every stage is a plain function call into the library; the CLI and recipes only fill in a
``CompressConfig``. Outputs are staged in a temporary folder and moved into place only when
every stage has succeeded, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from metacompress.allocation import allocate, allocation_warnings, counted_miss, robustify_stage
from metacompress.budget import Budget, BudgetSpec, budget_spec, resolve_budget
from metacompress.compress.attention import match_saved_attention, split_self_attention
from metacompress.compress.checkpoint import save_compressed
from metacompress.compress.distill import RepairConfig
from metacompress.compress.groups import refuse_unsupported
from metacompress.compress.measure import count_macs
from metacompress.compress.prune import PruningSpace
from metacompress.compress.robust import RobustConfig
from metacompress.compress.rules import RULES
from metacompress.data import Dataset, data_paths, load_dataset
from metacompress.data.inputs import is_token_ids
from metacompress.errors import UserError
from metacompress.io import load_weights, refuse_output_over_inputs, state_dict_from, write_json
from metacompress.meta import data_parallel, distributed
from metacompress.meta.modules import load_state
from metacompress.progress import status
from metacompress.signals import signals_deferred
from metacompress.students import (
    guard_repair,
    prune_to,
    repair_students,
    rescued_repair,
    robust_repair_choice,
    soup_students,
)
from metacompress.training import accuracy, predict, train_dense
from metacompress.zoo import build_model, check_forward, is_builtin, native_image_size

DEFAULT_TRAIN_EPOCHS = 30
QUANTIZE_MODES = ("none", "auto", "static", "dynamic")
OUTPUTS = ("model.onnx", "model.pt", "report.json", "model.int8.onnx")
DENSE_PARITY_SAMPLES = 64  # at most this many test samples check the dense ONNX file (only the latency baseline)
CHECK_MACS = 5e11          # MACs a PyTorch check pass over the test split spends, if it has to choose
MIN_CHECK_SAMPLES = 32


def check_samples(macs_per_sample: float, available: int, most: int | None = None) -> int:
    """Test samples a check in PyTorch runs on (an ONNX file's parity, the accuracy before
    repair): all of them (or ``most``) unless their passes would cost over CHECK_MACS (on a big
    model each such pass over the test split is minutes of a small CPU), then as many as that
    buys, and at least MIN_CHECK_SAMPLES. The accuracy reported for the compressed model counts every test sample."""
    affordable = max(MIN_CHECK_SAMPLES, int(CHECK_MACS // max(macs_per_sample, 1.0)))
    return min(available, most or available, affordable)


def accuracy_before_repair(student: nn.Module, data: Dataset) -> tuple[float, int]:
    """Test accuracy right after pruning, on an evenly spread subset where all of the test split
    would cost over CHECK_MACS (test splits may be sorted by class); and the samples it counts."""
    k = check_samples(count_macs(student, data.x_test[:1]), len(data.y_test))
    spread = data.test_subset(k)
    return accuracy(student, spread.x_test, spread.y_test), k


@dataclass
class CompressConfig:
    """Everything one compression run needs; defaults are what a user gets from the CLI."""

    model: str
    data: str = "digits"
    weights: str | None = None          # state-dict file, "none" (untrained), or None (train first)
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None  # kept fraction of the dense model's measured latency
    target_ms: float | None = None       # milliseconds at latency_batch
    latency_batch: int = 1
    threads: int | None = None           # onnxruntime intra-op threads (None: the cores this process may use)
    provider: str = "cpu"                # onnxruntime execution provider
    allocation: str = "meta"
    policy: str | None = None           # policy folder; None = the shipped default
    adapt_steps: int = 0                # ES-MAML fast adaptation steps on this task
    round_to: int | str = "auto"         # channel multiple; auto: the runtime's channel block
    repair: RepairConfig = field(default_factory=RepairConfig)
    repair_overrides: tuple[str, ...] = ()  # repair fields the user set explicitly (beat the policy)
    guard: bool = True                  # meta: keep the policy's repair only if it wins on validation
    students: int = 1
    quantize: str = "none"
    train_epochs: int = DEFAULT_TRAIN_EPOCHS
    seed: int = 0
    out: str = "out"
    dynamo: bool = True
    latency_repeats: int = 20
    latency_seconds: float = 3.0        # at least this long timing each batch size (interleaved rounds)
    latency_max_seconds: float = 30.0   # at most about this long per batch size (fewer rounds on big models)
    trust_pickle: bool = False
    test_samples: int | None = None     # report test accuracies on this many test samples, spread evenly (None: all)
    robustify: RobustConfig | None = None  # prune-robust meta-training of the dense model before allocating

    def budget(self) -> BudgetSpec:
        return budget_spec(self.target_macs, self.target_params, self.target_latency, self.target_ms,
                           batch=self.latency_batch, threads=self.threads, provider=self.provider)


@dataclass
class Prepared:
    """A dense model ready to compress: the teacher, its data and its pruning space."""

    data: Dataset
    dense: nn.Module
    space: PruningSpace
    dense_accuracy: float
    budget: Budget
    robust: dict[str, Any] | None = None  # what the robustify stage did, if it ran
    dense_logits: torch.Tensor | None = None  # of the first DENSE_PARITY_SAMPLES test samples: the dense ONNX check's reference


def measure_dense(dense: nn.Module, data: Dataset) -> tuple[float, torch.Tensor]:
    """The dense model's test accuracy, and its logits of the first DENSE_PARITY_SAMPLES test
    samples: the reference its ONNX file is checked against later, without another PyTorch pass
    (on a ViT-B/16 on 2 cores such a pass over 64 images takes 10-15 s)."""
    logits = predict(dense, data.x_test)
    return float((logits.argmax(1) == data.y_test).float().mean()), logits[:DENSE_PARITY_SAMPLES].clone()


class Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        status(f"{name}...")
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)


def load_data(data_spec: str, model_spec: str) -> Dataset:
    """The data named by ``data_spec``, sized for the model ``model_spec`` names: an image folder
    of mixed image sizes gets the model's own input size."""
    return load_dataset(data_spec, image_size=native_image_size(model_spec))


def load_dense(spec: str, data: Dataset, weights: str | None, seed: int = 0, epochs: int = DEFAULT_TRAIN_EPOCHS,
               trust_pickle: bool = False, for_pruning: bool = False) -> nn.Module:
    """Build the model for the data and give it weights: from a file, untrained, or trained now
    (``for_pruning``: first refuse constructs the pruner cannot handle)."""
    torch.manual_seed(seed)
    model = build_model(spec, data.input_shape, data.num_classes, data.mean, data.std)
    check_forward(model, data.x_train[:2], data.num_classes, spec)
    if for_pruning:
        refuse_unsupported(model, data.x_train[:1])  # before training: a refused model wastes no epochs
    if weights is None:
        train_dense(model, data, epochs=epochs, seed=seed)
    elif weights != "none":
        state = state_dict_from(load_weights(weights, trust_pickle=trust_pickle), weights)
        match_saved_attention(model, state, data.x_train[:1])
        expected = model.state_dict()
        wrong = [k for k, v in state.items() if k in expected and v.is_floating_point() != expected[k].is_floating_point()]
        if wrong:
            raise UserError(f"{weights}: {wrong[0]} holds {state[wrong[0]].dtype} values, model '{spec}' needs "
                            f"{expected[wrong[0]].dtype} (wrong dtype in {len(wrong)} tensor(s))")
        try:
            load_state(model, state)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise UserError(f"state dict {weights} does not fit model '{spec}': {' '.join(lines[1:3])[:300]}") from None
    model.eval()
    check_forward(model, data.x_train[:2], data.num_classes, spec)
    return model


def prepare(cfg: CompressConfig, timer: Timer | None = None) -> Prepared:
    """Load the data and the dense model named by ``cfg``, then ``prepare_model``."""
    from metacompress.deploy.runtime import resolve_round_to

    timer = timer or Timer()
    spec = cfg.budget()
    round_to = resolve_round_to(cfg.round_to, cfg.provider)  # a bad --round-to or --provider fails before any work
    if cfg.test_samples is not None and cfg.test_samples < 1:
        raise UserError(f"--test-samples must be at least 1, got {cfg.test_samples}")
    with timer.stage("load"):
        data = load_data(cfg.data, cfg.model)
        if cfg.test_samples is not None:
            data = data.test_subset(cfg.test_samples)
        dense = load_dense(cfg.model, data, cfg.weights, cfg.seed, cfg.train_epochs, cfg.trust_pickle, for_pruning=True)
    return prepare_model(dense, data, spec, round_to, timer, cfg.dynamo)


def prepare_model(dense: nn.Module, data: Dataset, spec: BudgetSpec, round_to: int | str = "auto",
                  timer: Timer | None = None, dynamo: bool = True) -> Prepared:
    """Find the dense model's groups and resolve the budget (a latency budget builds or reads the
    runtime's latency model; ``dynamo``: the exporter whose files its measurements time)."""
    from metacompress.deploy.runtime import resolve_round_to

    timer = timer or Timer()
    with timer.stage("measure"):
        split_self_attention(dense, data.x_train[:1])  # heads of nn.MultiheadAttention become prunable
        space = PruningSpace(dense, data.x_train[:1], data.num_classes, resolve_round_to(round_to, spec.provider))
        dense_acc, dense_logits = measure_dense(dense, data)
    with timer.stage("latency model") if spec.is_latency else _nothing():
        budget = resolve_budget(spec, dense, space, data.input_shape, dynamo=dynamo)
    return Prepared(data, dense, space, dense_acc, budget, dense_logits=dense_logits)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _stage_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot write beside {out}: {exc.strerror or exc}") from None


def _publish(tmp: Path, out: Path, names: list[str]) -> None:
    """Move this run's outputs into ``out`` (signals held back until all are there) and remove the
    outputs of an earlier run that this one does not write (a stale model.int8.onnx)."""
    with signals_deferred():
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            (tmp / name).replace(out / name)
        for name in set(OUTPUTS) - set(names):
            (out / name).unlink(missing_ok=True)


def check_output(cfg: CompressConfig) -> None:
    """Refuse, before any work, an output folder that is a file, cannot be written, or holds (or
    lies inside) one of the run's inputs."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    existing = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    try:  # root passes os.access everywhere: try it
        os.rmdir(tempfile.mkdtemp(prefix=".metacompress-probe.", dir=existing))
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write in {existing}: {exc.strerror or exc}") from None
    inputs = data_paths(cfg.data)
    if cfg.weights not in (None, "none"):
        inputs.append(cfg.weights)
    model_file = cfg.model.rpartition(":")[0]
    if model_file.endswith(".py"):
        inputs.append(model_file)
    if cfg.policy:
        inputs.append(cfg.policy)
    refuse_output_over_inputs(out, inputs)


@dataclass
class Compressed:
    """What the stages before export produce."""

    prep: Prepared
    student: nn.Module
    keep: list[int]
    repair: RepairConfig
    pruned_accuracy: tuple[float, int]  # test accuracy before repair, and the samples it counts
    students: list[dict[str, Any]]
    guard: dict[str, Any] | None = None
    soup: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    rescue: dict[str, Any] | None = None  # the repair tried again at a lower rate, when the first failed


def compress_stages(cfg: CompressConfig, timer: Timer, prep: Prepared | None = None) -> Compressed:
    """load -> measure -> allocate -> prune -> (guard) -> repair -> (fuse): the compressed model
    (``prep``: a dense model already prepared for this budget, e.g. shared by a sweep's points)."""
    cfg.repair.validate()
    check_output(cfg)
    if cfg.students < 1:
        raise UserError(f"--students must be >= 1, got {cfg.students}")
    if cfg.allocation != "meta" and cfg.allocation not in RULES:
        raise UserError(f"unknown allocation '{cfg.allocation}': use meta or one of {', '.join(RULES)}")
    if cfg.quantize not in QUANTIZE_MODES:
        raise UserError(f"unknown --quantize '{cfg.quantize}': use one of {', '.join(QUANTIZE_MODES)}")
    if cfg.robustify is not None:
        cfg.robustify.validate()
    _refuse_parallel_latency(cfg.target_latency is not None or cfg.target_ms is not None)
    return compress_prepared(cfg, prep or prepare(cfg, timer), timer)


def _refuse_parallel_latency(latency_budget: bool) -> None:
    """A latency budget times the machine: ranks would share it and measure each other."""
    if latency_budget and data_parallel.data_parallel_active():
        raise UserError("a latency budget is measured on one process: run compress without torchrun, "
                        "or give a MACs or params budget")


def compress_prepared(cfg: CompressConfig, prep: Prepared, timer: Timer) -> Compressed:
    """(robustify) -> allocate -> prune -> (guard) -> repair -> (fuse) on a prepared dense model."""
    _refuse_parallel_latency(prep.budget.latency is not None)
    data = prep.data
    robust_warnings = []
    if cfg.robustify is not None:
        with timer.stage("robustify"):
            robust_warnings = robustify_stage(cfg, prep, cfg.robustify)
    with timer.stage("allocate"):
        keep, importance, repair_cfg = data_parallel.main_decides(lambda: allocate(cfg, prep))
    with timer.stage("prune"):
        student = prune_to(prep, keep, importance, cfg.seed)
    guard = first = None
    if cfg.allocation == "meta" and cfg.guard:
        with timer.stage("guard"):
            g = guard_repair(cfg, prep, keep, repair_cfg, student)
        keep, repair_cfg, student, guard, first = g.keep, g.repair, g.pruned, g.info, g.student
    warnings = robust_warnings + allocation_warnings(prep.space, keep, prep.space.off_grid(keep), prep.budget)
    warnings += counted_miss(prep.space, keep, prep.budget, student)
    for w in warnings:
        status(f"warning: {w}")
    pruned_acc = accuracy_before_repair(student, data)
    rescue = None
    with timer.stage("repair"):
        if cfg.robustify is not None and repair_cfg.steps > 0 and "lr" not in cfg.repair_overrides:
            repair_cfg, first, prep.robust["repair"] = robust_repair_choice(student, prep.dense, data, repair_cfg,
                                                                            cfg.seed, first)
        elif guard is None and repair_cfg.steps > 0 and "lr" not in cfg.repair_overrides:
            repair_cfg, first, rescue = rescued_repair(student, prep.dense, data, repair_cfg, cfg.seed)
            warnings += rescue_warnings(rescue)
        students = repair_students(student, prep.dense, data, repair_cfg, cfg.students, cfg.seed, first)
    soup = None
    if cfg.students > 1:
        with timer.stage("fuse"):
            soup = soup_students(student, students, data)
    else:
        load_state(student, students[0]["state_dict"])
    return Compressed(prep, student, keep, repair_cfg, pruned_acc, students, guard, soup, warnings, rescue)


def rescue_warnings(rescue: dict[str, Any] | None) -> list[str]:
    """What a user who relies on the default learning rate should know when it failed here."""
    if rescue is None:
        return []
    (high, at_high), (low, at_low) = rescue["lr"].items()
    w = (f"the repair's training loss rose at lr {high} (validation accuracy {at_high:.4f}); repaired again at "
         f"lr {low} ({at_low:.4f}) and kept lr {rescue['chosen_lr']:g} (set --repair-lr to choose)")
    return [w]


def export_and_verify(cfg: CompressConfig, c: Compressed, tmp: Path, timer: Timer) -> dict[str, Any]:
    """Write model.onnx (and model.int8.onnx), check both against PyTorch in onnxruntime and time
    them against the dense model, interleaved, at batch 1, 32 and the latency batch."""
    from metacompress.deploy import verify_onnx
    from metacompress.deploy.bench import benchmark_latency
    from metacompress.deploy.latency import SESSIONS
    from metacompress.deploy.quantize import quantize_onnx
    from metacompress.deploy.runtime import default_threads
    from metacompress.deploy.simplify import export_simplified

    data, example = c.prep.data, c.prep.data.x_test[:1]
    out: dict[str, Any] = {}
    with timer.stage("export"):
        out["export"] = export_simplified(c.student, example, tmp / "model.onnx", dynamo=cfg.dynamo)
        out["dense_export"] = export_simplified(c.prep.dense, example, tmp / "dense.onnx", dynamo=cfg.dynamo)
        if cfg.quantize != "none":
            out["quant"] = quantize_onnx(tmp / "model.onnx", tmp / "model.int8.onnx", cfg.quantize,
                                         calibration=data.calibration_batch(256, cfg.seed)[0].numpy())
    with timer.stage("verify"):
        n = len(data.x_test)
        student_parity = check_samples(count_macs(c.student, example), n)
        out["verify"] = verify_onnx(tmp / "model.onnx", c.student, data.x_test, data.y_test,
                                    parity_samples=student_parity)
        dense = slice(0, check_samples(c.prep.space.dense_macs, n, DENSE_PARITY_SAMPLES))
        out["dense_verify"] = verify_onnx(tmp / "dense.onnx", c.prep.dense, data.x_test[dense], data.y_test[dense],
                                          reference_logits=c.prep.dense_logits)
        sessions = {"dense": tmp / "dense.onnx", "compressed": tmp / "model.onnx"}
        if cfg.quantize != "none":
            sessions["int8"] = tmp / "model.int8.onnx"
            out["quant"].update(verify_onnx(tmp / "model.int8.onnx", c.student, data.x_test, data.y_test,
                                            parity_samples=student_parity))
        batches = sorted({1, 32, cfg.latency_batch})
        out["latency"] = benchmark_latency(sessions, data.input_shape, batches=batches, repeats=cfg.latency_repeats,
                                           threads=cfg.threads or default_threads(), provider=cfg.provider,
                                           min_seconds=cfg.latency_seconds, sessions_per_model=SESSIONS,
                                           max_seconds=cfg.latency_max_seconds)
    return out


def run_compress(cfg: CompressConfig) -> dict[str, Any] | None:
    """Run every stage and write ``model.onnx``, ``model.pt`` and ``report.json`` into ``cfg.out``.

    Under torchrun, dense training and repair run data-parallel on every rank, the allocation on
    rank 0 (sent to the others), and rank 0 alone exports, verifies and writes: the other ranks
    return None."""
    from metacompress.report import compress_report

    timer = Timer()
    with data_parallel.data_parallel():
        c = compress_stages(cfg, timer)
    if not distributed.is_main():
        return None
    out = Path(cfg.out)
    tmp = None
    try:
        with signals_deferred():  # an interrupt cannot come between creating the folder and owning it
            tmp = _stage_dir(out)
        results = export_and_verify(cfg, c, tmp, timer)
        report = compress_report(cfg, c, results)
        if distributed.active():
            report["ranks"] = distributed.rank_and_world()[1]
        with timer.stage("save"):
            save_compressed(tmp / "model.pt", c.student, cfg.model, c.prep.data.input_shape, c.prep.data.num_classes,
                            meta={"policy": cfg.allocation, "data": cfg.data},
                            token_example=sample if is_token_ids(sample := c.prep.data.x_test[:1]) else None)
        report["timings_s"] = timer.timings
        write_json(tmp / "report.json", report)
        _publish(tmp, out, ["model.onnx", "model.pt", "report.json"] + (["model.int8.onnx"] if "quant" in results else []))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if c.prep.budget.latency is not None:
            c.prep.budget.latency.close()
    if not is_builtin(cfg.model) and not cfg.model.startswith("torchvision:"):
        report["note"] = f"reloading model.pt needs the factory {cfg.model} again"
    return report
