"""Recipes: every shipped recipe runs (made small by overrides); malformed recipes exit 2 naming
the key and the line; random documents never crash the validator."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import assert_user_error, run, write_idx

ROOT = Path(__file__).resolve().parents[2]
TINY_TEACHERS = "teachers=[{model: mlp, data: [digits], kwargs: [{hidden: 16, depth: 1}]}]"
SHIPPED = {"quickstart", "seed-mlp", "fashion-resnet20", "fuse", "deploy-int8", "policy-default",
           "policy-default-stage2", "policy-eval"}


def _learnable_idx(root: Path, n_train: int = 300, n_test: int = 100, classes: int = 4) -> Path:
    """A tiny MNIST-format folder whose classes differ by where a bright square is (learnable)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, count in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(count) % classes).astype(np.uint8)
        images = rng.integers(0, 60, (count, 12, 12), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 6 * (c // 2):6 * (c // 2) + 6, 6 * (c % 2):6 * (c % 2) + 6] += 150
        write_idx(root / f"{split}-images-idx3-ubyte", images)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


def invoke(*args) -> tuple[int, str]:
    """The command line in this process (fast): exit code and what it printed."""
    from typer.testing import CliRunner

    from metacompress.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert not isinstance(res.exception, (AssertionError, TypeError, KeyError, AttributeError)), res.exception
    return res.exit_code, res.output


def _run_json(*args):
    res = run("run", *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.integration
def test_recipes_list_shows_exactly_the_shipped_ones():
    res = run("recipes", "list", "--json")
    assert res.returncode == 0, res.stderr
    assert {r["name"] for r in json.loads(res.stdout)["recipes"]} == SHIPPED
    shown = run("recipes", "show", "seed-mlp")
    assert shown.returncode == 0 and shown.stdout == (ROOT / "recipes" / "seed-mlp.yaml").read_text()
    assert_user_error(run("recipes", "show", "nosuch"), "recipe not found: nosuch", "quickstart")


@pytest.mark.integration
def test_quickstart_recipe(tmp_path):
    r = _run_json("quickstart", "train_epochs=3", "repair_steps=5", f"out={tmp_path / 'q'}")
    assert r["model"] == "resnet20" and r["policy"] == "meta"
    assert abs(r["achieved_macs_ratio"] - 0.5) <= 0.01
    assert r["onnx"]["top1_agreement"] >= 0.99
    assert (tmp_path / "q" / "model.onnx").is_file()


@pytest.mark.integration
def test_seed_mlp_recipe_on_digits_and_on_idx_files(tmp_path):
    r = _run_json("seed-mlp", "train_epochs=5", "repair_steps=20", f"out={tmp_path / 'd'}")
    assert r["data"] == "digits@28" and r["dense"]["params"] == 784 * 64 + 64 + 64 * 10 + 10
    assert r["compressed"]["accuracy"] > 0.8
    idx = _learnable_idx(tmp_path / "idx")
    r = _run_json("seed-mlp", f"data=idx:{idx}", "train_epochs=5", "repair_steps=20", f"out={tmp_path / 'i'}")
    assert r["dense"]["params"] == 144 * 64 + 64 + 64 * 4 + 4  # 12x12 images, 4 classes
    assert r["compressed"]["accuracy"] > 0.9


@pytest.mark.integration
def test_fashion_resnet20_recipe_on_idx_files(tmp_path):
    idx = _learnable_idx(tmp_path / "idx")
    r = _run_json("fashion-resnet20", f"vars.fmnist=idx:{idx}:size=8", "train_epochs=3", "repair_steps=5",
                  f"out={tmp_path / 'f'}")
    assert r["model"] == "resnet20" and abs(r["achieved_macs_ratio"] - 0.4) <= 0.01
    assert r["dense"]["accuracy"] > 0.4  # 4 classes: chance is 0.25


@pytest.mark.integration
def test_fuse_recipe_trains_three_and_soups(tmp_path):
    r = _run_json("fuse", f"vars.dir={tmp_path}", "vars.epochs=3")
    assert [s["seed"] for s in r["steps"][:3]] == [0, 1, 2]
    fused = r["steps"][3]
    assert fused["method"] == "greedy" and (tmp_path / "fused.pt").is_file()
    assert fused["val_accuracy"]["fused"] >= max(fused["val_accuracy"]["models"].values()) - 1e-9


@pytest.mark.integration
def test_deploy_int8_recipe(tmp_path):
    r = _run_json("deploy-int8", f"vars.dir={tmp_path}", "vars.data=digits", "steps.0.train_epochs=3",
                  "steps.0.repair_steps=5", "steps.1.calibration_samples=64")
    compress, quant = r["steps"]
    assert abs(compress["achieved_macs_ratio"] - 0.5) <= 0.01
    assert quant["mode"] == "static" and quant["top1_agreement"] > 0.9
    assert (tmp_path / "model.int8.onnx").is_file()


@pytest.mark.integration
def test_policy_recipes_train_both_stages_and_evaluate(tmp_path):
    small = [TINY_TEACHERS, "iterations=1", "population=2", "tasks_per_iteration=1", "workers=1"]
    r1 = _run_json("policy-default", *small, f"out={tmp_path / 's1'}")
    assert r1["iterations"] == 1 and (tmp_path / "s1" / "policy.safetensors").is_file()
    r2 = _run_json("policy-default-stage2", *small, f"init={tmp_path / 's1'}", "select_every=1",
                   "select_budgets=[0.5]", f"out={tmp_path / 's2'}")
    assert (tmp_path / "s2" / "policy.safetensors").is_file() and r2["iterations"] == 1
    ev = _run_json("policy-eval", TINY_TEACHERS, "budgets=[0.5]", "regimes=[bn]", "seeds=1", "es_search_evals=0",
                   "workers=1")
    assert "meta" in next(iter(ev["summary"]["table"].values()))


def _recipe(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


GOOD = "pipeline: compress\nmodel: mlp\nweights: none\ntarget_macs: 0.5\nout: OUT\n"


@pytest.mark.parametrize("text,overrides,fragments", [
    (GOOD.replace("target_macs", "targt_macs"), [], ["unknown key 'targt_macs'", "line 4", "target_macs"]),
    (GOOD.replace("0.5", "half"), [], ["key 'target_macs'", "line 4", "valid number", "'half'"]),
    (GOOD.replace("0.5", "1.5"), [], ["key 'target_macs'", "line 4", "less than or equal to 1"]),
    (GOOD, ["repair_steps=-3"], ["key 'repair_steps'", "override repair_steps=-3", "greater than or equal to 0"]),
    (GOOD, ["allocation=best"], ["key 'allocation'", "'meta'", "'lamp'"]),
    (GOOD + "model: lenet5\n", [], ["'model' appears twice", "lines 2 and 6"]),
    (GOOD.replace("model: mlp", "model: [mlp"), [], ["malformed recipe", "line"]),
    (GOOD.replace("pipeline: compress", "pipeline: squash"), [], ["key 'pipeline'", "line 1", "compress", "squash"]),
    ("model: mlp\n", [], ["key 'pipeline'", "missing"]),
    ("- a\n- b\n", [], ["must be a mapping"]),
    ("steps:\n  - pipeline: train\n    model: mlp\n    out: x.pt\n    epochs: 0\n", [],
     ["key 'steps.0.epochs'", "line 5", "greater than or equal to 1"]),
    ("vars: {d: digits}\npipeline: train\nmodel: mlp\ndata: ${dd}\nout: x.pt\n", [], ["${dd}", "vars has no 'dd'", "line 4"]),
    ("pipeline: policy-train\nteachers: []\n", [], ["key 'teachers'", "line 2", "at least 1"]),
    (GOOD, ["steps.0.x=1"], ["steps"]),
    (GOOD, ["=3"], ["malformed override"]),
])
def test_malformed_recipes_exit_2_naming_key_and_line(tmp_path, text, overrides, fragments):
    out = tmp_path / "out"
    path = _recipe(tmp_path, text.replace("OUT", str(out)))
    code, output = invoke("run", path, *overrides)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not out.exists()


def test_recipe_keys_follow_the_command_flags(tmp_path):
    path = _recipe(tmp_path, GOOD + "guard: false\nrepair_samples_per_class: 5\ntrain_epochs: 2\nbudgets_unused: 1\n")
    code, output = invoke("run", path, "--dry-run")
    assert code == 2 and "unknown key 'budgets_unused' (line 9)" in output
    path = _recipe(tmp_path, GOOD + "guard: false\nrepair_samples_per_class: 5\ntrain_epochs: 2\n")
    code, output = invoke("run", path, "--dry-run", "--json")
    assert code == 0, output
    step = json.loads(output)["steps"][0]
    assert step == {"pipeline": "compress", "model": "mlp", "weights": "none", "target_macs": 0.5,
                    "out": "OUT", "guard": False, "repair_samples_per_class": 5, "train_epochs": 2}
    from metacompress.cli.run_cmd import _argv

    assert _argv(step) == (["compress", "--weights", "none", "--target-macs", "0.5", "--no-guard",
                            "--repair-samples-per-class", "5", "--out", "OUT", "--train-epochs", "2"], ["mlp"])


KEYS = ["pipeline", "steps", "vars", "model", "data", "out", "target_macs", "repair_steps", "guard", "teachers",
        "budgets", "allocations", "epochs", "iterations", "weights", "method", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["compress", "train", "sweep", "fuse", "policy-train",
                                                           "meta", "${x}", "digits", "0.5"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)),
    max_leaves=12)
documents = st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=8).map(yaml.safe_dump),
                      st.text(max_size=80))
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS + ["steps.0.model", "vars.x", "a.b"]),
                               st.text(max_size=8)), max_size=3)


