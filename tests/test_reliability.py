"""Adversarial input, generated (hypothesis): the command line and every file reader answer
bad input with one line and exit code 2 (a ``UserError`` in-process), never a traceback, an
internal error or an output file; what they accept is sound (finite data, labels in range).

RELIABILITY.md lists each input class and the test here that keeps it so.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import signal
import struct
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metacompress.cli.main import run
from metacompress.data import load_dataset
from metacompress.deploy import load_session
from metacompress.deploy.verify import check_onnx
from metacompress.errors import UserError

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_sound(d) -> None:
    """What a loader accepts is usable: finite samples, labels that index the classes, one sample shape."""
    assert d.x_train.shape[1:] == d.x_val.shape[1:] == d.x_test.shape[1:]
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        assert len(x) == len(y) and x.dtype == torch.float32 and y.dtype == torch.long
        assert torch.isfinite(x).all()
        assert len(y) == 0 or (int(y.min()) >= 0 and int(y.max()) < d.num_classes)
    assert len(d.x_train) > 0 and len(d.x_test) > 0


def load_or_user_error(spec: str):
    """The loader's only allowed outcomes: a sound Dataset or a one-line UserError."""
    try:
        d = load_dataset(spec)
    except UserError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        return None
    assert_sound(d)
    return d


# ---------------------------------------------------------------- command line (in-process main)

FRACTION, POSITIVE, UNIT = "fraction", "positive", "unit"
# flag -> (what is valid, a word the one-line error must contain)
FLAGS = {
    "--target-macs": (FRACTION, "--target-macs"), "--target-params": (FRACTION, "--target-params"),
    "--target-latency": (FRACTION, "--target-latency"), "--target-ms": (POSITIVE, "--target-ms"),
    "--repair-lr": (POSITIVE, "learning rate"), "--temperature": (POSITIVE, "temperature"),
    "--alpha": (UNIT, "alpha"),
    "--latency-batch": ((1, 4096), "--latency-batch"), "--threads": ((1, 1024), "--threads"),
    "--repair-steps": ((0, None), "repair steps"), "--students": ((1, None), "--students"),
    "--repair-samples-per-class": ((1, None), "samples per class"), "--seed": ((0, 2**32 - 1), "--seed"),
    "--train-epochs": ((1, None), "--train-epochs"), "--adapt-steps": ((0, None), "--adapt-steps"),
    "--round-to": ((1, None), "--round-to"),
    "--quantize": (("none", "auto", "static", "dynamic"), "--quantize"),
    "--allocation": (("meta", "uniform", "global-magnitude", "global-taylor", "lamp"), "allocation"),
}
BUDGETS = ("--target-macs", "--target-params", "--target-latency", "--target-ms")


def clearly_invalid(kind, value: str) -> bool:
    """True when ``value`` is invalid for ``kind`` whatever the parser's leniency (letters only,
    or a number out of range); False when it may be valid."""
    if value.isalpha() and value.isascii():
        if isinstance(kind, tuple) and isinstance(kind[0], str):
            return value not in kind
        return not (kind == (1, None) and value == "auto")  # --round-to auto
    try:
        number = float(value)
    except ValueError:
        return False
    if isinstance(kind, tuple) and isinstance(kind[0], str):
        return True
    if kind == FRACTION:
        return not 0 < number <= 1
    if kind == POSITIVE:
        return not 0 < number < math.inf
    if kind == UNIT:
        return not 0 <= number <= 1
    low, high = kind
    return not (math.isfinite(number) and number == int(number) and low <= number <= (high or math.inf))


VALUES = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
    st.text("abcdefghijklmnopqrstuvwxyzINF", min_size=1, max_size=8),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
)


