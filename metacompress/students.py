"""The pruned model's students: one distillation repair, the guard's candidates, several
repairs forked from a shared start, and their soup.

Each student is returned with its validation/test scores and weights, so that the pipeline can
pick, fuse or report without repairing again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from torch import nn

from metacompress.compress.distill import RepairConfig, loss_rose, repair, repair_forked
from metacompress.compress.rules import CHANNEL_IMPORTANCE, RULE_SCORES, rule_allocation
from metacompress.data import Dataset
from metacompress.meta import data_parallel
from metacompress.meta.modules import has_batchnorm, load_state
from metacompress.progress import status
from metacompress.training import accuracy, accuracy_and_loss

if TYPE_CHECKING:
    from metacompress.pipeline import CompressConfig, Prepared

STUDENTS_SHARED = 0.5  # students share this fraction of the repair before they fork (benchmarks/students_soup.py)


def prune_to(prep: Prepared, keep: list[int], importance: str, seed: int = 0) -> nn.Module:
    student = copy.deepcopy(prep.dense)
    return prep.space.apply(student, keep, importance, calib=prep.data.calibration_batch(128, seed))


def _scored(student: nn.Module, data: Dataset, seed: int, test: bool = True) -> dict[str, Any]:
    val_accuracy, val_loss, val_correct = accuracy_and_loss(student, data.x_val, data.y_val)
    scored = {"seed": seed, "val_accuracy": val_accuracy, "val_loss": val_loss, "val_correct": val_correct,
              "state_dict": {n: t.detach().clone() for n, t in student.state_dict().items()}}
    if test:
        scored["test_accuracy"] = accuracy(student, data.x_test, data.y_test)
    return scored


def repair_one(pruned: nn.Module, teacher: nn.Module, data: Dataset, cfg: RepairConfig, seed: int,
               test: bool = True) -> dict[str, Any]:
    """One student repaired from ``pruned`` (left untouched), with its validation scores, weights,
    (``test``) test accuracy and whether its training loss rose (``distill.loss_rose``)."""
    s, losses = copy.deepcopy(pruned), []
    repair(s, teacher, data, cfg, seed=seed, losses=losses)
    return _scored(s, data, seed, test) | {"loss_rose": loss_rose(losses)}


@dataclass
class Guarded:
    """The guard's pick: allocation, repair settings, the pruned (unrepaired) model, what was
    compared (for the report), and the pick's repaired student (reused as the first student)."""

    keep: list[int]
    repair: RepairConfig
    pruned: nn.Module
    info: dict[str, Any]
    student: dict[str, Any]


def guard_repair(cfg: "CompressConfig", prep: Prepared, keep: list[int], learned: RepairConfig,
                 pruned: nn.Module) -> Guarded:
    """Repair the policy's proposal, the same allocation with the default settings, uniform and
    the other fixed rule that screens best; keep the one ``guard_choice`` picks on validation
    (policy/guard.py says which and why).

    Four repairs and three BN-only screens bound the risk of a task the policy has not seen, still
    over 10x cheaper than a per-task search of 64 repairs. ``pruned`` is the policy's allocation,
    already pruned.
    """
    from metacompress.policy.guard import fallback_of, guard_choice, versus_fallback

    bn = has_batchnorm(pruned)
    screened = _guard_options(cfg, prep, keep, learned, pruned, bn)
    options, tried = screened.candidates, dict(screened.repaired)
    for name, option in options.items():
        if name in tried:
            continue
        same = next((n for n in tried if options[n].same_repair(option, bn)), None)
        if same is not None:  # the same repair again: all settings given explicitly, or BN-only with one BN size
            options[name], tried[name] = replace(option, pruned=options[same].pruned), tried[same]
            continue
        tried[name] = repair_one(option.pruned, prep.dense, prep.data, option.repair, cfg.seed,
                                 test=False)  # the guard picks on validation
    acc = {n: t["val_accuracy"] for n, t in tried.items()}
    loss = {n: t["val_loss"] for n, t in tried.items()}
    correct = {n: t["val_correct"] for n, t in tried.items()}
    chosen = data_parallel.main_decides(lambda: guard_choice(correct, loss))  # one pick, whatever float noise
    paired = {n: t._asdict() for n, t in versus_fallback(correct, loss).items()}
    counts = {n: f" (+{t['wins']}/-{t['losses']} images)" for n, t in paired.items()}
    scores = ", ".join(f"{n} {a:.4f}{counts.get(n, '')}" for n, a in acc.items())
    status(f"guard: validation accuracy {scores} -> {chosen}")
    info = {"val_accuracy": acc, "val_loss": loss, "screen": screened.accuracy, "screened_rule": screened.rule,
            "fallback": fallback_of(correct, loss), "vs_fallback": paired, "chosen": chosen}
    pick = options[chosen]
    return Guarded(pick.keep, pick.repair, pick.pruned, info, tried[chosen])


