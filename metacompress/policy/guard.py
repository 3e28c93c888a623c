"""The guard's choice among repaired candidates: what ``compress`` keeps when the policy allocates,
and the ``meta+guard`` column of ``policy eval`` (one rule, so the two cannot drift apart).

Candidates, in order of preference: the policy's allocation with its repair settings, the same
allocation with the default settings, the uniform allocation with the default settings. The
policy wins on average, but on a family it has not seen its repair settings can diverge or its
allocation can trail uniform (BENCHMARKS.md).

Uniform is the fallback: another candidate replaces it only when a paired test on the validation
split says it is better: on the images where the two disagree, the candidate must be right more
often than a fair coin would be at the SIGNIFICANCE level (one-sided exact sign test, i.e.
McNemar's test). Why a test and not a fixed margin: the noise of a difference depends on how
many images the two models disagree on, which is large after a short repair and small after a
generous one, and a choice that trails uniform is the mistake the guard exists to prevent.
Among the candidates that pass: highest validation accuracy, then lowest validation loss, then
the order above.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

GUARD_CANDIDATES = ("policy", "policy-allocation", "uniform")
FALLBACK = "uniform"
SIGNIFICANCE = 0.1  # one-sided level of the sign test against uniform (chosen on the meta-training tasks: BENCHMARKS.md)


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


def versus_fallback(correct: dict[str, np.ndarray]) -> dict[str, Paired]:
    """Each candidate's paired test against the fallback (none when the fallback was not tried)."""
    if FALLBACK not in correct:
        return {}
    return {n: paired_test(correct[n], correct[FALLBACK]) for n in GUARD_CANDIDATES if n in correct and n != FALLBACK}


def guard_choice(correct: dict[str, np.ndarray], val_loss: dict[str, float]) -> str:
    """The candidate to keep, from the repaired candidates' per-image validation correctness and
    validation loss (keys: a subset of GUARD_CANDIDATES, in that order)."""
    names = [n for n in GUARD_CANDIDATES if n in correct]
    if not names:
        raise ValueError("guard_choice needs at least one candidate")
    accuracy = {n: float(np.mean(correct[n])) for n in names}
    if FALLBACK in correct:
        passed = [n for n, t in versus_fallback(correct).items() if t.p_value < SIGNIFICANCE]
        if not passed:
            return FALLBACK
    else:
        passed = names
    # max() keeps the first of equals: candidate order breaks exact ties
    return max(passed, key=lambda n: (accuracy[n], -val_loss[n]))
