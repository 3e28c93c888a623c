"""Deployment layer: ONNX export, onnxruntime verification, int8 quantization, simplification, bench.

The models are trained here for a few seconds (seeded) and pruned to about half their MACs with
torch-pruning, so the accuracy and size floors are checked on the kind of model users deploy.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from metacompress.cli.main import app
from metacompress.compress.measure import count_macs
from metacompress.compress.prune import PruningSpace
from metacompress.compress.rules import rule_allocation
from metacompress.data import load_dataset
from metacompress.deploy import export, export_onnx, load_session, verify_onnx
from metacompress.deploy.bench import benchmark_latency, speedups
from metacompress.deploy.quantize import choose_mode, quantize_onnx
from metacompress.deploy.simplify import simplify_onnx
from metacompress.errors import UserError
from metacompress.zoo import build_model


def _train(model: nn.Module, data, epochs: int, lr: float, batch_size: int = 64) -> None:
    """A few seeded Adam epochs on one thread (two threads on two shared cores thrash)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _epochs(model, data, epochs, lr, batch_size)
    finally:
        torch.set_num_threads(threads)


def _epochs(model: nn.Module, data, epochs: int, lr: float, batch_size: int) -> None:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data.x_train))
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def _prune_to_half(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, float]:
    """Uniform allocation projected onto exactly half the MACs (the toolkit's own budget search)."""
    space = PruningSpace(model, example, 10)
    keep = space.project(rule_allocation("uniform", space, model, None), 0.5)
    pruned = space.apply(copy.deepcopy(model), keep)
    return pruned, count_macs(pruned, example) / space.dense_macs


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def digits32():
    return load_dataset("digits@32")


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits")


def _pruned_and_exported(name: str, data, epochs: int, folder) -> tuple:
    """``name`` trained on ``data``, pruned to <= 0.5 MACs, fine-tuned; exported + simplified."""
    torch.manual_seed(0)
    model = build_model(name, data.input_shape, data.num_classes, data.mean, data.std)
    _train(model, data, epochs=epochs, lr=3e-3)
    model, ratio = _prune_to_half(model, data.x_train[:1])
    _train(model, data, epochs=2, lr=1e-3)
    path = folder / "model.onnx"
    export_onnx(model, data.x_train[:2], path)
    simplify_onnx(path, path)
    return model, path, ratio


@pytest.fixture(scope="module")
def resnet(digits32, tmp_path_factory):
    return _pruned_and_exported("resnet20", digits32, 3, tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="module")
def mlp(digits8, tmp_path_factory):
    return _pruned_and_exported("mlp", digits8, 8, tmp_path_factory.mktemp("mlp"))


# ---------------------------------------------------------------- export


def test_export_dynamo_single_file_dynamic_batch_and_parity(tmp_path, digits32):
    model = build_model("resnet20", digits32.input_shape, 10, digits32.mean, digits32.std)
    model.train()
    path = tmp_path / "m.onnx"
    info = export_onnx(model, digits32.x_train[:1], path)
    assert info["exporter"] == "dynamo" and info["bytes"] == path.stat().st_size and info["opset"] >= 13
    assert model.training, "the caller's train/eval mode is restored after the export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "one self-contained file, no temp left"
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    sess = load_session(path, threads=1)
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    model.eval()
    for batch in (1, 7, 32):  # exported from a batch of 1, served at any batch size
        x = digits32.x_test[:batch]
        out = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(out - model(x).numpy()).max() < 1e-4


def test_export_falls_back_to_legacy_with_warning(tmp_path, digits8, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator for this test")

    monkeypatch.setattr(export, "_export_dynamo", broken)
    model = build_model("mlp", digits8.input_shape, 10, digits8.mean, digits8.std).eval()
    with pytest.warns(RuntimeWarning, match="falling back to the legacy exporter"):
        info = export_onnx(model, digits8.x_train[:4], tmp_path / "m.onnx")
    assert info["exporter"] == "legacy"
    r = verify_onnx(tmp_path / "m.onnx", model, digits8.x_test, digits8.y_test)
    assert r["max_abs_diff"] < 1e-4 and r["top1_agreement"] == 1.0


def test_failed_export_leaves_no_file(tmp_path, digits8):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="boom"):
            export_onnx(Broken(), digits8.x_train[:2], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


class ViewsAfterAConv(nn.Module):
    """A user's CNN that flattens with ``.view``: by the batch size it reads (``len`` fixes it in an
    export) or by ``x.size(0)``."""

    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed, self.conv, self.fc = fixed, nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8 * 64, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(len(h) if self.fixed else h.size(0), -1))