@dataclass
class Candidate:
    """One of the guard's candidates: an allocation, its channel importance, the pruned model and
    the repair it gets."""

    keep: list[int]
    importance: str
    pruned: nn.Module
    repair: RepairConfig

    def same_repair(self, other: "Candidate", bn: bool) -> bool:
        """Whether repairing ``other`` would give this candidate's student (``bn``: the models have BatchNorm)."""
        return ((self.keep, self.importance) == (other.keep, other.importance)
                and self.repair.outcome(bn) == other.repair.outcome(bn))


@dataclass
class Screened:
    """The guard's candidates after the fixed rules' screens."""

    rule: str                              # the screened rule that is repaired
    accuracy: dict[str, float]             # every screen's validation accuracy
    candidates: dict[str, Candidate]       # name -> candidate, names from GUARD_CANDIDATES
    repaired: dict[str, dict[str, Any]]    # the screened rule's repair, when its screen was that repair


def _guard_options(cfg: "CompressConfig", prep: Prepared, keep: list[int], learned: RepairConfig,
                   pruned: nn.Module, bn: bool) -> Screened:
    """The guard's candidates, after screening the fixed rules other than uniform. A screen is
    reused as the screened rule's repair when it was that repair (BN-only at a size the screen
    used, or no BatchNorm, and the whole validation split screened). The rules' unit scores come
    from one scoring pass on rank 0 (a Taylor score differs in its last bits from process to
    process, and every rank must prune the same channels)."""
    from metacompress.policy.features import expert_scores
    from metacompress.policy.guard import SCREEN_VAL_SAMPLES, SCREENED_RULES, screen_config, screened_rule

    calib = prep.data.calibration_batch(128, cfg.seed)
    scores = data_parallel.main_decides(
        lambda: expert_scores(prep.dense, prep.space, calib, SCREENED_RULES, extra=("magnitude",)))
    fns = {r: rule_allocation(r, prep.space, prep.dense, calib, scores.get(RULE_SCORES.get(r, "")))
           for r in ("uniform", *SCREENED_RULES)}

    def pruned_to_keep(rule: str, k: list[int]) -> Candidate:
        importance = CHANNEL_IMPORTANCE[rule]
        model = prep.space.apply(copy.deepcopy(prep.dense), k, importance, scores=scores[importance])
        return Candidate(k, importance, model, cfg.repair)

    # screens rank allocations: a latency budget's prediction suffices, measuring is for the candidates
    data, candidates = prep.data, {r: pruned_to_keep(r, prep.budget.predicted(prep.space, fns[r])) for r in SCREENED_RULES}
    screen, correct, done = screen_config(cfg.repair), {}, {}
    whole = screen.outcome(bn) == cfg.repair.outcome(bn) and len(data.y_val) <= SCREEN_VAL_SAMPLES
    for r, candidate in candidates.items():
        s = copy.deepcopy(candidate.pruned)
        repair(s, prep.dense, data, screen, seed=cfg.seed, progress=False)
        if whole:
            done[r] = _scored(s, data, cfg.seed, test=False)
            correct[r] = done[r]["val_correct"]
        else:
            correct[r] = accuracy_and_loss(s, data.x_val[:SCREEN_VAL_SAMPLES], data.y_val[:SCREEN_VAL_SAMPLES])[2]
    best = data_parallel.main_decides(lambda: screened_rule(correct))
    measured = prep.budget.project(prep.space, fns[best])
    if measured != candidates[best].keep:
        candidates[best], done = pruned_to_keep(best, measured), {}
    options = {"policy": Candidate(keep, "magnitude", pruned, learned),
               "policy-allocation": Candidate(keep, "magnitude", pruned, cfg.repair),
               "uniform": pruned_to_keep("uniform", prep.budget.project(prep.space, fns["uniform"])),
               best: candidates[best]}
    return Screened(best, {r: float(c.mean()) for r, c in correct.items()}, options,
                    {best: done[best]} if best in done else {})


GENTLE_LR_FACTOR = 0.1  # a second repair runs at this fraction of the lr (robust models, failed repairs: BENCHMARKS.md)


