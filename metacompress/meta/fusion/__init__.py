"""Model fusion: merge the weights of several models of one architecture into one model.

Methods are objects registered by name (``REGISTRY``), each declaring its parameters; ``fuse``
looks one up, checks the user's parameters against its declarations, and merges:

- ``uniform``: the element-wise mean (Wortsman et al. 2022, "model soups"); ``greedy``: models
  join the soup, best held-out score first, only if the soup's score does not drop (``soups``).
- ``task-arithmetic``, ``ties``, ``dare``: a base plus merged task vectors (``task_vectors``).
- ``fisher``: a per-entry average weighted by each model's diagonal Fisher (``fisher``).

The merge functions (``uniform_soup``, ``ties_merge``, ...) are usable on their own; ``measure``
holds the helpers that run a model with given weights on data (accuracy, BN statistics, Fisher),
``checks`` the compatibility check and the entry rules all methods share. Adding a method is
one ``MergeMethod`` subclass and ``@register`` (see ``base``). This package is part of the
reusable meta-learning core: it depends on torch only.
"""

# The method modules register in import order, the order the CLI lists the methods in.
from metacompress.meta.fusion.soups import GreedySoup, UniformSoup, greedy_soup, uniform_soup

# isort: split
from metacompress.meta.fusion.task_vectors import (
    DARE_MERGES,
    Dare,
    TaskArithmetic,
    Ties,
    dare,
    elect_and_merge,
    task_arithmetic,
    ties_merge,
    trim,
)

# isort: split
from metacompress.meta.fusion.fisher import FisherMerge, fisher_merge

# isort: split
from metacompress.meta.fusion.base import (
    REGISTRY,
    FusionData,
    MergeContext,
    MergeMethod,
    Param,
    StateDict,
    declared_params,
    lookup,
    method_names,
    register,
)
from metacompress.meta.fusion.checks import check_compatible
from metacompress.meta.fusion.fuse import fuse
from metacompress.meta.fusion.measure import estimate_fisher, mean_loss, recompute_bn, state_dict_accuracy

__all__ = [
    "DARE_MERGES", "REGISTRY", "Dare", "FisherMerge", "FusionData", "GreedySoup", "MergeContext", "MergeMethod",
    "Param", "StateDict", "TaskArithmetic", "Ties", "UniformSoup", "check_compatible", "dare", "declared_params",
    "elect_and_merge", "estimate_fisher", "fisher_merge", "fuse", "greedy_soup", "lookup",
    "mean_loss", "method_names", "recompute_bn", "register", "state_dict_accuracy", "task_arithmetic",
    "ties_merge", "trim", "uniform_soup",
]
