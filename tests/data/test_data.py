"""Data specs: shapes, fixed splits, user files, and errors that say what is wrong."""

import numpy as np
import pytest
import torch

from metacompress.data import load_dataset, subsample_per_class
from metacompress.errors import UserError
from tests.helpers import write_idx


def test_digits_splits_are_fixed_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (1293, 144, 360)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_test, b.y_test)
    assert float(a.x_train.max()) == 16.0  # raw pixel values: normalisation lives in the model
    big = load_dataset("digits@32")
    assert big.input_shape == (1, 32, 32) and torch.equal(big.y_test, a.y_test)


def test_synthetic_is_seeded_and_learnable_shapes():
    img = load_dataset("synthetic:3x16x16:classes=4:n=300")
    assert img.input_shape == (3, 16, 16) and img.num_classes == 4
    assert torch.equal(img.x_train, load_dataset("synthetic:3x16x16:classes=4:n=300").x_train)
    assert load_dataset("synthetic:20").input_shape == (20,)
    with pytest.raises(UserError, match="n >= "):
        load_dataset("synthetic:3x8x8:n=60")
    with pytest.raises(UserError, match="malformed synthetic spec"):
        load_dataset("synthetic:abc")


def test_npz_shapes(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    np.savez(tmp_path / "img.npz", x_train=rng.random((200, 8, 8, 3)), y_train=y,
             x_test=rng.random((40, 8, 8, 3)), y_test=y[:40])
    d = load_dataset(f"npz:{tmp_path / 'img.npz'}")
    assert d.input_shape == (3, 8, 8) and d.num_classes == 4
    np.savez(tmp_path / "flat.npz", x_train=rng.random((200, 12)), y_train=y, x_test=rng.random((40, 12)),
             y_test=y[:40])
    assert load_dataset(f"npz:{tmp_path / 'flat.npz'}").input_shape == (12,)
    np.savez(tmp_path / "seq.npz", x_train=rng.random((200, 2, 30)), y_train=y, x_test=rng.random((40, 2, 30)),
             y_test=y[:40])
    assert load_dataset(f"npz:{tmp_path / 'seq.npz'}").input_shape == (2, 30)  # sequences stay N x C x L
    np.savez(tmp_path / "vol.npz", x_train=rng.random((200, 1, 4, 5, 6)), y_train=y,
             x_test=rng.random((40, 1, 4, 5, 6)), y_test=y[:40])
    assert load_dataset(f"npz:{tmp_path / 'vol.npz'}").input_shape == (1, 4, 5, 6)
    np.savez(tmp_path / "bad.npz", x_train=rng.random((200, 12)), y_train=y)
    with pytest.raises(UserError, match="lacks array"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    with pytest.raises(UserError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'none.npz'}")


def test_npz_of_one_set_is_split_by_class_and_seed(tmp_path):
    """x and y alone: a fifth of each class is held out for test, the same fifth on every load."""
    rng = np.random.default_rng(0)
    x, y = rng.random((250, 1, 6, 6)).astype(np.float32), np.r_[np.zeros(200, int), np.ones(50, int)]
    np.savez(tmp_path / "one.npz", x=x, y=y)
    a, b = load_dataset(f"npz:{tmp_path / 'one.npz'}"), load_dataset(f"npz:{tmp_path / 'one.npz'}")
    assert a.input_shape == (1, 6, 6) and a.num_classes == 2
    assert len(a.x_test) == 50 and int(a.y_test.sum()) == 10  # stratified: 40 of class 0, 10 of class 1
    assert len(a.x_train) + len(a.x_val) == 200 and torch.equal(a.x_test, b.x_test)
    rows = {tuple(r.flatten().tolist()) for r in torch.cat([a.x_train, a.x_val, a.x_test])}
    assert len(rows) == 250  # every sample in exactly one split
    np.savez(tmp_path / "short.npz", x=x, y=y[:100])
    with pytest.raises(UserError, match=r"label and sample counts differ \(x 250, y 100\)"):
        load_dataset(f"npz:{tmp_path / 'short.npz'}")
    np.savez(tmp_path / "other.npz", images=x, labels=y)
    with pytest.raises(UserError, match="lacks array.*x_train, y_train, x_test and y_test, or x and y"):
        load_dataset(f"npz:{tmp_path / 'other.npz'}")


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 15), ("test", 4)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}")
    assert d.input_shape == (3, 10, 10) and d.num_classes == 2 and len(d.x_test) == 8
    classes_only = load_dataset(f"imagefolder:{tmp_path / 'train'}")  # class folders alone: a fifth held out
    assert len(classes_only.x_test) == 6 and classes_only.y_test.tolist().count(0) == 3
    (tmp_path / "test").rename(tmp_path / "val")  # the ImageNet layout
    assert len(load_dataset(f"imagefolder:{tmp_path}").x_test) == 8
    (tmp_path / "val").rename(tmp_path / "other")
    with pytest.raises(UserError, match="has train/ but no test/ or val/"):
        load_dataset(f"imagefolder:{tmp_path}")
    with pytest.raises(UserError, match="Couldn't find any class folder"):
        load_dataset(f"imagefolder:{tmp_path / 'train' / 'cat'}")


