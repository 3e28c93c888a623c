"""Model fusion (metacompress.meta.fusion) and the ``fuse`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import metacompress.cli.main  # noqa: F401  (registers the commands)
from metacompress.cli.app import app
from metacompress.errors import UserError
from metacompress.meta.fusion import (
    REGISTRY,
    FusionData,
    MergeContext,
    MergeMethod,
    Param,
    check_compatible,
    dare,
    elect_and_merge,
    estimate_fisher,
    fisher_merge,
    fuse,
    greedy_soup,
    lookup,
    method_names,
    recompute_bn,
    register,
    state_dict_accuracy,
    task_arithmetic,
    ties_merge,
    trim,
    uniform_soup,
)
from metacompress.zoo import build_model

torch.set_num_threads(1)


def _sd(seed: int, shape=(4, 3)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(shape, generator=g),
        "b": torch.randn(shape[0], generator=g),
        "bn.running_mean": torch.randn(shape[0], generator=g),
        "bn.running_var": torch.rand(shape[0], generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.long),
    }


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


# ----------------------------------------------------------------------------- compatibility


def test_check_compatible_names_every_mismatch_in_one_line():
    a = _sd(0)
    b = dict(_sd(1))
    del b["b"]
    b["extra"] = torch.zeros(1)
    b["w"] = torch.zeros(4, 5)
    b["bn.running_mean"] = b["bn.running_mean"].double()
    with pytest.raises(UserError) as err:
        check_compatible([a, a, b], names=["a.pt", "a2.pt", "b.pt"])
    msg = str(err.value)
    assert "\n" not in msg
    assert "b.pt vs a.pt" in msg and "a2.pt" not in msg
    assert "missing keys b" in msg
    assert "unexpected keys extra" in msg
    assert "w (4, 5) vs (4, 3)" in msg
    assert "bn.running_mean float64 vs float32" in msg


def test_check_compatible_rejects_empty_and_non_tensors():
    with pytest.raises(UserError, match="no models"):
        check_compatible([])
    with pytest.raises(UserError, match="non-tensor entries: step"):
        check_compatible([{"w": torch.zeros(1), "step": 3}])


def test_every_method_checks_compatibility():
    a, b = _sd(0), _sd(1, shape=(4, 2))
    for merge in (lambda: uniform_soup([a, b]), lambda: task_arithmetic(a, [b], 1.0),
                  lambda: ties_merge(a, [b], 0.5), lambda: dare(a, [b], 0.5),
                  lambda: fisher_merge([a, b], [{}, {}]), lambda: greedy_soup([a, b], lambda sd: 0.0)):
        with pytest.raises(UserError, match=r"shape differs for w \(4, 2\) vs \(4, 3\)"):
            merge()


# ----------------------------------------------------------------------------- soups


def test_merging_identical_models_returns_that_model():
    m = _sd(3)
    assert _equal(uniform_soup([m, m, m]), m)
    assert _equal(greedy_soup([m, m], lambda sd: 1.0)[0], m)
    assert _equal(task_arithmetic(m, [m, m], 0.7), m)
    assert _equal(ties_merge(m, [m, m], 0.3), m)
    assert _equal(dare(m, [m, m], 0.9, merge="ties"), m)
    fishers = [{"w": torch.rand(4, 3), "b": torch.rand(4)} for _ in range(3)]
    assert _equal(fisher_merge([m, m, m], fishers), m)


def test_uniform_soup_is_the_manual_average_and_keeps_non_floats_of_the_first():
    a, b = _sd(0), _sd(1)
    soup = uniform_soup([a, b])
    for k in ("w", "b", "bn.running_mean", "bn.running_var"):
        assert torch.equal(soup[k], ((a[k].double() + b[k].double()) / 2).float())
    assert soup["bn.num_batches_tracked"].item() == 0
    # four models with dyadic values: every sum is exact, so the mean is too
    sds = [{"w": torch.tensor([i * 0.25, -i * 1.5]), "n": torch.tensor([i])} for i in range(1, 5)]
    assert torch.equal(uniform_soup(sds)["w"], torch.tensor([0.625, -3.75]))
    assert torch.equal(uniform_soup(sds)["n"], torch.tensor([1]))


def test_uniform_soup_keeps_half_precision():
    sds = [{"w": torch.tensor([1.0, 2.0], dtype=torch.float16) * i} for i in (1, 3)]
    out = uniform_soup(sds)["w"]
    assert out.dtype == torch.float16 and torch.equal(out, torch.tensor([2.0, 4.0], dtype=torch.float16))


def test_greedy_soup_adds_only_what_does_not_hurt():
    sds = [{"w": torch.tensor([v])} for v in (10.0, 0.0, 1.0)]
    calls = []

    def evaluate(sd):
        calls.append(sd["w"].item())
        return -abs(sd["w"].item() - 0.5)

    soup, ingredients = greedy_soup(sds, evaluate)
    # individual scores -9.5, -0.5, -0.5: ties keep the given order, so 1 then 2; adding 0 hurts
    assert ingredients == [1, 2]
    assert soup["w"].item() == 0.5
    assert calls == [10.0, 0.0, 1.0, 0.5, torch.tensor(11.0 / 3.0).item()]


def test_greedy_soup_breaks_accuracy_ties_by_the_second_score():
    """fuse scores (accuracy, -loss): a model that ties on accuracy joins only if the loss does not rise."""
    sds = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 3.0)]

    def evaluate(sd):  # the same "accuracy" everywhere; loss grows with w
        return (0.9, -sd["w"].item())

    soup, ingredients = greedy_soup(sds, evaluate)
    assert ingredients == [0] and soup["w"].item() == 0.0  # every average has a higher loss than w=0
    sds = [{"w": torch.tensor([v])} for v in (0.0, 2.0, 5.0)]
    soup, ingredients = greedy_soup(sds, lambda sd: (0.9, -abs(sd["w"].item() - 1.0)))
    assert ingredients == [0, 1] and soup["w"].item() == 1.0  # the pair's average has the lowest loss


def test_fuse_greedy_on_a_model_prefers_lower_validation_loss_on_ties():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    good["weight"] = torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    good["bias"] = torch.zeros(2)
    sharp = {k: v * 10 for k, v in good.items()}  # same predictions, lower loss
    fused, report = fuse("greedy", [good, sharp], model=model, data=FusionData(x, y, x, y))
    assert report["ingredients"] == ["model 1"]  # equal accuracy; the sharper model wins on loss alone
    assert torch.equal(fused["weight"], sharp["weight"])


def test_greedy_soup_never_scores_below_the_best_single_model():
    sds = [_sd(s) for s in range(5)]
    target = _sd(2)["w"] * 0.8

    def evaluate(sd):
        return -float((sd["w"] - target).abs().sum())

    soup, ingredients = greedy_soup(sds, evaluate)
    assert ingredients[0] == 2
    assert evaluate(soup) >= max(evaluate(sd) for sd in sds)
    assert _equal(soup, uniform_soup([sds[i] for i in ingredients]))


def test_greedy_soup_scores_and_returns_prepared_candidates():
    sds = [{"w": torch.tensor([v]), "s": torch.tensor([0.0])} for v in (1.0, 3.0)]

    def prepare(sd):
        return {**sd, "s": sd["w"] * 10}

    seen = []
    soup, ingredients = greedy_soup(sds, lambda sd: seen.append(sd["s"].item()) or 1.0, prepare=prepare)
    assert seen == [10.0, 30.0, 20.0]
    assert ingredients == [0, 1] and soup["s"].item() == 20.0 and soup["w"].item() == 2.0


# ----------------------------------------------------------------------------- task vectors


def test_task_arithmetic_is_base_plus_scaled_sum_of_task_vectors():
    base = {"w": torch.tensor([1.0, 2.0, 3.0]), "bn.running_var": torch.tensor([1.0]),
            "n": torch.tensor([7])}
    a = {"w": torch.tensor([2.0, 2.0, 1.0]), "bn.running_var": torch.tensor([3.0]), "n": torch.tensor([1])}
    b = {"w": torch.tensor([1.5, 4.0, 3.0]), "bn.running_var": torch.tensor([5.0]), "n": torch.tensor([2])}
    out = task_arithmetic(base, [a, b], 0.5)
    assert torch.equal(out["w"], torch.tensor([1.75, 3.0, 2.0]))
    assert torch.equal(out["bn.running_var"], torch.tensor([4.0]))  # BN statistics: averaged
    assert torch.equal(out["n"], torch.tensor([7]))  # non-float: from the base
    assert torch.equal(task_arithmetic(base, [a], 1.0)["w"], a["w"])
    assert torch.equal(task_arithmetic(base, [a], 0.0)["w"], base["w"])


def test_trim_keeps_exactly_the_density_largest_magnitudes():
    d = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0, -1.0, 0.05, 3.0])
    kept = trim(d, 0.3)
    assert torch.equal(kept, torch.tensor([0.0, -5.0, 0, 0, 0, 0, 4.0, 0, 0, 3.0]))
    for density in (0.1, 0.25, 0.5, 0.75, 0.9):
        x = torch.randn(40, 10, generator=torch.Generator().manual_seed(1))
        t = trim(x, density)
        keep = round(density * x.numel())
        assert int((t != 0).sum()) == keep
        assert t.abs().max() == x.abs().max()
        assert t[t != 0].abs().min() >= x[t == 0].abs().max()
        assert torch.equal(t[t != 0], x[t != 0])
    assert int((trim(torch.ones(3), 0.01) != 0).sum()) == 1  # at least one entry survives
    assert torch.equal(trim(torch.ones(4), 0.5), torch.tensor([1.0, 1.0, 0.0, 0.0]))  # ties: first win


def test_sign_election_and_disjoint_mean():
    deltas = torch.tensor([[3.0, -1.0, 2.0, 0.0, 1.0],
                           [-1.0, -2.0, 2.0, 5.0, -1.0],
                           [-1.0, 1.0, -5.0, 0.0, 0.0]])
    # column sums 1, -2, -1, 5, 0 -> signs +, -, -, +, none
    assert torch.equal(elect_and_merge(deltas), torch.tensor([3.0, -1.5, -5.0, 5.0, 0.0]))


def test_ties_merge_trims_elects_and_scales():
    base = {"w": torch.zeros(4), "n": torch.tensor([3])}
    a = {"w": torch.tensor([4.0, -3.0, 0.5, 0.1]), "n": torch.tensor([0])}  # keeps 4, -3
    b = {"w": torch.tensor([-2.0, 0.2, 6.0, 0.3]), "n": torch.tensor([0])}  # keeps -2, 6
    c = {"w": torch.tensor([1.0, -0.1, -0.2, 2.0]), "n": torch.tensor([0])}  # keeps 1, 2
    out = ties_merge(base, [a, b, c], density=0.5, lam=2.0)
    # trimmed: [4,-3,0,0], [-2,0,6,0], [1,0,0,2]; sums 3,-3,6,2 -> +,-,+,+; means 2.5,-3,6,2
    assert torch.equal(out["w"], torch.tensor([5.0, -6.0, 12.0, 4.0]))
    assert torch.equal(out["n"], torch.tensor([3]))


def test_ties_merge_result_is_sparse_task_vector_with_elected_signs():
    base = _sd(0, shape=(30, 20))
    fts = [_sd(s, shape=(30, 20)) for s in (1, 2, 3)]
    out = ties_merge(base, fts, density=0.2)
    delta = out["w"] - base["w"]
    trimmed = torch.stack([trim(f["w"] - base["w"], 0.2) for f in fts])
    elected = torch.sign(trimmed.sum(0))
    nonzero = delta.abs() > 1e-6
    assert int(nonzero.sum()) <= 3 * round(0.2 * 600)
    assert torch.equal(torch.sign(delta[nonzero]), elected[nonzero])


def test_dare_drops_with_probability_p_and_rescales_survivors():
    base = {"w": torch.zeros(200, 100)}
    ft = {"w": torch.full((200, 100), 3.0)}
    out = dare(base, [ft], p=0.5, seed=1)["w"]
    values = set(out.unique().tolist())
    assert values == {0.0, 6.0}  # dropped, or kept and rescaled by exactly 1/(1-p)
    assert abs(float((out == 0).float().mean()) - 0.5) < 0.02
    assert abs(float(out.mean()) - 3.0) < 0.06  # the expected task vector is preserved
    high = dare(base, [ft], p=0.9, seed=1)["w"]
    assert abs(float((high == 0).float().mean()) - 0.9) < 0.02
    assert torch.allclose(high[high != 0], torch.tensor(30.0))


def test_dare_is_deterministic_under_its_seed():
    base, fts = _sd(0, (50, 20)), [_sd(1, (50, 20)), _sd(2, (50, 20))]
    assert _equal(dare(base, fts, 0.7, seed=4), dare(base, fts, 0.7, seed=4))
    assert not torch.equal(dare(base, fts, 0.7, seed=4)["w"], dare(base, fts, 0.7, seed=5)["w"])


def test_dare_average_and_ties_merges():
    base = {"w": torch.zeros(1000)}
    a = {"w": torch.full((1000,), 1.0)}
    b = {"w": torch.full((1000,), -1.0)}
    avg = dare(base, [a, b], 0.5, seed=0, merge="average", lam=2.0)["w"]
    # each entry: lam * (a' + b') / 2 with a' in {0, 2}, b' in {0, -2}
    assert set(avg.unique().tolist()) == {-2.0, 0.0, 2.0}
    ties = dare(base, [a, b], 0.5, seed=0, merge="ties")["w"]
    # disjoint mean: where both survive signs cancel in the election (0), else the survivor's 2 or -2
    assert set(ties.unique().tolist()) == {-2.0, 0.0, 2.0}
    trimmed = dare(base, [a, {"w": torch.linspace(0.1, 1, 1000)}], 0.5, merge="ties", density=0.1)["w"]
    assert int((trimmed != 0).sum()) <= 200


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_fractions_outside_the_open_unit_interval_are_rejected(bad):
    base, fts = _sd(0), [_sd(1)]
    with pytest.raises(UserError, match="density must be in"):
        ties_merge(base, fts, bad)
    with pytest.raises(UserError, match="p must be in"):
        dare(base, fts, bad)
    with pytest.raises(UserError, match="density must be in"):
        dare(base, fts, 0.5, merge="ties", density=bad)


def test_task_vector_methods_reject_bad_arguments():
    base = _sd(0)
    with pytest.raises(UserError, match="no fine-tuned models"):
        task_arithmetic(base, [], 1.0)
    with pytest.raises(UserError, match="lambda must be a finite number"):
        task_arithmetic(base, [base], float("inf"))
    with pytest.raises(UserError, match="DARE merge must be one of"):
        dare(base, [base], 0.5, merge="sum")
    with pytest.raises(UserError, match="density applies to DARE only with merge 'ties'"):
        dare(base, [base], 0.5, density=0.5)


# ----------------------------------------------------------------------------- Fisher


def test_fisher_merge_with_equal_fishers_is_the_average():
    a, b = _sd(0), _sd(1)
    f = {"w": torch.rand(4, 3) + 0.1, "b": torch.rand(4)}
    out = fisher_merge([a, b], [f, f])
    assert _equal(out, uniform_soup([a, b]))
    sds = [_sd(s) for s in range(3)]
    out3 = fisher_merge(sds, [f] * 3)
    soup = uniform_soup(sds)
    for k in out3:
        torch.testing.assert_close(out3[k], soup[k], rtol=0, atol=1e-7)


def test_fisher_merge_follows_the_confident_model():
    a, b = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}
    fa, fb = {"w": torch.tensor([1e6, 1.0])}, {"w": torch.tensor([1.0, 3.0])}
    out = fisher_merge([a, b], [fa, fb])["w"]
    assert abs(out[0].item() - 1e-6) < 1e-9 and out[1].item() == 0.75


def test_fisher_merge_model_weights():
    a, b = _sd(0), _sd(1)
    f = {"w": torch.rand(4, 3), "b": torch.rand(4)}
    only_a = fisher_merge([a, b], [f, f], weights=[1.0, 0.0])
    assert torch.equal(only_a["w"], a["w"]) and torch.equal(only_a["b"], a["b"])
    assert _equal(fisher_merge([a, b], [f, f], weights=[3.0, 3.0]), fisher_merge([a, b], [f, f]))
    x, y = {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}
    one = {"w": torch.tensor([1.0])}
    assert fisher_merge([x, y], [one, {"w": torch.tensor([3.0])}], weights=[3.0, 1.0])["w"].item() == 0.5
    with pytest.raises(UserError, match="1 model weights for 2 models"):
        fisher_merge([a, b], [f, f], weights=[1.0])
    with pytest.raises(UserError, match="non-negative and not all zero"):
        fisher_merge([a, b], [f, f], weights=[1.0, -1.0])


def test_fisher_merge_rejects_bad_fishers():
    a, b = _sd(0), _sd(1)
    good = {"w": torch.ones(4, 3)}
    with pytest.raises(UserError, match="1 Fisher estimates for 2 models"):
        fisher_merge([a, b], [good])
    with pytest.raises(UserError, match="negative or non-finite"):
        fisher_merge([a, b], [good, {"w": -torch.ones(4, 3)}])
    with pytest.raises(UserError, match="has shape"):
        fisher_merge([a, b], [good, {"w": torch.ones(3)}])
    with pytest.raises(UserError, match="not a float weight"):
        fisher_merge([a, b], [{"bn.running_mean": torch.ones(4)}] * 2)


def test_estimate_fisher_is_the_mean_squared_per_sample_gradient():
    net = _bn_net()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["1.running_mean"] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g), torch.randint(0, 2, (10,), generator=g)
    fisher = estimate_fisher(net, sd, x, y, batch_size=4, max_samples=7)
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    ref.load_state_dict(sd)
    ref.eval()
    expected = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for i in range(7):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in ref.named_parameters():
            expected[n] += p.grad ** 2 / 7
    assert fisher.keys() == expected.keys()
    for n in fisher:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-7)
    assert net.training and _equal(net.state_dict(), before)  # the model is untouched


# ----------------------------------------------------------------------------- BatchNorm


def test_recompute_bn_gives_the_data_statistics_and_changes_nothing_else():
    net = nn.Sequential(nn.BatchNorm1d(3))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["0.weight"] = torch.tensor([2.0, 3.0, 4.0])
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    out = recompute_bn(net, sd, x, batch_size=50)
    torch.testing.assert_close(out["0.running_mean"], x.mean(0))
    torch.testing.assert_close(out["0.running_var"], x.var(0))
    assert out["0.num_batches_tracked"].item() == 1
    assert out["0.weight"] is sd["0.weight"]
    assert torch.equal(net.state_dict()["0.running_mean"], torch.zeros(3))  # the model is untouched
    # two batches: cumulative average of the batch statistics; a trailing batch of one is skipped
    two = recompute_bn(net, sd, x[:41], batch_size=20)
    torch.testing.assert_close(two["0.running_mean"], (x[:20].mean(0) + x[20:40].mean(0)) / 2)
    assert two["0.num_batches_tracked"].item() == 2


def test_recompute_bn_without_batchnorm_is_the_identity():
    net = nn.Linear(3, 2)
    sd = net.state_dict()
    assert _equal(recompute_bn(net, sd, torch.randn(8, 3)), sd)


# ----------------------------------------------------------------------------- fuse()


def _bn_data() -> FusionData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = (x[:, 0] > 0).long()
    return FusionData(x[:48], y[:48], x[48:], y[48:])


def test_fuse_recomputes_bn_and_reports_accuracies():
    net = _bn_net()
    sds = []
    for s in (1, 2):
        torch.manual_seed(s)
        sds.append(_bn_net().state_dict())
    data = _bn_data()
    fused, report = fuse("uniform", sds, names=["a", "b"], model=net, data=data)
    assert report["bn_stats"] == "recomputed"
    assert _equal(fused, recompute_bn(net, uniform_soup(sds), data.x_train))
    assert report["val_accuracy"] == {
        "models": {name: state_dict_accuracy(net, sd, data.x_val, data.y_val) for name, sd in zip("ab", sds)},
        "fused": state_dict_accuracy(net, fused, data.x_val, data.y_val)}
    fused_avg, report_avg = fuse("uniform", sds)
    assert report_avg["bn_stats"] == "averaged" and _equal(fused_avg, uniform_soup(sds))
    greedy, report_g = fuse("greedy", sds, names=["a", "b"], model=net, data=data)
    chosen = [sds["ab".index(name)] for name in report_g["ingredients"]]
    assert _equal(greedy, recompute_bn(net, uniform_soup(chosen), data.x_train))
    fisher, _ = fuse("fisher", sds, model=net, data=data)
    assert fisher.keys() == sds[0].keys()


@pytest.mark.parametrize("method, kwargs, message", [
    ("soup", {}, "unknown fusion method 'soup'"),
    ("ties", {"density": 0.5}, "method 'ties' needs a base model"),
    ("task-arithmetic", {}, "method 'task-arithmetic' needs a base model"),
    ("uniform", {"base": _sd(0)}, "method 'uniform' takes no base model"),
    ("greedy", {}, "method 'greedy' needs data"),
    ("fisher", {}, "method 'fisher' needs data"),
    ("ties", {"base": _sd(0)}, "method 'ties' needs parameter 'density'"),
    ("dare", {"base": _sd(0)}, "method 'dare' needs parameter 'p'"),
    ("ties", {"base": _sd(0), "density": 1.5}, r"density must be in \(0, 1\), got 1.5"),
    ("dare", {"base": _sd(0), "p": 1.0}, r"p must be in \(0, 1\), got 1.0"),
    ("uniform", {"density": 0.5}, "parameter 'density' does not apply to method 'uniform'"),
    ("ties", {"base": _sd(0), "density": 0.5, "lam": 0.5},
     r"parameter 'lam' does not apply to method 'ties' \(its parameters: density, lambda\)"),
    ("dare", {"base": _sd(0), "p": 0.5, "density": 0.5}, "density applies to method 'dare' only with dare_merge 'ties'"),
    ("dare", {"base": _sd(0), "p": 0.5, "dare_merge": "sum"}, "dare_merge must be one of average, ties, got 'sum'"),
    ("fisher", {"fisher_samples": 0}, "fisher_samples must be an integer >= 1, got 0"),
    ("fisher", {"fisher_samples": 2.5}, "fisher_samples must be an integer >= 1, got 2.5"),
    ("task-arithmetic", {"params": {"lambda": "big"}}, "lambda must be a finite number, got 'big'"),
])
def test_fuse_rejects_what_a_method_cannot_use(method, kwargs, message):
    with pytest.raises(UserError, match=message):
        fuse(method, [_sd(1), _sd(2)], **kwargs)


# ----------------------------------------------------------------------------- registry


SHIPPED = ("uniform", "greedy", "task-arithmetic", "ties", "dare", "fisher")


def test_registry_lists_every_method_with_its_declarations():
    assert method_names() == SHIPPED
    for name in SHIPPED:
        cls = lookup(name)
        assert cls.name == name and issubclass(cls, MergeMethod) and cls.summary
        assert all(p.help for p in cls.params)
    assert [p.name for p in lookup("ties").params] == ["density", "lambda"]
    assert lookup("dare").resolve({"p": 0.3}) == {"p": 0.3, "dare_merge": "average", "lambda": 1.0, "density": None}
    assert lookup("fisher").resolve({}) == {"fisher_samples": 512, "eps": 1e-8}
    assert {n for n in SHIPPED if lookup(n).needs_base} == {"task-arithmetic", "ties", "dare"}
    assert {n for n in SHIPPED if lookup(n).needs_data} == {"greedy", "fisher"}


class ScaledMean(MergeMethod):
    """A method as a user would add it: one class, one registration line."""

    name = "scaled-mean"
    summary = "The mean of the models, scaled."
    params = (Param("scale", float, 1.0, "factor applied to the mean", gt=0.0),
              Param("skip", int, 0, "models left out, from the end", ge=0))

    def merge(self, ctx: MergeContext) -> dict[str, torch.Tensor]:
        kept = ctx.state_dicts[:len(ctx.state_dicts) - ctx.params["skip"]]
        soup = uniform_soup(kept)
        return {k: v * ctx.params["scale"] if v.is_floating_point() and not k.startswith("bn.") else v
                for k, v in soup.items()}


@pytest.fixture
def scaled_mean():
    register(ScaledMean)
    yield ScaledMean
    del REGISTRY[ScaledMean.name]


def test_a_registered_method_is_usable_through_fuse(scaled_mean):
    assert method_names() == (*SHIPPED, "scaled-mean")
    a, b, c = _sd(1), _sd(2), _sd(3)
    fused, report = fuse("scaled-mean", [a, b, c], scale=2.0, skip=1)
    assert torch.allclose(fused["w"], a["w"] + b["w"]) and torch.allclose(fused["b"], a["b"] + b["b"])
    assert torch.equal(fused["bn.num_batches_tracked"], a["bn.num_batches_tracked"])
    assert report["method"] == "scaled-mean" and report["parameters"] == {"scale": 2.0, "skip": 1}
    assert _equal(fuse("scaled-mean", [a, b])[0], uniform_soup([a, b]))  # defaults apply
    for kwargs, message in (({"scale": 0.0}, r"scale must be > 0, got 0.0"),
                            ({"skip": -1}, r"skip must be an integer >= 0, got -1"),
                            ({"skip": True}, r"skip must be an integer >= 0, got True"),
                            ({"density": 0.5}, r"parameter 'density' does not apply to method 'scaled-mean' "
                                               r"\(its parameters: scale, skip\)"),
                            ({"base": a}, "method 'scaled-mean' takes no base model")):
        with pytest.raises(UserError, match=message):
            fuse("scaled-mean", [a, b], **kwargs)


def test_register_refuses_broken_declarations():
    with pytest.raises(ValueError, match="'ties' is already registered"):
        register(type("Again", (MergeMethod,), {"name": "ties"}))
    with pytest.raises(UserError, match="x must be in \\(0, 1\\), got 2.0"):
        register(type("BadDefault", (MergeMethod,), {"name": "bad", "params": (Param("x", float, 2.0, gt=0, lt=1),)}))
    with pytest.raises(TypeError, match="int, float or str, not bool"):
        register(type("Flag", (MergeMethod,), {"name": "flag", "params": (Param("on", bool, False),)}))
    with pytest.raises(ValueError, match="declares a parameter twice"):
        register(type("Twice", (MergeMethod,), {"name": "twice", "params": (Param("x", int, 1),) * 2}))
    assert method_names() == SHIPPED


# ----------------------------------------------------------------------------- CLI


runner = CliRunner()


@pytest.fixture
def ckpts(tmp_path, digits):
    """Three mlp state dicts (different seeds) and a base, as files."""
    paths = {}
    for name, seed in (("base", 0), ("a", 1), ("b", 2), ("c", 3)):
        torch.manual_seed(seed)
        model = build_model("mlp", digits.input_shape, digits.num_classes, digits.mean, digits.std)
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(model.state_dict(), paths[name])
    return paths


def _load(path):
    return torch.load(path, weights_only=True)


def _no_leftovers(directory, out_name="fused.pt"):
    names = [p.name for p in directory.iterdir()]
    return out_name not in names and not any(n.endswith(".tmp") for n in names)


def test_cli_uniform_writes_a_weights_only_state_dict(tmp_path, ckpts):
    out = tmp_path / "fused.pt"
    weights = ",".join(str(ckpts[k]) for k in ("a", "b", "c"))
    res = runner.invoke(app, ["fuse", "mlp", "--method", "uniform", "--weights", weights,
                              "--data", "digits", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["method"] == "uniform" and report["bn_stats"] == "none" and report["out"] == str(out)
    assert len(report["val_accuracy"]["models"]) == 3
    expected = uniform_soup([_load(ckpts[k]) for k in ("a", "b", "c")])
    assert _equal(_load(out), expected)


def test_cli_config_file_with_command_line_override(tmp_path, ckpts):
    out = tmp_path / "fused.pt"
    cfg = {"method": "ties", "model": "mlp", "base": str(ckpts["base"]),
           "weights": [str(ckpts["a"]), str(ckpts["b"])], "out": str(out),
           "parameters": {"density": 0.4, "lambda": 0.8}}
    path = tmp_path / "fuse.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["fuse", "--config", str(path), "--json"])
    assert res.exit_code == 0, res.output
    sds = [_load(ckpts[k]) for k in ("a", "b")]
    assert _equal(_load(out), ties_merge(_load(ckpts["base"]), sds, 0.4, 0.8))
    res = runner.invoke(app, ["fuse", "--config", str(path), "--density", "0.2", "--json"])
    assert res.exit_code == 0, res.output
    assert _equal(_load(out), ties_merge(_load(ckpts["base"]), sds, 0.2, 0.8))


def test_cli_dare_seed_from_config_and_command_line(tmp_path, ckpts):
    out = tmp_path / "fused.pt"
    path = tmp_path / "fuse.yaml"
    path.write_text(yaml.safe_dump({"method": "dare", "model": "mlp", "base": str(ckpts["base"]),
                                    "weights": f"{ckpts['a']},{ckpts['b']}", "out": str(out), "seed": 3,
                                    "parameters": {"p": 0.5, "dare_merge": "ties"}}))
    base, sds = _load(ckpts["base"]), [_load(ckpts[k]) for k in ("a", "b")]
    assert runner.invoke(app, ["fuse", "--config", str(path)]).exit_code == 0
    assert _equal(_load(out), dare(base, sds, 0.5, seed=3, merge="ties"))
    assert runner.invoke(app, ["fuse", "--config", str(path), "--seed", "0"]).exit_code == 0
    assert _equal(_load(out), dare(base, sds, 0.5, seed=0, merge="ties"))


def test_cli_mismatch_exits_2_naming_the_keys(tmp_path, ckpts, digits):
    narrow = build_model("mlp", digits.input_shape, digits.num_classes, hidden=64)
    torch.save(narrow.state_dict(), tmp_path / "narrow.pt")
    res = runner.invoke(app, ["fuse", "mlp", "--method", "uniform", "--weights",
                              f"{ckpts['a']},{tmp_path / 'narrow.pt'}", "--out", str(tmp_path / "fused.pt")])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: incompatible models:") and res.stderr.count("\n") == 1
    for key in ("features.1.weight", "features.1.bias", "features.3.weight", "classifier.weight"):
        assert key in res.stderr
    assert "narrow.pt" in res.stderr and "Traceback" not in res.output
    assert _no_leftovers(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--method", "ties", "--density", "0.5"], "method 'ties' needs a base model"),
    (["--method", "greedy"], "method 'greedy' needs data"),
    (["--method", "fisher"], "method 'fisher' needs data"),
    (["--method", "ties", "--base", "{base}", "--density", "1.5"], r"density must be in (0, 1), got 1.5"),
    (["--method", "dare", "--base", "{base}", "--p", "0"], r"p must be in (0, 1), got 0.0"),
    (["--method", "uniform", "--density", "0.5"], "parameter 'density' does not apply to method 'uniform'"),
    (["--method", "avg"], "unknown fusion method 'avg'"),
    (["--method", "uniform", "--weights", "{a},missing.pt"], "weights file not found: missing.pt"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, ckpts, args, message):
    args = [a.format(base=ckpts["base"], a=ckpts["a"]) for a in args]
    if "--weights" not in args:
        args += ["--weights", f"{ckpts['a']},{ckpts['b']}"]
    res = runner.invoke(app, ["fuse", "mlp", *args, "--out", str(tmp_path / "fused.pt")])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.count("\n") == 1
    assert _no_leftovers(tmp_path)


def test_cli_bad_config_exits_2(tmp_path, ckpts):
    path = tmp_path / "fuse.yaml"
    path.write_text(yaml.safe_dump({"method": "uniform", "model": "mlp", "weight": str(ckpts["a"]),
                                    "out": str(tmp_path / "fused.pt")}))
    res = runner.invoke(app, ["fuse", "--config", str(path)])
    assert res.exit_code == 2 and "unknown key(s) weight" in res.stderr
    complete = {"model": "mlp", "base": str(ckpts["base"]), "weights": [str(ckpts["a"]), str(ckpts["b"])],
                "out": str(tmp_path / "fused.pt")}
    for method, params, message in (
        ("ties", {"density": "half"}, "density must be in (0, 1), got 'half'"),
        ("ties", {"density": 0.5, "lamda": 1.0}, "parameter 'lamda' does not apply to method 'ties' "
                                                 "(its parameters: density, lambda)"),
        ("ties", {"lambda": 1.0}, "method 'ties' needs parameter 'density'"),
        ("dare", {"p": 0.5, "dare_merge": "sum"}, "dare_merge must be one of average, ties, got 'sum'"),
        ("soup", {}, "unknown fusion method 'soup': use one of uniform, greedy, task-arithmetic, ties, dare, fisher"),
    ):
        path.write_text(yaml.safe_dump({**complete, "method": method, "parameters": params}))
        res = runner.invoke(app, ["fuse", "--config", str(path)])
        assert res.exit_code == 2, res.output
        assert message in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.output
    path.write_text(yaml.safe_dump({**complete, "method": "ties", "parameters": [0.5]}))
    res = runner.invoke(app, ["fuse", "--config", str(path)])
    assert res.exit_code == 2 and "'parameters' must be a mapping" in res.stderr
    assert _no_leftovers(tmp_path)


def test_shipped_recipe_is_a_valid_config():
    from metacompress.cli.fuse_cmd import _read_config

    cfg = _read_config(Path(__file__).resolve().parents[2] / "benchmarks" / "recipes" / "fuse-example.yaml")
    assert cfg["method"] == "ties" and cfg["model_spec"] == "mlp"
    assert lookup(cfg["method"]).resolve(cfg["parameters"]) == {"density": 0.2, "lambda": 1.0}
    assert cfg["weights"] == "out/fuse/task_a.pt,out/fuse/task_b.pt"


def test_cli_config_drives_a_registered_method(tmp_path, ckpts, scaled_mean):
    out = tmp_path / "fused.pt"
    path = tmp_path / "fuse.yaml"
    cfg = {"method": "scaled-mean", "model": "mlp", "weights": [str(ckpts["a"]), str(ckpts["b"])], "out": str(out)}
    path.write_text(yaml.safe_dump({**cfg, "parameters": {"scale": 0.5}}))
    res = runner.invoke(app, ["fuse", "--config", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["parameters"] == {"scale": 0.5, "skip": 0}
    a, b = _load(ckpts["a"]), _load(ckpts["b"])
    assert all(torch.allclose(v, (a[k] + b[k]) / 4) for k, v in _load(out).items())
    out.unlink()
    path.write_text(yaml.safe_dump({**cfg, "parameters": {"scale": -1}}))
    res = runner.invoke(app, ["fuse", "--config", str(path)])
    assert res.exit_code == 2 and res.stderr == "error: scale must be > 0, got -1\n"
    assert _no_leftovers(tmp_path)


def test_run_recipe_fuse_step_follows_the_declarations(scaled_mean):
    from pydantic import ValidationError

    from metacompress.cli.run_cmd import schema

    step = {"pipeline": "fuse", "model": "mlp", "weights": "a.pt,b.pt", "out": "f.pt"}
    assert schema("fuse").model_validate({**step, "method": "scaled-mean", "lambda": -0.5}).model_dump()["lambda"] == -0.5
    for bad in ({"method": "soup"}, {"method": "ties", "density": 1.5}, {"method": "dare", "p": 0.0},
                {"method": "dare", "dare_merge": "sum"}):
        with pytest.raises(ValidationError):
            schema("fuse").model_validate({**step, **bad})
