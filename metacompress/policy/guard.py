"""The guard's choice among repaired candidates: what ``compress`` keeps when the policy allocates,
and the ``meta+guard`` column of ``policy eval`` (one rule, so the two cannot drift apart).

Candidates: the policy's allocation with its repair settings, the same allocation with the
default settings, and two fixed rules with the default settings: uniform, and whichever of the
other fixed rules (global magnitude, global Taylor, LAMP) screens best. The policy wins on
average, but on a family or dataset it has not seen its repair settings can diverge or its
allocation can trail a fixed rule (BENCHMARKS.md); which fixed rule is best changes from task
to task, and repairing all of them would double the guard's cost, so they are screened first:
each is pruned, BN-recalibrated on SCREEN_BN_SAMPLES samples (no distillation) and scored on the
first SCREEN_VAL_SAMPLES validation images. Uniform is repaired whatever the screens say: a
BN-only screen can rank it below a rule that ends far behind it after distillation (the
held-out evaluation in BENCHMARKS.md compares the two designs).

The fallback is the better of the two fixed-rule candidates on validation (uniform on a tie). A
policy candidate replaces it only when a paired test on the validation split says it is better:
on the images where the two disagree, the candidate must be right more often than a fair coin
would be at the SIGNIFICANCE level (one-sided exact sign test, i.e. McNemar's test). Why a test
and not a fixed margin: the noise of a difference depends on how many images the two models
disagree on, which is large after a short repair and small after a generous one, and a choice
that trails a fixed rule is the mistake the guard exists to prevent. Among the candidates that
pass: highest validation accuracy, then lowest validation loss, then the order of
GUARD_CANDIDATES.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from metacompress.compress.distill import RepairConfig

POLICY_CANDIDATES = ("policy", "policy-allocation")
FALLBACK = "uniform"
SCREENED_RULES = ("global-magnitude", "global-taylor", "lamp")
GUARD_CANDIDATES = (*POLICY_CANDIDATES, FALLBACK, *SCREENED_RULES)  # also the order that breaks ties
SIGNIFICANCE = 0.1  # one-sided level of the sign test against the fallback (chosen on the meta-training tasks: BENCHMARKS.md)
SCREEN_BN_SAMPLES = 64    # BN recalibration of a screened rule (at most the repair's own count)
SCREEN_VAL_SAMPLES = 512  # validation images a screened rule is scored on


class Paired(NamedTuple):
    """A candidate against the fallback on the same validation images."""

    wins: int      # images the candidate gets right and the fallback wrong
    losses: int    # the reverse
    p_value: float  # one-sided exact sign test: chance of >= wins of wins + losses under a fair coin


def paired_test(candidate: np.ndarray, reference: np.ndarray) -> Paired:
    """Sign test of ``candidate`` against ``reference`` (per-image correctness, same images)."""
    c, r = np.asarray(candidate, dtype=bool), np.asarray(reference, dtype=bool)
    if c.shape != r.shape:
        raise ValueError(f"paired_test needs the same images: {c.shape} vs {r.shape}")
    wins, losses = int((c & ~r).sum()), int((~c & r).sum())
    n = wins + losses
    p = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2.0 ** n if n else 1.0
    return Paired(wins, losses, p)


def screen_config(repair: RepairConfig) -> RepairConfig:
    """The screen of a fixed rule: ``repair``'s BN recalibration alone, on at most SCREEN_BN_SAMPLES."""
    return replace(repair, steps=0, bn_samples=min(repair.bn_samples, SCREEN_BN_SAMPLES))


def screened_rule(val_correct: dict[str, np.ndarray]) -> str:
    """The rule whose screened model is right on most of the first SCREEN_VAL_SAMPLES validation
    images (``val_correct``: per-image correctness, keys among the fixed rules, whose order in
    GUARD_CANDIDATES breaks ties: uniform first)."""
    names = [n for n in GUARD_CANDIDATES if n in val_correct and n not in POLICY_CANDIDATES]
    if not names:
        raise ValueError("screened_rule needs at least one screened rule")
    return max(names, key=lambda n: int(np.sum(val_correct[n][:SCREEN_VAL_SAMPLES])))


def _ranked(names: list[str], correct: dict[str, np.ndarray], val_loss: dict[str, float]) -> str:
    # max() keeps the first of equals: candidate order breaks exact ties
    return max(names, key=lambda n: (float(np.mean(correct[n])), -val_loss[n]))


def fallback_of(correct: dict[str, np.ndarray], val_loss: dict[str, float]) -> str | None:
    """The best fixed-rule candidate on validation, uniform on a tie (None when none was repaired)."""
    fixed = [n for n in GUARD_CANDIDATES if n in correct and n not in POLICY_CANDIDATES]
    return _ranked(fixed, correct, val_loss) if fixed else None


def versus_fallback(correct: dict[str, np.ndarray], val_loss: dict[str, float]) -> dict[str, Paired]:
    """Each policy candidate's paired test against the fallback (none without a fallback)."""
    fallback = fallback_of(correct, val_loss)
    if fallback is None:
        return {}
    return {n: paired_test(correct[n], correct[fallback]) for n in POLICY_CANDIDATES if n in correct}


def guard_choice(correct: dict[str, np.ndarray], val_loss: dict[str, float]) -> str:
    """The candidate to keep, from the repaired candidates' per-image validation correctness and
    validation loss (keys: a subset of GUARD_CANDIDATES)."""
    names = [n for n in GUARD_CANDIDATES if n in correct]
    if not names:
        raise ValueError("guard_choice needs at least one candidate")
    fallback = fallback_of(correct, val_loss)
    if fallback is None:
        return _ranked(names, correct, val_loss)
    passed = [n for n, t in versus_fallback(correct, val_loss).items() if t.p_value < SIGNIFICANCE]
    return _ranked(passed, correct, val_loss) if passed else fallback
