"""Antithetic evolution strategies over a flat float vector (Salimans et al., 2017).

Generic black-box ascent: nothing here knows what the vector means (the compression policy
uses it for its network's weights, where the reward is accuracy after pruning and repair, which
has no gradient). Antithetic pairs ``theta +- sigma * eps`` and centered-rank fitness shaping
make the gradient estimate low-variance and invariant to the reward's scale; Adam takes the step.

Usage::

    es = ES(theta0, sigma=0.1, lr=0.05, population=16, seed=0)
    for _ in range(steps):
        rewards = [reward(v) for v in es.ask()]
        metrics = es.tell(rewards)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from metacompress.meta.errors import UserError


def centered_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of ``x`` mapped linearly onto [-0.5, 0.5] (ties broken by position)."""
    ranks = torch.empty_like(x)
    ranks[torch.argsort(x)] = torch.arange(len(x), dtype=x.dtype)
    return ranks / (len(x) - 1) - 0.5


class ES:
    """Antithetic ES with rank shaping and an Adam (or SGD) update that *ascends* the reward.

    ``theta0`` is an int (start at zeros of that size) or an initial vector (numpy or torch).
    ``ask()`` returns ``population`` vectors in the caller's type (numpy in, numpy out), as
    antithetic pairs ``[+eps_1, -eps_1, +eps_2, -eps_2, ...]``; ``tell(rewards)`` takes the
    rewards in the same order. State is plain tensors and numbers (``weights_only`` safe).
    """

    def __init__(self, theta0: int | Sequence[float] | np.ndarray | torch.Tensor, sigma: float = 0.1,
                 lr: float = 0.01, population: int = 16, seed: int = 0, rank_shaping: bool = True,
                 optimizer: str = "adam", betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if population < 2 or population % 2:
            raise UserError(f"population must be a positive even number (antithetic pairs), got {population}")
        if sigma <= 0 or lr <= 0:
            raise UserError(f"sigma and lr must be positive, got sigma={sigma}, lr={lr}")
        if optimizer not in ("adam", "sgd"):
            raise UserError(f"optimizer must be adam or sgd, got {optimizer!r}")
        self._numpy = isinstance(theta0, np.ndarray)
        if isinstance(theta0, int):
            if theta0 <= 0:
                raise UserError(f"dimension must be positive, got {theta0}")
            theta = torch.zeros(theta0, dtype=torch.float64)
        else:
            theta = torch.as_tensor(np.asarray(theta0) if self._numpy else theta0).detach().double().flatten().clone()
        self._theta = theta
        self.sigma, self.lr, self.population = float(sigma), float(lr), population
        self.rank_shaping, self.optimizer = rank_shaping, optimizer
        self.betas, self.eps = betas, eps
        self._gen = torch.Generator().manual_seed(seed)
        self._m = torch.zeros_like(theta)
        self._v = torch.zeros_like(theta)
        self._t = 0
        self._noise: torch.Tensor | None = None

    @property
    def theta(self) -> np.ndarray | torch.Tensor:
        """The current mean vector, in the type it was given (float32 for torch)."""
        return self._out(self._theta)

    def _out(self, v: torch.Tensor) -> np.ndarray | torch.Tensor:
        return v.numpy().copy() if self._numpy else v.float()

    def ask(self) -> list[np.ndarray | torch.Tensor]:
        """Draw ``population / 2`` noise vectors; return the perturbed vectors in antithetic pairs."""
        half = torch.randn(self.population // 2, len(self._theta), generator=self._gen, dtype=torch.float64)
        self._noise = half
        out = []
        for e in half:
            out += [self._out(self._theta + self.sigma * e), self._out(self._theta - self.sigma * e)]
        return out

    def tell(self, rewards: Sequence[float] | np.ndarray | torch.Tensor) -> dict[str, float]:
        """Update ``theta`` from the rewards of the last ``ask()``; returns reward and step metrics."""
        if self._noise is None:
            raise UserError("tell() needs a preceding ask()")
        r = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
        if r.shape != (self.population,):
            raise UserError(f"expected {self.population} rewards, got shape {tuple(r.shape)}")
        if not torch.isfinite(r).all():
            raise UserError("rewards must be finite")
        f = centered_ranks(r) if self.rank_shaping else r
        diff = f[0::2] - f[1::2]  # antithetic: (f(+eps) - f(-eps)) per pair
        g = (diff[:, None] * self._noise).sum(0) / (self.population * self.sigma)
        step = self._adam(g) if self.optimizer == "adam" else self.lr * g
        self._theta = self._theta + step
        self._noise = None
        return {"reward_mean": float(r.mean()), "reward_max": float(r.max()),
                "grad_norm": float(g.norm()), "step_norm": float(step.norm())}

    def _adam(self, g: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        self._t += 1
        self._m = b1 * self._m + (1 - b1) * g
        self._v = b2 * self._v + (1 - b2) * g * g
        m_hat = self._m / (1 - b1 ** self._t)
        v_hat = self._v / (1 - b2 ** self._t)
        return self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit, including the noise generator's state."""
        return {"theta": self._theta.clone(), "m": self._m.clone(), "v": self._v.clone(), "t": self._t,
                "sigma": self.sigma, "lr": self.lr, "population": self.population,
                "rng": self._gen.get_state().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["population"]) != self.population or len(state["theta"]) != len(self._theta):
            raise UserError("ES state does not match this population size or dimension")
        self._theta = state["theta"].double().clone()
        self._m, self._v = state["m"].double().clone(), state["v"].double().clone()
        self._t = int(state["t"])
        self.sigma, self.lr = float(state["sigma"]), float(state["lr"])
        self._gen.set_state(state["rng"])
        self._noise = None
