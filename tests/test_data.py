"""Data specs: shapes, fixed splits, user files, and errors that say what is wrong."""

import numpy as np
import pytest
import torch

from metacompress.data import load_dataset, subsample_per_class
from metacompress.errors import UserError


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


def test_npz_nhwc_and_flat(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    np.savez(tmp_path / "img.npz", x_train=rng.random((200, 8, 8, 3)), y_train=y,
             x_test=rng.random((40, 8, 8, 3)), y_test=y[:40])
    d = load_dataset(f"npz:{tmp_path / 'img.npz'}")
    assert d.input_shape == (3, 8, 8) and d.num_classes == 4
    np.savez(tmp_path / "flat.npz", x_train=rng.random((200, 12)), y_train=y, x_test=rng.random((40, 12)),
             y_test=y[:40])
    assert load_dataset(f"npz:{tmp_path / 'flat.npz'}").input_shape == (12,)
    np.savez(tmp_path / "bad.npz", x_train=rng.random((200, 12)), y_train=y)
    with pytest.raises(UserError, match="lacks array"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    with pytest.raises(UserError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'none.npz'}")


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
    with pytest.raises(UserError, match="train/ and test/"):
        load_dataset(f"imagefolder:{tmp_path / 'train'}")


def test_subsample_per_class():
    d = load_dataset("digits")
    x, y = subsample_per_class(d.x_train, d.y_train, 10, seed=0)
    assert len(x) == 100 and torch.bincount(y).tolist() == [10] * 10
    with pytest.raises(UserError):
        subsample_per_class(d.x_train, d.y_train, 0)


def test_unknown_spec():
    with pytest.raises(UserError, match="unknown data spec"):
        load_dataset("mnist")
