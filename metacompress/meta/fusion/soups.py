"""Model soups (Wortsman et al. 2022): the mean of models, and the greedy soup that keeps only helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from metacompress.meta.fusion.base import MergeContext, MergeMethod, StateDict, register
from metacompress.meta.fusion.checks import check_compatible, mean
from metacompress.meta.fusion.measure import mean_loss, state_dict_accuracy

Score = float | tuple[float, ...]


def uniform_soup(state_dicts: Sequence[StateDict]) -> dict[str, Tensor]:
    """The element-wise mean of the float entries; non-float entries from the first model."""
    check_compatible(state_dicts)
    first = state_dicts[0]
    return {k: mean([sd[k] for sd in state_dicts]) if v.is_floating_point() else v.clone()
            for k, v in first.items()}


def greedy_soup(
    state_dicts: Sequence[StateDict],
    evaluate: Callable[[dict[str, Tensor]], Score],
    *,
    prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> tuple[dict[str, Tensor], list[int]]:
    """Greedy soup (Wortsman et al. 2022): returns the soup and the indices of its ingredients.

    Models are ranked by their own held-out score (``evaluate``, higher is better; ties keep the
    given order); starting from the best, each next model joins only if the uniform soup with it
    scores at least as well as the soup without it. So the soup never scores below the best
    single model on the held-out data, and models that would hurt (e.g. from another basin) stay
    out. A score may be a tuple, compared in order: ``fuse`` uses (accuracy, -loss), so that on a
    small held-out set, where accuracies tie often, a tie admits a model only if the loss does
    not get worse. ``prepare`` transforms every candidate before it is scored, and the returned
    soup too; typically it recomputes BatchNorm statistics, which averaging leaves stale.
    """
    check_compatible(state_dicts)

    def prepared(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return prepare(sd) if prepare is not None else sd

    def scored(sd: dict[str, Tensor]) -> Score:
        v = evaluate(sd)
        return tuple(float(x) for x in v) if isinstance(v, tuple) else float(v)

    candidates = [prepared(dict(sd)) for sd in state_dicts]
    scores = [scored(c) for c in candidates]
    order = sorted(range(len(state_dicts)), key=lambda i: scores[i], reverse=True)  # stable: ties keep order
    ingredients = [order[0]]
    soup, best = candidates[order[0]], scores[order[0]]
    for i in order[1:]:
        trial = prepared(uniform_soup([state_dicts[j] for j in [*ingredients, i]]))
        score = scored(trial)
        if score >= best:
            ingredients.append(i)
            soup, best = trial, score
    return soup, ingredients


@register
class UniformSoup(MergeMethod):
    name = "uniform"
    summary = "The element-wise mean of the models."

    def merge(self, ctx: MergeContext) -> dict[str, Tensor]:
        return uniform_soup(ctx.state_dicts)


@register
class GreedySoup(MergeMethod):
    name = "greedy"
    summary = "Models join the soup, best first, only if validation (accuracy, -loss) does not drop."
    needs_data = "held-out scores"
    prepares = True

    def merge(self, ctx: MergeContext) -> dict[str, Tensor]:
        model, d = ctx.model, ctx.data

        def score(sd: dict[str, Tensor]) -> Score:
            return state_dict_accuracy(model, sd, d.x_val, d.y_val), -mean_loss(model, sd, d.x_val, d.y_val)

        fused, ingredients = greedy_soup(ctx.state_dicts, score, prepare=ctx.prepare)
        ctx.report["ingredients"] = [ctx.labels[i] for i in ingredients]
        return fused