def robust_repair_choice(pruned: nn.Module, teacher: nn.Module, data: Dataset, cfg: RepairConfig, seed: int,
                         first: dict[str, Any] | None = None) -> tuple[RepairConfig, dict[str, Any], dict[str, Any]]:
    """For a prune-robust model: repair ``pruned`` with ``cfg`` (or take ``first``, already
    repaired so) and at GENTLE_LR_FACTOR of its learning rate, and keep the better on validation
    (accuracy, then loss; ``cfg`` on a tie). Returns the kept settings, their student and what
    was compared.

    Where robustify left a sub-network close to the dense model, large first steps undo that
    head start and a gentler repair keeps it. Where the sub-network still trails the dense
    model by much, the default rate repairs it better. Which case a task is in shows on
    validation, so both are tried (one extra repair)."""
    default = first if first is not None else repair_one(pruned, teacher, data, cfg, seed, test=False)
    return _gentler_choice(pruned, teacher, data, cfg, seed, default, "robust repair")


def rescued_repair(pruned: nn.Module, teacher: nn.Module, data: Dataset, cfg: RepairConfig, seed: int
                   ) -> tuple[RepairConfig, dict[str, Any], dict[str, Any] | None]:
    """Repair ``pruned`` with ``cfg``; where its training loss rose on the way (``loss_rose``: the
    rate is too high for this model, as the default 1e-2 is for a ViT), repair again at
    GENTLE_LR_FACTOR of the rate and keep the better on validation. Returns the kept settings,
    their student, and what was compared (None when the loss did not rise: one repair, as asked)."""
    first = repair_one(pruned, teacher, data, cfg, seed, test=False)
    if not data_parallel.main_decides(lambda: first["loss_rose"]):
        return cfg, first, None
    return _gentler_choice(pruned, teacher, data, cfg, seed, first, "repair (its loss rose)")


def _gentler_choice(pruned: nn.Module, teacher: nn.Module, data: Dataset, cfg: RepairConfig, seed: int,
                    default: dict[str, Any], what: str) -> tuple[RepairConfig, dict[str, Any], dict[str, Any]]:
    """``default`` (``pruned`` repaired with ``cfg``) against a repair at GENTLE_LR_FACTOR of the
    rate: the better on validation (accuracy, then loss; ``cfg`` on a tie)."""
    gentle_cfg = replace(cfg, lr=cfg.lr * GENTLE_LR_FACTOR)
    gentle = repair_one(pruned, teacher, data, gentle_cfg, seed, test=False)
    better = data_parallel.main_decides(  # one pick on every rank, whatever float noise
        lambda: (gentle["val_accuracy"], -gentle["val_loss"]) > (default["val_accuracy"], -default["val_loss"]))
    kept_cfg, kept = (gentle_cfg, gentle) if better else (cfg, default)
    info = {"lr": {f"{cfg.lr:g}": default["val_accuracy"], f"{gentle_cfg.lr:g}": gentle["val_accuracy"]},
            "chosen_lr": kept_cfg.lr}
    status(f"{what}: validation accuracy at lr {cfg.lr:.3g} {default['val_accuracy']:.4f}, "
           f"at {gentle_cfg.lr:.3g} {gentle['val_accuracy']:.4f} -> lr {kept_cfg.lr:.3g}")
    return kept_cfg, kept, info


def repair_students(pruned: nn.Module, teacher: nn.Module, data: Dataset, cfg: RepairConfig, k: int,
                    seed: int = 0, first: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Repair ``k`` students of ``pruned`` (left untouched), with their scores and weights.

    One student: ``first`` if given (already repaired with ``seed``), else one repair. Several:
    forked from a shared first half of the repair (``repair_forked``: soups of independently
    repaired students lose accuracy).
    """
    if k == 1:
        # the one student is the compressed model, whose test accuracy the ONNX verification measures
        return [first if first is not None else repair_one(pruned, teacher, data, cfg, seed, test=False)]
    students = repair_forked(pruned, teacher, data, cfg, k, seed, shared=STUDENTS_SHARED)
    return [_scored(s, data, seed + i) for i, s in enumerate(students)]


def soup_students(model: nn.Module, students: list[dict[str, Any]], data: Dataset) -> dict[str, Any]:
    """Greedy-soup the students on the validation split and load the soup into ``model``."""
    from metacompress.meta.fusion import FusionData, fuse

    names = [f"student{i}" for i in range(len(students))]
    fused, info = fuse("greedy", [s["state_dict"] for s in students], names=names, model=model,
                       data=FusionData(data.x_train, data.y_train, data.x_val, data.y_val))
    load_state(model, fused)
    model.eval()
    return {"ingredients": info["ingredients"], "val_accuracy": accuracy(model, data.x_val, data.y_val)}