def run_cli(capsys, args: list[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = run(args)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


@FUZZ
@given(flag=st.sampled_from(sorted(FLAGS)), value=VALUES)
def test_compress_flags_fuzzed_exit_2_one_line_no_output(capsys, tmp_path, flag, value):
    out = tmp_path / "out"
    budget = [] if flag in BUDGETS else ["--target-macs", "0.5"]
    # an unknown data spec ends any run whose flags all pass: nothing here ever trains or writes
    code, err = run_cli(capsys, ["compress", "mlp", "--data", "nosuch", "--weights", "none", *budget,
                                 f"{flag}={value}", "--out", str(out)])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    kind, word = FLAGS[flag]
    named = f"'{flag}'" in err[0] or word in err[0]  # the parser quotes the flag; range checks name it
    assert named or (not clearly_invalid(kind, value) and "unknown data spec" in err[0]), err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@settings(FUZZ, max_examples=40)
@given(flags=st.lists(st.sampled_from(BUDGETS), min_size=0, max_size=4, unique=True).filter(lambda f: len(f) != 1),
       value=st.floats(0.05, 1.0))
def test_compress_needs_exactly_one_budget(capsys, tmp_path, flags, value):
    args = [a for f in flags for a in (f, repr(value))]
    code, err = run_cli(capsys, ["compress", "mlp", "--weights", "none", *args, "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1 and "exactly one budget" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,fragment", [
    (["compress", "mlp", "--target-macs", "0.5", "--bogus", "1", "--out", "o"], "No such option"),
    (["compress", "mlp", "--target-macs", "0.5"], "Missing option '--out'"),
    (["nosuch"], "No such command"),
    (["bench", "m.onnx", "--repeats", "0"], "--repeats"),
    (["bench", "m.onnx", "--batch", "1,100000"], "--batch"),
    (["bench", "m.onnx", "--input-shape", "3x100000x100000"], "--input-shape"),
])
def test_malformed_command_lines_one_line(capsys, tmp_path, monkeypatch, tiny_onnx, args, fragment):
    monkeypatch.chdir(tmp_path)
    if args[0] == "bench":
        tiny_onnx(tmp_path / "m.onnx")
    code, err = run_cli(capsys, args)
    assert code == 2 and len(err) == 1 and fragment in err[0], err


# ---------------------------------------------------------------- npz

X_DTYPES = ("float32", "float64", "int8", "uint8", "bool", "complex64", "U3")
Y_DTYPES = ("int64", "uint8", "int8", "float32", "U1")


@st.composite
def npz_files(draw):
    """An npz built the way users build them, with one or more faults drawn in."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n_tr, n_te = draw(st.integers(0, 60)), draw(st.integers(0, 16))
    sample = draw(st.sampled_from([(6,), (1, 4, 4), (4, 4, 3), (3, 4, 4), (0,), (2, 2, 2), ()]))
    classes = draw(st.integers(1, 5))

    def x(n):
        a = rng.normal(size=(n, *sample)).astype(draw(st.sampled_from(X_DTYPES)))
        if draw(st.booleans()) and a.size and a.dtype.kind == "f":
            a.flat[rng.integers(a.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
        return a

    def y(n):
        a = (np.arange(n + draw(st.sampled_from([0, 0, 0, -1, 1]))) % classes).astype(np.float64)
        if draw(st.booleans()) and a.size:
            a[rng.integers(a.size)] = draw(st.sampled_from([-1, 10**9, 2.5, 255, np.nan]))
        with np.errstate(all="ignore"):
            a = a.astype(draw(st.sampled_from(Y_DTYPES)))
        if draw(st.integers(0, 9)) == 0:
            a = a.reshape(-1, 1) if a.size else a
        return a

    arrays = {"x_train": x(n_tr), "y_train": y(n_tr), "x_test": x(n_te), "y_test": y(n_te)}
    for key in draw(st.lists(st.sampled_from(sorted(arrays)), max_size=1)):
        del arrays[key]
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **arrays)
    raw = bytearray(buf.getvalue())
    fault = draw(st.sampled_from(["none", "none", "truncate", "flip", "garbage"]))
    if fault == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif fault == "flip":
        for _ in range(draw(st.integers(1, 8))):
            raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
    elif fault == "garbage":
        raw = bytearray(rng.bytes(draw(st.integers(0, 300))))
    return bytes(raw)


@FUZZ
@given(content=npz_files())
def test_npz_loader_fuzzed(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        path.write_bytes(content)
        load_or_user_error(f"npz:{path}")


def _npy_member(shape: tuple[int, ...], payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def test_npz_header_declaring_huge_array_refused_before_allocation(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x_train.npy", _npy_member((10**12, 784), b"\0" * 64))
        for key in ("y_train", "x_test", "y_test"):
            zf.writestr(f"{key}.npy", _npy_member((4,), b"\0" * 16))
    with pytest.raises(UserError, match=r"declares shape \(1000000000000, 784\)"):
        load_dataset(f"npz:{path}")


# ---------------------------------------------------------------- idx

IDX_NAMES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


@st.composite
def idx_folders(draw):
    """Four idx files (images N x 4 x 4, labels N), each possibly forged: dtype code, rank, dims,
    payload length, gzip or not, garbage."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n = {"train": draw(st.integers(0, 50)), "test": draw(st.integers(0, 12))}
    files = {}
    for key, name in IDX_NAMES.items():
        split = key.split("_")[1]
        dims = [n[split], 4, 4] if key.startswith("x") else [n[split]]
        code = 0x08
        if draw(st.integers(0, 3)) == 0:
            code = draw(st.sampled_from([0x07, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]))
            dims = draw(st.lists(st.sampled_from([0, 1, 3, 4, 7, 2**31 - 1, 2**32 - 1]), min_size=0, max_size=5))
        itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(code, 1)
        size = int(np.prod(dims, dtype=np.int64)) * itemsize if dims else 0
        length = max(0, min(size, 4096) + draw(st.sampled_from([0, 0, 0, -1, 1, -7])))
        payload = rng.integers(0, 4, length).astype(np.uint8).tobytes() if key.startswith("y") else rng.bytes(length)
        raw = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload
        if draw(st.integers(0, 9)) == 0:
            raw = raw[: draw(st.integers(0, len(raw)))]
        gz = draw(st.booleans())
        files[name + (".gz" if gz else "")] = gzip.compress(raw) if gz else raw
    return files


@FUZZ
@given(files=idx_folders())
def test_idx_loader_fuzzed(files):
    with tempfile.TemporaryDirectory() as tmp:
        for name, raw in files.items():
            (Path(tmp) / name).write_bytes(raw)
        load_or_user_error(f"idx:{tmp}")


def test_idx_header_declaring_huge_array_refused(tmp_path):
    for key, name in IDX_NAMES.items():  # labels and test images fine, train images forged
        dims = (10**9, 1000, 1000) if key == "x_train" else (4, 2, 2) if key == "x_test" else (4,)
        (tmp_path / name).write_bytes(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + b"\0" * 16)
    with pytest.raises(UserError, match="header declares"):
        load_dataset(f"idx:{tmp_path}")


# ---------------------------------------------------------------- imagefolder

def _png(rng, size: tuple[int, int], mode: str) -> bytes:
    from PIL import Image

    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def image_folders(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    files = {}
    for split in ("train", "test"):
        for cls in draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=0, max_size=3, unique=True)):
            for i in range(draw(st.integers(0, 6 if split == "train" else 2))):
                kind = draw(st.sampled_from(["ok", "ok", "ok", "ok", "size", "garbage", "truncated", "txt"]))
                mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P"]))
                data = _png(rng, (size[0] + 1, size[1]) if kind == "size" else size, mode)
                if kind == "garbage":
                    data = rng.bytes(draw(st.integers(0, 64)))
                elif kind == "truncated":
                    data = data[: draw(st.integers(0, len(data) - 1))]
                files[f"{split}/{cls}/{i}.{'txt' if kind == 'txt' else 'png'}"] = data
    return files


@FUZZ
@given(files=image_folders())
def test_imagefolder_loader_fuzzed(files):
    pytest.importorskip("torchvision")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        d = load_or_user_error(f"imagefolder:{tmp}")
        if d is not None:
            assert d.input_shape[0] == 3 and float(d.x_train.max()) <= 1.0


def test_imagefolder_image_of_absurd_size_refused_before_decoding(tmp_path):
    pytest.importorskip("torchvision")
    png = bytearray(_png(np.random.default_rng(0), (4, 4), "RGB"))
    png[16:24] = struct.pack(">II", 5000, 5000)  # IHDR width, height: 25 M pixels, under PIL's own bomb limit
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "0.png").write_bytes(bytes(png))
    with pytest.raises(UserError, match="5000 x 5000 image is larger than the limit"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_test_classes_must_match_train(tmp_path):
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    for split, classes in (("train", "ab"), ("test", "b")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6):
                (tmp_path / split / c / f"{i}.png").write_bytes(_png(rng, (4, 4), "RGB"))
    with pytest.raises(UserError, match="same class folders"):  # labels would silently shift otherwise
        load_dataset(f"imagefolder:{tmp_path}")


# ---------------------------------------------------------------- ONNX reader

@FUZZ
@given(seed=st.integers(0, 2**16), fault=st.sampled_from(["flip", "truncate", "insert", "garbage"]),
       count=st.integers(1, 6))
def test_onnx_reader_fuzzed(tiny_onnx, seed, fault, count):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        raw = bytearray(tiny_onnx(path))
        if fault == "flip":
            for _ in range(count):
                raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
        elif fault == "truncate":
            raw = raw[: rng.integers(len(raw))]
        elif fault == "insert":
            at = int(rng.integers(len(raw)))
            raw[at:at] = rng.bytes(count)
        else:
            raw = bytearray(rng.bytes(int(rng.integers(0, 200))))
        path.write_bytes(bytes(raw))
        try:
            check_onnx(path)
            session = load_session(path, threads=1)
        except UserError as exc:
            assert "\n" not in str(exc)
            return
        assert session.get_inputs()  # what passes the checker opens in onnxruntime


def test_onnx_checker_refuses_invalid_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "missing"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bad.onnx")
    with pytest.raises(UserError, match="not a valid ONNX model"):
        check_onnx(tmp_path / "bad.onnx")


# ---------------------------------------------------------------- one table of bad inputs, end to end (in-process main)

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files a user might hand over by mistake (or on purpose)."""
    import json
    import shutil

    from metacompress.policy.store import DEFAULT_DIR
    from metacompress.zoo import build_model

    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    (d / "garbage.pt").write_bytes(rng.bytes(500))
    (d / "garbage.onnx").write_bytes(rng.bytes(500))
    (d / "empty.onnx").write_bytes(b"")
    torch.save([1, 2, 3], d / "list.pt")
    state = build_model("mlp", (1, 8, 8), 10).state_dict()
    torch.save(state, d / "ok.pt")
    torch.save({k: v.to(torch.int64) for k, v in state.items()}, d / "int.pt")
    torch.save({k: v.clone().fill_(float("inf")) if k == "features.1.weight" else v for k, v in state.items()},
               d / "inf.pt")
    y = np.arange(100) % 3
    np.savez(d / "labels.npz", x_train=rng.random((100, 6)), y_train=y + 10**7, x_test=rng.random((20, 6)), y_test=y[:20])
    np.savez(d / "single.npz", x_train=rng.random((10, 6)), y_train=np.arange(10), x_test=rng.random((5, 6)),
             y_test=np.arange(5))
    np.savez(d / "rank6.npz", x_train=rng.random((100, 1, 2, 2, 2, 2)), y_train=y, x_test=rng.random((20, 1, 2, 2, 2, 2)),
             y_test=y[:20])
    np.savez(d / "rank3.npz", x_train=rng.random((100, 8, 8)), y_train=y, x_test=rng.random((20, 8, 8)), y_test=y[:20])
    np.savez(d / "mismatch.npz", x_train=rng.random((100, 6)), y_train=y[:90], x_test=rng.random((20, 6)), y_test=y[:20])
    np.savez(d / "empty.npz", x_train=np.zeros((0, 6)), y_train=y[:0], x_test=rng.random((20, 6)), y_test=y[:20])
    for name, edit in (("v2", lambda m: m | {"version": 2}), ("list", lambda m: [1, 2]),
                       ("defaults", lambda m: m | {"repair_defaults": {"lr": "fast"}})):
        (d / name).mkdir()
        shutil.copy(DEFAULT_DIR / "policy.safetensors", d / name)
        (d / name / "policy.json").write_text(json.dumps(edit(json.loads((DEFAULT_DIR / "policy.json").read_text()))))
    return d


C = ["compress", "mlp", "--target-macs", "0.5", "--allocation", "uniform", "--repair-steps", "0", "--weights"]
BAD = [
    ([*C, "{d}/garbage.pt"], "not a PyTorch checkpoint"),
    ([*C, "{d}/list.pt"], "not a state dict"),
    ([*C, "{d}/int.pt"], "wrong dtype"),
    ([*C, "{d}/inf.pt"], "NaN or infinite values in: features.1.weight"),
    ([*C, "none", "--data", "npz:{d}/labels.npz"], "labels must be class indices"),
    ([*C, "none", "--data", "npz:{d}/single.npz"], "cannot split"),
    ([*C, "none", "--data", "npz:{d}/rank6.npz"], "must be N x F"),
    (["compress", "lenet5", "--target-macs", "0.5", "--weights", "none", "--data", "npz:{d}/rank3.npz"],
     "give grayscale images a channel axis"),
    ([*C, "none", "--data", "npz:{d}/mismatch.npz"], "label and sample counts differ"),
    ([*C, "none", "--data", "npz:{d}/empty.npz"], "needs training and test samples"),
    ([*C, "none", "--data", "digits@100000"], "digits@SIZE with 8 <= SIZE <= 512"),
    ([*C, "none", "--data", "synthetic:3x100000x100000"], "the limit is"),
    ([*C, "none", "--data", "synthetic:3x32x32:n=1000000000000"], "GiB as float32"),
    ([*C, "none", "--allocation", "meta", "--policy", "{d}/v2"], "metacompress.policy/2 is not supported"),
    ([*C, "none", "--allocation", "meta", "--policy", "{d}/list"], "a JSON object is expected"),
    ([*C, "none", "--allocation", "meta", "--policy", "{d}/defaults"], "repair_defaults"),
    ([*C, "none", "--repair-lr", "inf"], "finite"),
    ([*C, "none", "--temperature", "1e999"], "finite"),
    ([*C, "none", "--latency-batch", "10000000000000000000"], "--latency-batch"),
    ([*C, "none", "--seed", "100000000000000000000000"], "--seed"),
    ([*C, "none", "--out", "/proc/o"], "cannot write in /proc"),
    (["train", "mlp", "--epochs", "1", "--out", "/proc/x.pt"], "cannot write /proc/x.pt"),
    (["meta-eval", "{d}/list.pt"], "not a meta-train checkpoint"),
    (["verify", "{d}/garbage.onnx", "--data", "digits"], "not a valid ONNX model"),
    (["verify", "{d}/empty.onnx", "--data", "digits"], "not a valid ONNX model"),
    (["bench", "{d}/garbage.onnx"], "not a valid ONNX model"),
    (["quantize", "{d}/garbage.onnx", "--out", "{d}/garbage.onnx"], "holds or lies inside the input"),
    (["fuse", "mlp", "--method", "uniform", "--weights", "{d}/ok.pt,{d}/ok.pt", "--out", "{d}/ok.pt"],
     "holds or lies inside the input"),
]


@pytest.mark.parametrize("args,fragment", BAD, ids=[f"{i}-{b[1][:24]}" for i, b in enumerate(BAD)])
def test_bad_input_exit_2_one_line_no_output(capsys, tmp_path, bad_files, args, fragment):
    argv = [a.format(d=bad_files) for a in args]
    if "--out" not in argv and argv[0] == "compress":
        argv += ["--out", str(tmp_path / "o")]
    before = sorted(p.name for p in bad_files.iterdir())
    code, err = run_cli(capsys, argv)
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o").exists() and sorted(p.name for p in bad_files.iterdir()) == before


# ---------------------------------------------------------------- recipes (metacompress run RECIPE --dry-run)

RECIPE_KEYS = ("pipeline", "model", "data", "target_macs", "target_ms", "repair_steps", "allocation", "weights", "out",
               "seed", "epochs", "steps", "vars", "quantize", "students", "method", "algo", "bogus")
PIPELINE_NAMES = ("compress", "train", "quantize", "fuse", "meta-train", "sweep", "policy-train", "policy-eval", "nosuch")
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
                    st.text(max_size=10), st.sampled_from(["${out}", "${nosuch}", "mlp", "digits", "0.5", "-1"]))
VALUES_TREE = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(RECIPE_KEYS), kids, max_size=3)), max_leaves=8)


@st.composite
def recipe_texts(draw):
    doc = draw(st.dictionaries(st.sampled_from(RECIPE_KEYS), VALUES_TREE, max_size=6))
    if draw(st.integers(0, 3)):
        doc["pipeline"] = draw(st.sampled_from(PIPELINE_NAMES))
    import yaml

    text = yaml.safe_dump(doc, sort_keys=False)
    fault = draw(st.sampled_from(["none", "none", "truncate", "insert", "tag", "alias", "garbage"]))
    if fault == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif fault == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["\t", ":", "- ", "{", "&a ", "*a", "\n  x: 1", "'", "\0"])) + text[at:]
    elif fault == "tag":  # the unsafe loader would call os.system here
        text += "hook: !!python/object/apply:os.system ['touch {marker}']\n"
    elif fault == "alias":
        text += "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"a{i}: &a{i} [{', '.join([f'*a{i - 1}' if i > 1 else '*a'] * 10)}]\n" for i in range(1, 7))
    elif fault == "garbage":
        text = draw(st.text(max_size=80))
    overrides = draw(st.lists(st.tuples(st.sampled_from(RECIPE_KEYS + ("steps.0.model", "vars.out", "a.b.c")),
                                        st.text(max_size=6)).map("=".join), max_size=2))
    return text, overrides


@settings(FUZZ, max_examples=200)
@given(case=recipe_texts())
def test_recipe_loader_fuzzed(capsys, tmp_path, monkeypatch, case):
    text, overrides = case
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.chdir(tmp)
        marker = Path(tmp) / "marker"
        Path(tmp, "r.yaml").write_text(text.replace("{marker}", str(marker)), encoding="utf-8", errors="replace")
        code, err = run_cli(capsys, ["run", "r.yaml", *overrides, "--dry-run"])
        assert code in (0, 2), (code, err)
        assert code == 0 or (len(err) == 1 and err[0].startswith("error: ")), err
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["r.yaml"] and not marker.exists()


def _idle_pool_worker(ready) -> None:
    from metacompress.signals import pool_worker_signals

    pool_worker_signals()
    ready.set()
    time.sleep(30)


def test_a_forked_pool_worker_dies_on_sigterm_without_a_traceback(capfd):
    """Pool.terminate sends SIGTERM to its workers; one that inherited ``Interrupted`` from the
    command's handler printed a traceback at the end of a run that succeeded (and exited 1)."""
    import multiprocessing as mp

    from metacompress.signals import signals_raise

    ctx = mp.get_context("fork")
    ready = ctx.Event()
    with signals_raise():
        p = ctx.Process(target=_idle_pool_worker, args=(ready,))
        p.start()
    assert ready.wait(20)
    os.kill(p.pid, signal.SIGTERM)
    p.join(20)
    assert p.exitcode == -signal.SIGTERM
    assert "Traceback" not in capfd.readouterr().err


def test_a_corrupt_weights_file_is_named_without_torchs_unsafe_advice(tmp_path):
    from metacompress.errors import UserError
    from metacompress.io import load_weights

    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    with pytest.raises(UserError) as err:
        load_weights(tmp_path / "notes.pt")
    message = str(err.value)
    assert "not a PyTorch checkpoint" in message and "\n" not in message
    assert "weights_only" not in message and "Unsupported operand" in message