def test_imagefolder_of_mixed_sizes_is_resized_and_center_cropped(tmp_path):
    """Images of any size and aspect, with ``:size=S``: shorter side to S, central S x S kept (the
    standard evaluation transform); without it, one line naming the fix."""
    from PIL import Image

    stripes = np.zeros((16, 32, 3), dtype=np.uint8)  # 16 x 32: red | green (central 16 columns) | blue
    stripes[:, :8, 0] = stripes[:, 8:24, 1] = stripes[:, 24:, 2] = 255
    rng = np.random.default_rng(0)
    for split, n in (("train", 15), ("test", 4)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(stripes).save(tmp_path / split / c / "0stripes.png")
            for i in range(1, n):
                h, w = rng.integers(12, 60, 2)
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}:size=16")
    assert d.input_shape == (3, 16, 16) and len(d.x_test) == 8 and d.num_classes == 2
    center = d.x_test[0]  # sorted: the stripes image of class 0 comes first
    assert torch.allclose(center[1], torch.ones(16, 16)) and center[0].abs().max() == 0 and center[2].abs().max() == 0
    assert load_dataset(f"imagefolder:{tmp_path}:size=8").input_shape == (3, 8, 8)  # downscaled
    with pytest.raises(UserError, match="images differ in size.*:size=S"):
        load_dataset(f"imagefolder:{tmp_path}")
    for bad in ("size=0", "size=x", "width=16", "size=16:n=3"):
        with pytest.raises(UserError, match="malformed imagefolder spec"):
            load_dataset(f"imagefolder:{tmp_path}:{bad}")
    # without a size, mixed sizes get the model's own input size; :size=S still wins
    from metacompress.pipeline import load_data

    assert load_data(f"imagefolder:{tmp_path}", "torchvision:inception_v3").input_shape == (3, 299, 299)
    assert load_data(f"imagefolder:{tmp_path}:size=16", "torchvision:resnet18").input_shape == (3, 16, 16)
    with pytest.raises(UserError, match="images differ in size.*no input size of its own"):
        load_data(f"imagefolder:{tmp_path}", "resnet20")  # the zoo's models size themselves to the data


def test_native_image_size_is_the_published_weights_crop_size():
    from metacompress.zoo import native_image_size

    assert native_image_size("torchvision:resnet18") == 224
    assert native_image_size("torchvision:efficientnet_b3") == 300
    assert native_image_size("resnet20") is None and native_image_size("torchvision:no_such_net") is None


def test_an_onnx_files_fixed_square_input_gives_the_image_size(tmp_path):
    from metacompress.deploy.verify import declared_image_size

    conv = torch.nn.Conv2d(3, 4, 3)
    torch.onnx.export(conv, torch.zeros(1, 3, 20, 20), tmp_path / "fixed.onnx", dynamo=False)
    torch.onnx.export(conv, torch.zeros(1, 3, 20, 24), tmp_path / "oblong.onnx", dynamo=False)
    torch.onnx.export(conv, torch.zeros(1, 3, 20, 20), tmp_path / "dynamic.onnx", dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {2: "h", 3: "w"}})
    assert declared_image_size(tmp_path / "fixed.onnx") == 20
    assert declared_image_size(tmp_path / "oblong.onnx") is None and declared_image_size(tmp_path / "dynamic.onnx") is None


