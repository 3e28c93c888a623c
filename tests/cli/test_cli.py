"""The command line: exit codes, one-line errors, no half-written outputs, JSON on stdout."""

import json

import pytest
import torch

from metacompress.data import load_dataset
from metacompress.zoo import build_model
from tests.helpers import assert_user_error, run

pytestmark = pytest.mark.integration  # every test runs the CLI in a subprocess


@pytest.fixture(scope="module")
def mlp_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "mlp.pt"
    res = run("train", "mlp", "--data", "digits", "--epochs", "8", "--out", path, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["accuracy"] > 0.9
    return path


def test_compress_json_report_and_outputs(tmp_path, mlp_weights):
    out = tmp_path / "out"
    res = run("compress", "mlp", "--data", "digits", "--weights", mlp_weights, "--target-macs", "0.5",
              "--allocation", "lamp", "--repair-steps", "40", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert abs(report["achieved_macs_ratio"] - 0.5) <= 0.01
    assert report["onnx"]["top1_agreement"] >= 0.995
    assert report["compressed"]["accuracy"] >= report["dense"]["accuracy"] - 0.03
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt", "report.json"]


def test_test_samples_bound_the_reported_accuracies(tmp_path, mlp_weights):
    """--test-samples N: the accuracies and the ONNX check count N test samples, not the whole split."""
    res = run("compress", "mlp", "--data", "digits", "--weights", mlp_weights, "--target-macs", "0.5",
              "--allocation", "uniform", "--repair-steps", "0", "--test-samples", "90", "--out", tmp_path / "o", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["test_samples"] == 90 and report["onnx"]["parity_samples"] == 90
    assert report["compressed"]["accuracy_before_repair_samples"] == 90
    from metacompress.pipeline import load_dense
    from metacompress.training import accuracy

    data = load_dataset("digits").test_subset(90)
    dense = load_dense("mlp", data, str(mlp_weights))
    assert report["dense"]["accuracy"] == pytest.approx(accuracy(dense, data.x_test, data.y_test))


@pytest.mark.parametrize("args,fragments", [
    (["compress", "nosuch", "--target-macs", "0.5"], ["unknown model 'nosuch'"]),
    (["compress", "mlp", "--data", "nosuch", "--target-macs", "0.5"], ["unknown data spec"]),
    (["compress", "mlp", "--weights", "/no/such.pt", "--target-macs", "0.5"], ["not found", "/no/such.pt"]),
    (["compress", "mlp", "--weights", "none", "--target-macs", "1.5"], ["(0, 1]"]),
    (["compress", "mlp", "--weights", "none", "--target-macs", "0"], ["(0, 1]"]),
    (["compress", "resnet20", "--weights", "none", "--target-macs", "0.001", "--allocation", "uniform"],
     ["unreachable without removing whole layers"]),
    (["compress", "resnet20", "--data", "synthetic:20", "--weights", "none", "--target-macs", "0.5"],
     ["needs image input"]),
    (["compress", "mlp", "--weights", "none", "--target-macs", "0.5", "--allocation", "best"],
     ["unknown allocation 'best'"]),
    (["compress", "mlp", "--weights", "none", "--target-macs", "0.5", "--test-samples", "0"],
     ["--test-samples must be at least 1"]),
])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, args, fragments):
    out = tmp_path / "out"
    res = run(*args, "--out", out)
    assert_user_error(res, *fragments)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_state_dict_that_does_not_fit(tmp_path, mlp_weights):
    res = run("compress", "resnet20", "--weights", mlp_weights, "--target-macs", "0.5", "--out", tmp_path / "o")
    assert_user_error(res, "does not fit model 'resnet20'")


def test_nan_weights_rejected(tmp_path, digits):
    model = build_model("mlp", digits.input_shape, 10, digits.mean, digits.std)
    sd = model.state_dict()
    sd["features.1.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    res = run("compress", "mlp", "--weights", tmp_path / "nan.pt", "--target-macs", "0.5", "--out", tmp_path / "o")
    assert_user_error(res, "NaN", "features.1.weight")


def test_pickled_module_needs_trust_flag(tmp_path, digits):
    model = build_model("mlp", digits.input_shape, 10, digits.mean, digits.std)
    torch.save(model, tmp_path / "whole.pt")
    res = run("compress", "mlp", "--weights", tmp_path / "whole.pt", "--target-macs", "0.5", "--out", tmp_path / "o")
    assert_user_error(res, "refusing to unpickle", "--trust-pickle")


def factory_spec(tmp_path, args: str, layers: str) -> str:
    """A user model file whose ``build(args)`` returns ``nn.Sequential(layers)``, as a model spec."""
    (tmp_path / "net.py").write_text(f"import torch.nn as nn\ndef build({args}):\n    return nn.Sequential({layers})\n")
    return f"{tmp_path / 'net.py'}:build"


def test_user_model_factory_whose_forward_fails(tmp_path):
    spec = factory_spec(tmp_path, "num_classes", "nn.Flatten(), nn.Linear(784, num_classes)")
    res = run("compress", spec, "--weights", "none", "--target-macs", "0.5", "--out", tmp_path / "o")
    assert_user_error(res, "cannot run on float32 inputs of shape (1, 8, 8)")


def test_user_model_factory_compresses(tmp_path):
    spec = factory_spec(tmp_path, "input_shape, num_classes",
                        "nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, num_classes)")
    res = run("compress", spec, "--weights", "none", "--target-params", "0.5",
              "--allocation", "uniform", "--repair-steps", "0", "--out", tmp_path / "o", "--json")
    assert res.returncode == 0, res.stderr
    assert abs(json.loads(res.stdout)["achieved_params_ratio"] - 0.5) <= 0.01


def test_user_factory_whose_model_returns_a_dict_compresses_and_round_trips(tmp_path):
    """A forward returning {"logits": ..., "features": ...} stopped with an internal error; the
    scores are read under 'logits', and model.pt rebuilds a model that matches model.onnx."""
    (tmp_path / "dictnet.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU())\n"
        "        self.head = nn.Linear(96, num_classes)\n"
        "    def forward(self, x):\n"
        "        f = self.body(x)\n"
        "        return {'logits': self.head(f), 'features': f}\n"
        "def build(num_classes):\n"
        "    return Net(num_classes)\n")
    out = tmp_path / "o"
    res = run("compress", f"{tmp_path / 'dictnet.py'}:build", "--weights", "none", "--target-params", "0.5",
              "--allocation", "uniform", "--repair-steps", "0", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    assert abs(json.loads(res.stdout)["achieved_params_ratio"] - 0.5) <= 0.01
    res = run("verify", out / "model.onnx", "--reference", out / "model.pt", "--data", "digits", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["max_rel_diff"] <= 1e-5


def test_user_factory_whose_model_returns_no_scores_is_refused(tmp_path):
    spec = factory_spec(tmp_path, "num_classes", "nn.Flatten(), nn.Linear(64, num_classes), nn.Softmax(1), nn.Flatten(0)")
    res = run("compress", spec, "--weights", "none", "--target-macs", "0.5", "--out", tmp_path / "o")
    assert_user_error(res, "gives outputs of shape (20,); expected (N, 10) class scores")


def test_user_factory_gets_the_data_normalisation_only_when_it_names_it(tmp_path):
    """The built-in models normalise their input with the data's mean and std; a factory that
    names them gets them too, and a ``**kwargs`` factory, which may pass them on, does not."""
    (tmp_path / "nets.py").write_text(
        "import torch.nn as nn\n"
        "def named(input_shape, num_classes, mean, std):\n"
        "    net = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
        "    net.norm = (mean, std)\n"
        "    return net\n"
        "def forwarding(input_shape, num_classes, **kwargs):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes, **kwargs))\n")
    named = build_model(f"{tmp_path / 'nets.py'}:named", (1, 8, 8), 10, mean=4.9, std=6.0)
    assert named.norm == (4.9, 6.0)
    forwarding = build_model(f"{tmp_path / 'nets.py'}:forwarding", (1, 8, 8), 10, mean=4.9, std=6.0)
    assert forwarding[1].out_features == 10


def test_inspect_lists_groups(tmp_path):
    res = run("inspect", "resnet20", "--data", "digits", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert len(info["groups"]) == 12
    assert sum(g["residual"] for g in info["groups"]) == 3  # one coupled group per stage
    assert sum(layer["macs"] for layer in info["layers"]) == info["macs"]


def test_inspect_names_the_groups_kept_whole_and_why(tmp_path):
    """A user model whose hidden width is also a buffer's length: removing a hidden unit breaks its
    forward pass, so that group is kept whole, and ``inspect`` says so (JSON and table)."""
    (tmp_path / "scaled.py").write_text(
        "import torch, torch.nn as nn\n"
        "class Scaled(nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.a, self.b, self.c = nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, num_classes)\n"
        "        self.register_buffer('scale', torch.linspace(0.5, 1.5, 48))\n"
        "    def forward(self, x):\n"
        "        return self.c(torch.relu(self.b(torch.relu(self.a(x.flatten(1))) * self.scale)))\n"
        "def build(num_classes):\n"
        "    return Scaled(num_classes)\n")
    spec = f"{tmp_path / 'scaled.py'}:build"
    res = run("inspect", spec, "--data", "digits", "--json")
    assert res.returncode == 0, res.stderr
    whole = {g["name"]: g["kept_whole"] for g in json.loads(res.stdout)["groups"]}
    assert whole["b"] == "" and whole["a"].startswith("removing its units breaks the forward pass: The size of tensor a")
    res = run("inspect", spec, "--data", "digits")
    assert res.returncode == 0 and "kept whole: 'a' (removing its units breaks the forward pass" in " ".join(res.stdout.split())


def test_policy_commands_bad_input(tmp_path):
    assert_user_error(run("policy", "train", "--config", tmp_path / "none.yaml"), "recipe not found")
    (tmp_path / "r.yaml").write_text("teachers: []\nbogus: 1\n")
    assert_user_error(run("policy", "train", "--config", tmp_path / "r.yaml"), "unknown policy-training option")
    (tmp_path / "a.yaml").write_text("teachers: []\nanchor: oracle\n")
    assert_user_error(run("policy", "train", "--config", tmp_path / "a.yaml", "--out", tmp_path / "p"), "unknown expert")
    assert not (tmp_path / "p").exists()
    assert_user_error(run("policy", "info", tmp_path), "policy not found")


def test_policy_info_shows_provenance():
    res = run("policy", "info", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["provenance"]["iterations"] >= 10 and info["parameters"] > 100
    assert set(info["repair_defaults"]) >= {"lr", "temperature", "alpha", "bn_samples"}
    assert info["kinds_seen"] == ["conv", "linear"]  # the shipped policy met mlp, vgg-small and resnet20 only
    sel = info["provenance"]["selection"]  # stage 2 ships its best iterate on the selection tasks
    assert sel["selected_iteration"] == max(sel["scores"], key=lambda s: s["reward"])["iteration"]
    text = run("policy", "info")
    assert f"shipped: iteration {sel['selected_iteration']}, the best on {sel['tasks']} selection tasks" in " ".join(
        text.stdout.split())


TEXT_FILE = (
    "import torch, torch.nn as nn\n"
    "class Net(nn.Module):\n"
    "    def __init__(self, num_classes):\n"
    "        super().__init__()\n"
    "        self.embed = nn.Embedding(30, 32)\n"
    "        self.mix = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))\n"
    "        self.head = nn.Linear(32, num_classes)\n"
    "    def forward(self, ids):\n"
    "        return self.head(self.mix(self.embed(ids)).mean(1))\n"
    "def build(num_classes):\n"
    "    return Net(num_classes)\n")


def test_token_ids_from_npz_compress_to_an_onnx_model_with_an_int64_input(tmp_path):
    """``npz:PATH:tokens``: integer sequences stay token ids through training, compression,
    export, verification and int8; without the option they are features, and a float sample
    is refused as a token id."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = rng.integers(3, 30, (600, 10))
    x[rng.random((600, 10)) < 0.3] = 0
    x = np.where(x == 0, y[:, None], x)  # the class is the marker token (ids 0-2) that repeats
    np.savez(tmp_path / "text.npz", x=x, y=y)
    (tmp_path / "tnet.py").write_text(TEXT_FILE)
    spec, out = f"{tmp_path / 'tnet.py'}:build", tmp_path / "o"
    res = run("compress", spec, "--data", f"npz:{tmp_path / 'text.npz'}:tokens", "--target-macs", "0.5",
              "--allocation", "uniform", "--repair-steps", "20", "--round-to", "4", "--quantize", "auto",
              "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert abs(report["achieved_macs_ratio"] - 0.5) <= 0.01
    assert report["dense"]["accuracy"] > 0.9 and report["compressed"]["accuracy"] > 0.8
    assert report["onnx"]["max_abs_diff"] <= 1e-4 and report["onnx"]["dense_max_abs_diff"] <= 1e-4
    graph_input = onnx.load(out / "model.onnx").graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert report["int8"]["top1_agreement"] >= 0.9
    assert_user_error(run("compress", spec, "--data", f"npz:{tmp_path / 'text.npz'}", "--target-macs", "0.5",
                          "--out", tmp_path / "o2"), "float32", "npz:PATH:tokens")
    np.savez(tmp_path / "floats.npz", x=x.astype(np.float32), y=y)
    assert_user_error(run("compress", spec, "--data", f"npz:{tmp_path / 'floats.npz'}:tokens", "--target-macs", "0.5",
                          "--out", tmp_path / "o3"), "token ids")


TRANSFORMER_FILE = (
    "import torch.nn as nn\n"
    "class Net(nn.Module):\n"
    "    def __init__(self, num_classes):\n"
    "        super().__init__()\n"
    "        self.embed = nn.Linear(8, 32)\n"
    "        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)\n"
    "        self.encoder = nn.TransformerEncoder(layer, 2)\n"
    "        self.head = nn.Linear(32, num_classes)\n"
    "    def forward(self, x):\n"
    "        return self.head(self.encoder(self.embed(x.flatten(1, 2))).mean(1))\n"
    "def build(num_classes):\n"
    "    return Net(num_classes)\n")


def test_user_transformer_of_pytorch_layers_compresses_and_round_trips(tmp_path, digits):
    """``nn.TransformerEncoderLayer`` blocks: attention MACs counted, heads pruned; model.pt (with
    the converted attention) rebuilds as what model.onnx computes, and a converted state dict
    loads as --weights."""
    from metacompress.compress.attention import split_self_attention
    from metacompress.compress.checkpoint import load_compressed
    from metacompress.deploy import verify_onnx
    from metacompress.pipeline import load_dense

    (tmp_path / "tnet.py").write_text(TRANSFORMER_FILE)
    spec, out = f"{tmp_path / 'tnet.py'}:build", tmp_path / "o"
    # round_to fixed: under "auto" (16 on AVX-512) the uniform rule keeps these 8-dim heads whole
    res = run("compress", spec, "--weights", "none", "--target-macs", "0.5", "--allocation", "uniform",
              "--repair-steps", "0", "--round-to", "8", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert abs(report["achieved_macs_ratio"] - 0.5) <= 0.01
    assert any(g["kind"] == "attention" and g["kept"] < g["channels"] for g in report["groups"])
    rebuilt, _ = load_compressed(out / "model.pt")
    assert verify_onnx(out / "model.onnx", rebuilt, digits.x_test[:32], digits.y_test[:32])["max_rel_diff"] <= 1e-5
    converted = build_model(spec, digits.input_shape, 10)
    split_self_attention(converted, digits.x_train[:1])
    torch.save(converted.state_dict(), tmp_path / "converted.pt")
    loaded = load_dense(spec, digits, str(tmp_path / "converted.pt"))
    assert torch.equal(loaded(digits.x_test[:4]), converted.eval()(digits.x_test[:4]))