@pytest.mark.integration
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents, extra=overrides)
def test_random_recipe_documents_never_crash(doc, extra):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(doc)
        code, output = invoke("run", path, *extra, "--dry-run")
    assert code in (0, 2), (doc, extra, output)
    assert "Traceback" not in output
    if code == 2:
        assert output.startswith("error: ") and len(output.strip().splitlines()) == 1, output


@pytest.mark.parametrize("doc,argv", [
    ({"pipeline": "train", "model": "mlp", "out": "d.pt", "epochs": 2},
     ["train", "--out", "d.pt", "--epochs", "2", "mlp"]),
    ({"pipeline": "quantize", "model": "m.onnx", "out": "q.onnx", "mode": "static"},
     ["quantize", "--out", "q.onnx", "--mode", "static", "m.onnx"]),
    ({"pipeline": "meta-train", "algo": "reptile", "tasks": "sinusoid", "meta_steps": 5, "out": "c.pt"},
     ["meta-train", "--algo", "reptile", "--tasks", "sinusoid", "--meta-steps", "5", "--out", "c.pt"]),
    ({"pipeline": "sweep", "model": "mlp", "budgets": [0.8, 0.4], "allocations": ["meta", "lamp"], "guard": False,
      "out": "s"}, ["sweep", "--budgets", "0.8,0.4", "--allocations", "meta,lamp", "--no-guard", "--out", "s", "mlp"]),
    ({"pipeline": "fuse", "model": "mlp", "method": "ties", "weights": ["a.pt", "b.pt"], "lambda": 0.5, "out": "f.pt"},
     ["fuse", "--method", "ties", "--weights", "a.pt,b.pt", "--out", "f.pt", "--lambda", "0.5", "mlp"]),
])
def test_every_pipeline_is_a_recipe(tmp_path, doc, argv):
    code, output = invoke("run", _recipe(tmp_path, yaml.safe_dump(doc)), "--dry-run", "--json")
    assert code == 0, output
    from metacompress.cli.run_cmd import _argv

    options, positional = _argv(json.loads(output)["steps"][0])
    assert [*options, *positional] == argv