def test_a_batch_size_the_forward_fixes_is_a_one_line_error_and_no_file(tmp_path, digits8):
    """The exporters turn ``len(x)`` into the example's batch size: the file declared a batch axis and
    failed in onnxruntime on any other batch (an internal error after the whole run)."""
    with pytest.raises(UserError, match="only runs at batch size 2: .* write x.size\\(0\\)"):
        export_onnx(ViewsAfterAConv(fixed=True).eval(), digits8.x_train[:4], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    model = ViewsAfterAConv(fixed=False).eval()
    export_onnx(model, digits8.x_train[:4], tmp_path / "m.onnx")
    assert verify_onnx(tmp_path / "m.onnx", model, digits8.x_test, digits8.y_test)["max_abs_diff"] < 1e-4


def test_one_channel_images_have_the_strides_of_a_fresh_tensor(digits8):
    """Digits came with a channel stride of 1, which PyTorch reads as channels-last: a conv then
    returned channels-last outputs and a model's own ``.view`` raised on them."""
    for x in (digits8.x_train, digits8.x_val, digits8.x_test):
        assert x.stride() == torch.empty(x.shape).stride()
    assert ViewsAfterAConv(fixed=False).eval()(digits8.x_test).shape == (len(digits8.x_test), 10)


# ---------------------------------------------------------------- verify / simplify


@pytest.mark.integration
def test_verify_matches_pytorch_and_reports_facts(resnet, digits32):
    model, path, _ = resnet
    r = verify_onnx(path, model, digits32.x_test, digits32.y_test, batch_size=100)
    assert r["max_abs_diff"] < 1e-4 and r["top1_agreement"] == 1.0
    assert r["accuracy"] == pytest.approx(_accuracy(model, digits32.x_test, digits32.y_test), abs=1e-6)
    assert r["accuracy"] > 0.9
    assert r["ops"]["Conv"] == 21 and r["bytes"] == path.stat().st_size and r["opset"] >= 13
    no_ref = verify_onnx(path, None, digits32.x_test, None)
    assert no_ref["max_abs_diff"] is None and no_ref["top1_agreement"] is None and no_ref["accuracy"] is None


@pytest.mark.integration
def test_verify_bad_inputs(resnet, digits8, tmp_path):
    model, path, _ = resnet
    with pytest.raises(UserError, match="model takes 1x32x32"):
        verify_onnx(path, model, digits8.x_test, None)
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(UserError, match="not a loadable ONNX"):
        verify_onnx(truncated, None, digits8.x_test, None)
    text = tmp_path / "x.onnx"
    text.write_text("hello")
    with pytest.raises(UserError):
        load_session(text)


def test_simplify_keeps_parity_and_shrinks(tmp_path, digits32):
    model = build_model("resnet20", digits32.input_shape, 10, digits32.mean, digits32.std).eval()
    raw, slim = tmp_path / "raw.onnx", tmp_path / "slim.onnx"
    export_onnx(model, digits32.x_train[:2], raw)
    info = simplify_onnx(raw, slim)
    assert info["bytes"] < 0.95 * info["src_bytes"], "dynamo's per-node debug metadata is dropped"
    r = verify_onnx(slim, model, digits32.x_test[:64], None)
    assert r["max_abs_diff"] < 1e-4 and r["top1_agreement"] == 1.0


# ---------------------------------------------------------------- quantize


@pytest.mark.integration
def test_static_int8_resnet20_accuracy_and_size(resnet, digits32, tmp_path):
    model, path, ratio = resnet
    assert abs(ratio - 0.5) <= 0.01
    fp32 = verify_onnx(path, model, digits32.x_test, digits32.y_test)
    cal = digits32.calibration_batch(256, seed=0)[0].numpy()
    q = quantize_onnx(path, tmp_path / "int8.onnx", "auto", cal)
    assert q["mode"] == "static" and q["calibration_samples"] == 256
    assert q["bytes"] <= 0.3 * fp32["bytes"], q
    assert "QuantizeLinear" in q["ops"] and "ConvInteger" not in q["ops"]
    int8 = verify_onnx(tmp_path / "int8.onnx", model, digits32.x_test, digits32.y_test)
    assert int8["accuracy"] >= fp32["accuracy"] - 0.01
    assert int8["top1_agreement"] >= 0.97


def test_dynamic_int8_mlp_accuracy_and_size(mlp, digits8, tmp_path):
    model, path, ratio = mlp
    assert abs(ratio - 0.5) <= 0.01
    fp32 = verify_onnx(path, model, digits8.x_test, digits8.y_test)
    q = quantize_onnx(path, tmp_path / "int8.onnx", "auto", None)
    assert q["mode"] == "dynamic" and q["calibration_samples"] == 0
    assert q["bytes"] <= 0.3 * fp32["bytes"], q
    assert q["ops"].get("MatMulInteger", 0) == 3
    int8 = verify_onnx(tmp_path / "int8.onnx", model, digits8.x_test, digits8.y_test)
    assert fp32["accuracy"] > 0.9 and int8["accuracy"] >= fp32["accuracy"] - 0.01


def test_quantize_deterministic(mlp, tmp_path):
    _, path, _ = mlp
    quantize_onnx(path, tmp_path / "a.onnx", "dynamic")
    quantize_onnx(path, tmp_path / "b.onnx", "dynamic")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_choose_mode_by_op_mix():
    assert choose_mode({"Conv": 3, "Gemm": 1, "Relu": 3}) == "static"
    assert choose_mode({"MatMul": 2, "Add": 2}) == "dynamic"
    with pytest.raises(UserError, match="nothing to quantize"):
        choose_mode({"Add": 1})


@pytest.mark.integration
def test_quantize_bad_calibration_leaves_no_file(resnet, digits8, tmp_path):
    _, path, _ = resnet
    with pytest.raises(UserError, match="needs calibration data"):
        quantize_onnx(path, tmp_path / "q.onnx", "static", None)
    with pytest.raises(UserError, match="calibration samples have shape 1x8x8"):
        quantize_onnx(path, tmp_path / "q.onnx", "static", digits8.x_train[:32].numpy())
    with pytest.raises(UserError, match="unknown quantization mode"):
        quantize_onnx(path, tmp_path / "q.onnx", "int4", None)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bench


@pytest.mark.integration
def test_benchmark_interleaved_stats_and_speedup(resnet, mlp):
    _, path, _ = resnet
    r = benchmark_latency({"a": path, "b": load_session(path, threads=1)}, (1, 32, 32), batches=(1, 4),
                          threads=1, repeats=5, warmup=1)
    assert set(r) == {"a", "b"} and set(r["a"]) == {"b1", "b4"}
    for per_batch in r.values():
        for s in per_batch.values():
            assert 0 < s["min_ms"] <= s["median_ms"] <= s["max_ms"]
    ratio = speedups(r, "a")["b"]["b4"]
    assert ratio == pytest.approx(r["a"]["b4"]["median_ms"] / r["b"]["b4"]["median_ms"])
    with pytest.raises(UserError, match="model takes 1x32x32"):
        benchmark_latency({"a": path}, (1, 8, 8), threads=1, repeats=1)


def test_benchmark_rounds_follow_the_time_limits(resnet):
    """``min_seconds`` adds rounds to a fast model; ``max_seconds`` cuts a slow one's, down to
    MIN_TIMINGS timings of the model over all its sessions."""
    from metacompress.deploy.bench import MIN_TIMINGS

    _, path, _ = resnet
    rounds = lambda **kw: benchmark_latency({"a": path}, (1, 32, 32), batches=(1,), threads=1, warmup=1,  # noqa: E731
                                            **kw)["a"]["b1"]["rounds"]
    assert rounds(repeats=12) == 12
    assert rounds(repeats=12, max_seconds=0.0) == MIN_TIMINGS
    assert rounds(repeats=12, max_seconds=0.0, sessions_per_model=3) == MIN_TIMINGS // 3
    assert rounds(repeats=12, max_seconds=0.0, sessions_per_model=4) == -(-MIN_TIMINGS // 4)
    assert rounds(repeats=2, min_seconds=0.2) > 2


def test_a_long_pass_counts_from_its_first_run(resnet, monkeypatch):
    """Where every pass takes LONG_PASS_S or more, the warm-up run is the first timing (a model
    with passes of seconds saves a round); a short pass's warm-up is never timed."""
    from metacompress.deploy import bench

    _, path, _ = resnet
    opened = []
    real_session = bench._session

    class Counting:
        def __init__(self, session):
            self.session, self.runs = session, 0

        def run(self, *args):
            self.runs += 1
            return self.session.run(*args)

        def __getattr__(self, name):
            return getattr(self.session, name)

    monkeypatch.setattr(bench, "_session", lambda *a: opened.append(Counting(real_session(*a))) or opened[-1])

    def runs() -> int:
        benchmark_latency({"a": path}, (1, 32, 32), batches=(1,), threads=1, warmup=1, repeats=4)
        return opened.pop().runs

    assert runs() == 1 + 4
    monkeypatch.setattr(bench, "LONG_PASS_S", 0.0)
    assert runs() == 4


# ---------------------------------------------------------------- CLI

runner = CliRunner()


@pytest.mark.integration
def test_cli_verify_truncated_exits_2_with_one_line(resnet, tmp_path):
    _, path, _ = resnet
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    res = runner.invoke(app, ["verify", str(bad), "--data", "digits@32"])
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


@pytest.mark.integration
def test_cli_verify_json_with_compressed_reference(resnet, digits32, tmp_path):
    from metacompress.compress.checkpoint import save_compressed

    model, path, _ = resnet
    ckpt = tmp_path / "model.pt"
    save_compressed(ckpt, model, "resnet20", digits32.input_shape, digits32.num_classes)
    res = runner.invoke(app, ["verify", str(path), "--data", "digits@32", "--reference", str(ckpt),
                              "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["max_abs_diff"] < 1e-4 and out["top1_agreement"] == 1.0 and out["accuracy"] > 0.9
    assert out["opset"] >= 13 and out["bytes"] == path.stat().st_size
    wrong = runner.invoke(app, ["verify", str(path), "--data", "digits"])
    assert wrong.exit_code == 2 and "model takes 1x32x32" in wrong.stderr


@pytest.mark.integration
def test_cli_bench_prints_both_medians_and_ratio(resnet, tmp_path):
    _, path, _ = resnet
    baseline = tmp_path / "baseline.onnx"
    baseline.write_bytes(path.read_bytes())
    args = ["bench", str(path), "--baseline", str(baseline), "--batch", "1,2", "--threads", "1", "--repeats", "3"]
    res = runner.invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("model", "baseline"):
        assert out["latency"][key]["b2"]["median_ms"] > 0
    assert out["speedup"]["b1"] == pytest.approx(
        out["latency"]["baseline"]["b1"]["median_ms"] / out["latency"]["model"]["b1"]["median_ms"])
    text = runner.invoke(app, args)
    assert text.exit_code == 0
    rows = {line.split()[0]: line for line in text.stdout.splitlines() if line.strip()}
    assert re.search(r"\d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3}\)", rows[path.name])
    assert re.search(r"\d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3}\)", rows["baseline.onnx"])
    assert re.search(r"\d+\.\d{2}x", rows["speedup"])
    assert runner.invoke(app, ["bench", str(path), "--batch", "0"]).exit_code == 2


@pytest.mark.integration
def test_cli_quantize(mlp, resnet, tmp_path):
    _, mlp_path, _ = mlp
    out = tmp_path / "q.onnx"
    res = runner.invoke(app, ["quantize", str(mlp_path), "--data", "digits", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["mode"] == "dynamic" and out.is_file() and r["accuracy"] >= r["accuracy_fp32"] - 0.01
    _, res_path, _ = resnet
    bad = runner.invoke(app, ["quantize", str(res_path), "--data", "digits", "--out", str(tmp_path / "b.onnx")])
    assert bad.exit_code == 2 and "1x8x8" in bad.stderr and not (tmp_path / "b.onnx").exists()


@pytest.mark.slow
def test_int8_not_slower_than_fp32_at_batch_32(resnet, mlp, digits32, tmp_path):
    """Issue #6: int8 latency not worse than fp32 at batch 32 (10 % noise allowance, 2 threads)."""
    for name, (_, path, _), mode, cal in (
        ("resnet20", resnet, "static", digits32.calibration_batch(256)[0].numpy()),
        ("mlp", mlp, "dynamic", None),
    ):
        q = tmp_path / f"{name}.int8.onnx"
        quantize_onnx(path, q, mode, cal)
        shape = tuple(load_session(path, threads=1).get_inputs()[0].shape[1:])
        r = benchmark_latency({"fp32": path, "int8": q}, shape, batches=(32,), threads=2, repeats=50, warmup=5)
        assert speedups(r, "fp32")["int8"]["b32"] >= 0.9, (name, r)


def test_verify_relative_diff_is_over_the_largest_reference_logit(tmp_path):
    torch.manual_seed(0)
    big = nn.Linear(6, 3).eval()
    with torch.no_grad():
        big.weight.mul_(1e6)  # logits of order 1e6: float32 rounding alone is ~0.1 there
    path = tmp_path / "m.onnx"
    export_onnx(big, torch.randn(2, 6), path, dynamo=False)
    off = copy.deepcopy(big)
    with torch.no_grad():
        off.bias.add_(4.0)
        x = torch.randn(20, 6)
        ref = off(x)
    r = verify_onnx(path, off, x, None)
    assert r["max_abs_diff"] == pytest.approx(4.0, abs=0.5)
    assert r["max_rel_diff"] == pytest.approx(r["max_abs_diff"] / float(ref.abs().max()), rel=1e-6)
    assert r["max_rel_diff"] < 1e-4
    zero = nn.Linear(6, 3).eval()
    nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
    export_onnx(zero, torch.randn(2, 6), path, dynamo=False)
    r = verify_onnx(path, zero, x, None)
    assert r["max_rel_diff"] == 0.0 and type(r["max_rel_diff"]) is float  # all-zero logits: JSON-safe, no 0/0


class _OffBeyond(nn.Module):
    """``model`` plus 1 on every logit of the samples whose first feature exceeds 50."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + (x[:, :1] > 50).float()


def test_verify_parity_on_a_prefix_and_accuracy_on_all(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 3).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 6), path, dynamo=False)
    x = torch.randn(20, 6)
    x[5:, 0] = 100.0
    with torch.no_grad():
        y = model(x).argmax(1)
    y[-1] = (y[-1] + 1) % 3   # one wrong label, among the samples outside the prefix
    head = verify_onnx(path, _OffBeyond(model), x, y, parity_samples=5)
    assert head["parity_samples"] == 5 and head["samples"] == 20
    assert head["max_abs_diff"] < 1e-5 and head["accuracy"] == pytest.approx(19 / 20)
    whole = verify_onnx(path, _OffBeyond(model), x, y)
    assert whole["parity_samples"] == 20 and whole["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(UserError, match="parity samples"):
        verify_onnx(path, model, x, y, parity_samples=0)


class _Unrunnable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the reference ran although its logits were given")


def test_verify_compares_with_given_reference_logits_without_running_the_reference(tmp_path):
    """The dense model's logits from the measure stage are the reference: no second PyTorch pass,
    and a difference from them is found as from a run reference."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 6), path, dynamo=False)
    x = torch.randn(8, 6)
    with torch.no_grad():
        logits = model(x)
    same = verify_onnx(path, _Unrunnable(), x, None, reference_logits=logits)
    assert same["parity_samples"] == 8 and same["max_abs_diff"] < 1e-5 and same["top1_agreement"] == 1.0
    off = verify_onnx(path, _Unrunnable(), x[:4], None, reference_logits=logits + 2.0)  # more logits than samples
    assert off["parity_samples"] == 4 and off["max_abs_diff"] == pytest.approx(2.0, abs=1e-4)
    short = verify_onnx(path, model, x, None, reference_logits=logits[:3] + 2.0)  # too few: the reference runs
    assert short["max_abs_diff"] < 1e-5


def test_check_samples_are_bounded_by_the_reference_cost():
    from metacompress.pipeline import CHECK_MACS, MIN_CHECK_SAMPLES, check_samples

    assert check_samples(41e6, 360) == 360                     # a small model: every test sample
    assert check_samples(CHECK_MACS / 89.5, 240) == 89          # as many as the budget buys
    assert check_samples(CHECK_MACS, 240) == MIN_CHECK_SAMPLES  # and never fewer than the floor
    assert check_samples(41e6, 360, most=64) == 64 and check_samples(41e6, 10) == 10
