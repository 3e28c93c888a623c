"""metacompress sweep: one dense model, every budget x allocation, CSV + JSON + PNG written atomically."""

import csv
import json

import pytest
from PIL import Image

from metacompress.compress.prune import BUDGET_TOL
from metacompress.sweep import COLUMNS
from tests.helpers import assert_user_error, run

BUDGETS = (0.8, 0.4)
ALLOCATIONS = ("uniform", "lamp", "meta")


@pytest.mark.integration
def test_sweep_writes_csv_json_and_plot(tmp_path):
    out = tmp_path / "sweep"
    res = run("sweep", "mlp", "--data", "digits", "--train-epochs", "6", "--budgets", ",".join(map(str, BUDGETS)),
              "--allocations", ",".join(ALLOCATIONS), "--repair-steps", "10", "--latency-seconds", "0.1",
              "--threads", "1", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    assert json.loads((out / "sweep.json").read_text()) == result
    assert result["dense"]["accuracy"] > 0.85  # trained once, before the points

    with open(out / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert [(float(r["budget"]), r["allocation"]) for r in rows] == [(b, a) for b in BUDGETS for a in ALLOCATIONS]
    for r in rows:
        assert r["metric"] == "macs"
        assert abs(float(r["macs_ratio"]) - float(r["budget"])) <= BUDGET_TOL * float(r["budget"]) + 1e-9
        assert float(r["accuracy"]) > 0.5
        assert abs(float(r["accuracy_delta"]) - (float(r["accuracy"]) - result["dense"]["accuracy"])) < 1e-3
        for key in ("latency_b1_ms", "latency_b32_ms", "dense_latency_b1_ms", "dense_latency_b32_ms", "speedup_b1"):
            assert float(r[key]) > 0
        assert float(r["speedup_b32"]) == pytest.approx(
            float(r["dense_latency_b32_ms"]) / float(r["latency_b32_ms"]), rel=0.02)
        assert 0 < int(r["onnx_bytes"]) and 0 < float(r["size_ratio"]) < 1
    assert max(int(r["macs"]) for r in rows if r["budget"] == "0.4") < min(int(r["macs"]) for r in rows if r["budget"] == "0.8")

    with Image.open(out / "sweep.png") as img:
        img.verify()
    with Image.open(out / "sweep.png") as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 200


@pytest.mark.integration
@pytest.mark.parametrize("args,fragments", [
    (["--budgets", "0.8,1.5"], ["(0, 1]", "1.5"]),
    (["--budgets", "0.8,half"], ["--budgets", "numbers"]),
    (["--allocations", "uniform,best"], ["unknown allocation", "best"]),
    (["--metric", "joules"], ["unknown sweep metric 'joules'"]),
    (["--budgets", "0.5,0.5"], ["repeat"]),
])
def test_sweep_bad_input_exits_2_and_writes_nothing(tmp_path, args, fragments):
    out = tmp_path / "sweep"
    res = run("sweep", "mlp", "--weights", "none", *args, "--out", out)
    assert_user_error(res, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_that_fails_midway_leaves_no_output(tmp_path, monkeypatch):
    import metacompress.sweep as sweep
    from metacompress.compress.distill import RepairConfig
    from metacompress.pipeline import CompressConfig

    real, calls = sweep.export_and_verify, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("export failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "export_and_verify", fail_second)
    out = tmp_path / "sweep"
    base = CompressConfig(model="mlp", weights="none", repair=RepairConfig(steps=0), latency_seconds=0.0,
                          latency_repeats=2, threads=1, dynamo=False)
    with pytest.raises(RuntimeError, match="export failed"):
        sweep.run_sweep(sweep.SweepConfig(base, budgets=(0.8, 0.5), allocations=("uniform",), out=str(out)))
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_sweep_to_latency_budgets(tmp_path):
    out = tmp_path / "sweep"
    res = run("sweep", "vgg-small", "--data", "digits@16", "--weights", "none", "--metric", "latency",
              "--budgets", "0.8,0.5", "--allocations", "lamp", "--repair-steps", "0",
              "--latency-seconds", "0.1", "--threads", "1", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    assert [(r["metric"], r["budget"], r["allocation"]) for r in rows] == [("latency", b, "lamp") for b in (0.8, 0.5)]
    at = {r["budget"]: r for r in rows}
    assert at[0.5]["macs"] < at[0.8]["macs"] < json.loads(res.stdout)["dense"]["macs"]
    with Image.open(out / "sweep.png") as img:
        assert img.format == "PNG"