def test_subsample_per_class():
    d = load_dataset("digits")
    x, y = subsample_per_class(d.x_train, d.y_train, 10, seed=0)
    assert len(x) == 100 and torch.bincount(y).tolist() == [10] * 10
    with pytest.raises(UserError):
        subsample_per_class(d.x_train, d.y_train, 0)


def test_unknown_spec():
    with pytest.raises(UserError, match="unknown data spec"):
        load_dataset("mnist")


def _idx_folder(root, gz: bool, n: int = 60, classes: int = 3):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    root.mkdir(exist_ok=True)
    for split, count in (("train", n), ("t10k", n // 2)):
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (count, 6, 5), dtype=np.uint8), gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", (np.arange(count) % classes).astype(np.uint8), gz)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_mnist_format_plain_and_gzip(tmp_path, gz):
    root = _idx_folder(tmp_path / "fm", gz)
    d = load_dataset(f"idx:{root}")
    assert d.input_shape == (1, 6, 5) and d.num_classes == 3
    assert len(d.x_train) + len(d.x_val) == 60 and len(d.x_test) == 30
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    small = load_dataset(f"idx:{root}:n=30:size=8")
    assert small.input_shape == (1, 8, 8) and len(small.x_train) + len(small.x_val) == 30


def test_idx_label_range_keeps_and_renumbers_those_classes(tmp_path):
    root = _idx_folder(tmp_path / "fm", gz=False, n=80, classes=4)
    full = load_dataset(f"idx:{root}")
    sub = load_dataset(f"idx:{root}:labels=1-2")
    assert sub.num_classes == 2 and set(np.unique(sub.y_test).tolist()) == {0, 1}
    assert len(sub.x_test) == 20 and len(sub.x_train) + len(sub.x_val) == 40
    # the renumbered class 0 holds the images that carried label 1 in the full set
    first = np.asarray(full.x_test)[np.asarray(full.y_test) == 1]
    assert np.array_equal(np.asarray(sub.x_test)[np.asarray(sub.y_test) == 0], first)
    for bad in ("labels=2-1", "labels=3", "labels=a-b", "labels=3-9"):
        with pytest.raises(UserError, match="idx"):
            load_dataset(f"idx:{root}:{bad}")


def test_idx_refuses_forged_and_broken_files(tmp_path):
    root = _idx_folder(tmp_path / "fm", gz=False)
    # a header that declares 10^12 images is refused before any allocation
    write_idx(root / "train-images-idx3-ubyte", np.zeros((2, 6, 5), np.uint8), dims=(10**9, 1000, 1000))
    with pytest.raises(UserError, match="GiB"):
        load_dataset(f"idx:{root}")
    write_idx(root / "train-images-idx3-ubyte", np.zeros((2, 6, 5), np.uint8), dims=(60, 6, 5))
    with pytest.raises(UserError, match="header declares"):
        load_dataset(f"idx:{root}")
    (root / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(UserError, match="bad magic"):
        load_dataset(f"idx:{root}")
    (root / "train-images-idx3-ubyte").unlink()
    with pytest.raises(UserError, match="lacks the train images"):
        load_dataset(f"idx:{root}")
    with pytest.raises(UserError, match="not found"):
        load_dataset(f"idx:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="malformed idx spec"):
        load_dataset(f"idx:{root}:n=many")


def test_test_subset_spreads_evenly_over_a_sorted_split():
    """Test splits are often sorted by class: the subset takes every class in proportion."""
    from dataclasses import replace

    d = load_dataset("digits")
    order = torch.argsort(d.y_test, stable=True)
    d = replace(d, x_test=d.x_test[order], y_test=d.y_test[order])
    sub = d.test_subset(50)
    assert len(sub.y_test) == len(sub.x_test) == 50
    counts = torch.bincount(sub.y_test, minlength=10)
    assert counts.min() >= 4 and counts.max() <= 6
    assert torch.equal(sub.x_train, d.x_train) and torch.equal(sub.y_val, d.y_val)
    assert d.test_subset(len(d.y_test) + 5) is d
    with pytest.raises(UserError, match="at least 1"):
        d.test_subset(0)
