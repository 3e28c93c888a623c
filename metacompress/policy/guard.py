"""The guard's choice among repaired candidates: what ``compress`` keeps when the policy allocates,
and the ``meta+guard`` column of ``policy eval`` (one rule, so the two cannot drift apart).

Candidates, in order of preference: the policy's allocation with its repair settings, the same
allocation with the default settings, the uniform allocation with the default settings. The
policy wins on average, but on a family it has not seen its repair settings can diverge or its
allocation can trail uniform (BENCHMARKS.md).

Uniform is the fallback: another candidate replaces it only when it is right on more than one
validation sample more. Why: on a validation split of ~150 images one image is noise, and a
choice that trails uniform is the mistake the guard exists to prevent. Among the candidates
that clear the margin: highest validation accuracy, then lowest validation loss (accuracy ties
are common on small splits; the soup breaks them the same way), then the order above.
"""

from __future__ import annotations

GUARD_CANDIDATES = ("policy", "policy-allocation", "uniform")
FALLBACK = "uniform"


def guard_choice(val_accuracy: dict[str, float], val_loss: dict[str, float], n_val: int) -> str:
    """The candidate to keep, from the repaired candidates' validation accuracy and loss
    (keys: a subset of GUARD_CANDIDATES, in that order; ``n_val``: validation samples)."""
    names = [n for n in GUARD_CANDIDATES if n in val_accuracy]
    if not names:
        raise ValueError("guard_choice needs at least one candidate")
    floor = val_accuracy[FALLBACK] + 1.0 / max(1, n_val) if FALLBACK in val_accuracy else float("-inf")
    passed = [n for n in names if n != FALLBACK and val_accuracy[n] > floor + 1e-9]
    if not passed:
        return FALLBACK if FALLBACK in val_accuracy else names[0]
    # max() keeps the first of equals: candidate order breaks exact ties
    return max(passed, key=lambda n: (val_accuracy[n], -val_loss[n]))
