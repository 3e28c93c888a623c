"""The policy network: group descriptors + budget + repair regime -> ratios and repair settings.

A small set network (DeepSets): a shared per-group MLP embeds each group with the budget and
regime; the mean embedding is the model's context. The allocation head scores each group from
its embedding and the context, plus a mixture (weights per budget and regime) of the experts'
ratios in logit space: three fixed rules and the sensitivity allocation of ``probes``. Ratios
are ``r_max * sigmoid(score + c)`` with the scalar ``c`` found by bisection so that the pruned
model meets the budget (``PruningSpace.project``). The repair head maps the context to
multiplicative corrections of the default repair settings. (In the shipped policy the mixture
is the sensitivity expert alone and the per-group head is zero: ``anchored``, and
recipes/policy-default-stage2.yaml for why.)

All weights live in one flat vector, because evolution strategies train it: with zero output
weights the policy *is* the uniform allocation with the default repair, which is where
meta-training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from metacompress.compress.distill import RepairConfig
from metacompress.compress.prune import MAX_RATIO
from metacompress.errors import UserError
from metacompress.policy.features import NUM_FEATURES, fold_unseen_kinds

REGIMES = ("bn", "short", "few", "generous")
EXPERT_RULES = ("global-magnitude", "global-taylor", "lamp", "sensitivity")  # allocations the policy can lean on
HIDDEN = 8
N_CONTEXT = 1 + len(REGIMES)  # budget + regime one-hot
N_REPAIR = 4                  # log lr, log temperature, alpha logit, log2 BN-recalibration size


def regime_of(cfg: RepairConfig) -> str:
    """The regime a repair configuration falls in (what the policy conditions on)."""
    if cfg.steps == 0:
        return "bn"
    if cfg.samples_per_class is not None:
        return "few"
    return "short" if cfg.steps <= 60 else "generous"


@dataclass(frozen=True)
class Shapes:
    """Where each weight matrix sits in the flat parameter vector."""

    @staticmethod
    def layout() -> list[tuple[str, tuple[int, ...]]]:
        d_in = NUM_FEATURES + N_CONTEXT
        return [
            ("w1", (d_in, HIDDEN)), ("b1", (HIDDEN,)),
            ("w2", (2 * HIDDEN, 1)), ("b2", (1,)),
            ("wr", (HIDDEN + N_CONTEXT, N_REPAIR)), ("br", (N_REPAIR,)),
            ("wm", (N_CONTEXT, len(EXPERT_RULES))),
        ]

    @staticmethod
    def size() -> int:
        return sum(math.prod(s) for _, s in Shapes.layout())


def init_params(seed: int = 0) -> np.ndarray:
    """Random embedding, zero heads: the initial policy is uniform allocation + default repair."""
    rng = np.random.default_rng(seed)
    parts = []
    for name, shape in Shapes.layout():
        if name == "w1":
            parts.append(rng.normal(0, 1 / math.sqrt(shape[0]), size=shape).ravel())
        else:
            parts.append(np.zeros(math.prod(shape)))
    return np.concatenate(parts)


def anchored(theta: np.ndarray, expert: str) -> np.ndarray:
    """``theta`` with its allocation replaced by one expert's: the per-group head zeroed, mixture
    weight 1 on ``expert`` in every regime and 0 on the others. The embedding, and with it the
    repair settings, are untouched.

    Why: ES fits a learned mixture to the few families it trains on. On unseen task seeds of
    those same families, the sensitivity expert alone gave 1.3 points over LAMP and two learned
    mixtures 0.25 and 0.94 (BENCHMARKS.md). Stage 2 therefore starts at the expert, and keeps what ES
    learns from there only if it wins on those selection tasks.
    """
    if expert not in EXPERT_RULES:
        raise UserError(f"unknown expert {expert!r}; known: {', '.join(EXPERT_RULES)}")
    out = np.array(theta, dtype=np.float64)
    blocks = _unpack(out)  # views into out
    blocks["w2"][:] = 0.0
    blocks["b2"][:] = 0.0
    blocks["wm"][:] = 0.0
    blocks["wm"][1:, EXPERT_RULES.index(expert)] = 1.0  # row 0 is the budget, the others the regime one-hot
    return out


def _unpack(theta: np.ndarray) -> dict[str, np.ndarray]:
    if theta.shape != (Shapes.size(),):
        raise UserError(f"policy weights have {theta.size} values; this version expects {Shapes.size()}")
    out, i = {}, 0
    for name, shape in Shapes.layout():
        n = math.prod(shape)
        out[name] = theta[i:i + n].reshape(shape)
        i += n
    return out


@dataclass
class Decision:
    """What the policy decides for one task: group scores (for the allocation) and repair settings."""

    scores: np.ndarray
    repair: RepairConfig

    def ratio_fn(self):
        """Allocation for ``PruningSpace.project``: scale in [0, 1] sweeps the offset c."""
        s = self.scores

        def ratios(scale: float) -> Sequence[float]:
            c = -8.0 + 16.0 * scale
            return list(MAX_RATIO / (1.0 + np.exp(-(s + c))))

        return ratios


def decide(theta: np.ndarray, features: np.ndarray, budget: float, base: RepairConfig,
           expert_ratios: np.ndarray | None = None, kinds_seen: tuple[str, ...] | None = None) -> Decision:
    """Run the policy on one model's group features for a budget and a base repair config.

    ``expert_ratios`` (groups x EXPERT_RULES) are the experts' allocations at this budget (the
    fixed rules' and the loss curves' sensitivity allocation).
    The policy may lean on them, with weights that depend on the budget and the regime: which
    rule wins changes from regime to regime, and learning that is cheap for ES (a few weights
    with large effects), while the per-group network corrects what no rule gets right.
    ``kinds_seen``: the group kinds the policy met in meta-training; others are shown as the
    closest kind it met (``fold_unseen_kinds``).
    """
    p = _unpack(np.asarray(theta, dtype=np.float64))
    features = fold_unseen_kinds(features, kinds_seen)
    regime = regime_of(base)
    ctx = np.array([budget] + [1.0 if r == regime else 0.0 for r in REGIMES])
    x = np.concatenate([features, np.repeat(ctx[None], len(features), 0)], axis=1)
    h = np.tanh(x @ p["w1"] + p["b1"])
    pooled = h.mean(0)
    scores = (np.concatenate([h, np.repeat(pooled[None], len(h), 0)], axis=1) @ p["w2"] + p["b2"]).ravel()
    if expert_ratios is not None:
        q = np.clip(np.asarray(expert_ratios, dtype=np.float64) / MAX_RATIO, 0.02, 0.98)
        scores = scores + (np.log(q / (1 - q)) @ (ctx @ p["wm"])).ravel()
    r = np.concatenate([pooled, ctx]) @ p["wr"] + p["br"]
    r = np.clip(r, -3.0, 3.0)
    alpha_logit = math.log(base.alpha / (1 - base.alpha)) if 0 < base.alpha < 1 else 0.0
    repair = replace(
        base,
        lr=float(base.lr * math.exp(r[0])),
        temperature=float(np.clip(base.temperature * math.exp(0.5 * r[1]), 0.5, 16.0)),
        alpha=float(1 / (1 + math.exp(-(alpha_logit + r[2])))),
        bn_samples=int(np.clip(round(base.bn_samples * 2 ** r[3]), 64, 4096)),
    )
    return Decision(scores=scores, repair=repair)
