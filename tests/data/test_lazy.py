"""Data too big to hold is read batch by batch, and the stages see exactly the data they would
have seen in memory: same splits, same samples, same compressed model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

import metacompress as mc
from metacompress.data import load_dataset
from metacompress.data.lazy import LazySamples
from metacompress.data.torchdata import from_torch
from metacompress.errors import UserError

SPLITS = ("train", "val", "test")


@pytest.fixture
def never_in_memory(monkeypatch):
    """Every set counts as too big to hold."""
    monkeypatch.setattr("metacompress.data.lazy.IN_MEMORY_BYTES", 0)


def _mixed_size_folder(root, per_class: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 4)):
        for c in ("cat", "dog", "eel"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(12, 48, 2)
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")


def test_a_folder_too_big_to_hold_is_read_lazily_with_the_same_splits_and_pixels(tmp_path, monkeypatch):
    _mixed_size_folder(tmp_path)
    spec = f"imagefolder:{tmp_path}:size=16"
    eager = load_dataset(spec)
    monkeypatch.setattr("metacompress.data.lazy.IN_MEMORY_BYTES", 0)
    lazy = load_dataset(spec)
    for split in SPLITS:
        x, ref = getattr(lazy, f"x_{split}"), getattr(eager, f"x_{split}")
        assert isinstance(x, LazySamples) and isinstance(ref, torch.Tensor)
        assert x.shape == ref.shape and torch.equal(x[:], ref)
        assert torch.equal(getattr(lazy, f"y_{split}"), getattr(eager, f"y_{split}"))
    x, ref = lazy.x_train, eager.x_train
    assert torch.equal(x[3], ref[3]) and torch.equal(x[torch.tensor([7, 0, 7])], ref[torch.tensor([7, 0, 7])])
    assert torch.equal(x[np.array([2, 5])], ref[[2, 5]]) and x[5:5].shape == (0, 3, 16, 16)
    # batches are torch's own allocations (aligned as torch aligns), never numpy's: see lazy.py
    assert all(x[index].data_ptr() % 64 == 0 for index in (3, slice(1, 6), torch.tensor([7, 0, 7])))
    assert lazy.mean == pytest.approx(eager.mean, abs=1e-5) and lazy.std == pytest.approx(eager.std, abs=1e-5)
    assert torch.equal(lazy.calibration_batch(10, seed=3)[0], eager.calibration_batch(10, seed=3)[0])


def test_batches_read_in_threads_equal_batches_read_in_order_and_the_first_bad_sample_is_named():
    import time

    def read(i: int) -> np.ndarray:
        time.sleep(0.002 * (i % 3))  # later samples finish first
        if i in (5, 9):
            return np.zeros((1, 3, 3), dtype=np.float32)
        return np.full((1, 4, 4), i, dtype=np.float32)

    serial, threaded = LazySamples(read, 12, (1, 4, 4)), LazySamples(read, 12, (1, 4, 4), threads=4)
    index = torch.tensor([4, 0, 11, 3, 3, 7])
    assert torch.equal(threaded[index], serial[index]) and torch.equal(threaded[index][:, 0, 0, 0], index.float())
    assert torch.equal(threaded.subset(np.arange(6, 9))[:], serial[6:9])  # subsets keep their threads
    with pytest.raises(UserError, match="sample 5 has shape"):
        threaded[0:12]


def test_lazy_images_of_one_size_need_no_size_and_a_second_size_is_named(tmp_path, never_in_memory):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(12):
                Image.new("RGB", (10, 6), (i * 20, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}")
    assert isinstance(d.x_train, LazySamples) and d.input_shape == (3, 6, 10)
    Image.new("RGB", (7, 7)).save(tmp_path / "test" / "b" / "z.png")
    with pytest.raises(UserError, match=r"images differ in size \(\(3, 6, 10\) and \(3, 7, 7\) at .*z.png"):
        load_dataset(f"imagefolder:{tmp_path}")


class Generated(TorchDataset):
    """A map-style dataset computed per item, as a user's decoding dataset would be."""

    def __init__(self, n: int, seed: int, shapes: tuple[tuple[int, ...], ...] = ((1, 8, 8),)) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.protos = torch.randn(4, 1, 8, 8, generator=g)
        self.shapes, self.seed = shapes, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 100_000 + i)
        x = self.protos[self.labels[i]] + 0.5 * torch.randn(1, 8, 8, generator=g)
        shape = self.shapes[i % len(self.shapes)]
        return x[:, :shape[1], :shape[2]], int(self.labels[i])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def _compress(train, test):
    model = _net()
    x = torch.zeros(1, 1, 8, 8)
    return mc.compress(model, x, target=mc.MACs(0.5), train=train, test=test, repair=mc.RepairConfig(steps=10))


def test_a_user_dataset_too_big_to_hold_gives_the_same_compressed_model(monkeypatch):
    train, test = Generated(300, seed=1), DataLoader(Generated(80, seed=2), batch_size=16)
    small, report = _compress(train, test)
    monkeypatch.setattr("metacompress.data.lazy.IN_MEMORY_BYTES", 0)
    data = from_torch(train, None, test)
    assert isinstance(data.x_train, LazySamples) and isinstance(data.x_test, LazySamples)
    lazy_small, lazy_report = _compress(train, test)
    assert lazy_report.kept == report.kept and lazy_report.accuracy == report.accuracy
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(lazy_small(x), small(x))


def test_a_lazy_dataset_with_samples_of_two_shapes_is_refused(never_in_memory):
    with pytest.raises(UserError, match="train: cannot batch its samples"):
        from_torch(Generated(40, seed=0, shapes=((1, 8, 8), (1, 8, 7))))


def test_an_uncompressed_npz_too_big_to_hold_is_memory_mapped(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    arrays = dict(x_train=rng.random((120, 8, 8, 3)), y_train=y, x_test=rng.random((30, 8, 8, 3)), y_test=y[:30])
    np.savez(tmp_path / "plain.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    eager = load_dataset(f"npz:{tmp_path / 'plain.npz'}")
    monkeypatch.setattr("metacompress.data.lazy.IN_MEMORY_BYTES", 0)
    mapped = load_dataset(f"npz:{tmp_path / 'plain.npz'}")
    for split in SPLITS:
        x, ref = getattr(mapped, f"x_{split}"), getattr(eager, f"x_{split}")
        assert isinstance(x, LazySamples) and x.shape[1:] == (3, 8, 8) and torch.equal(x[:], ref)
    packed = load_dataset(f"npz:{tmp_path / 'packed.npz'}")  # a compressed member cannot be mapped: read whole
    assert isinstance(packed.x_train, torch.Tensor) and torch.equal(packed.x_train, eager.x_train)
    # the in-memory size limit bounds what is allocated: a mapped array may exceed it, a packed one not
    for module in ("datasets", "npz"):
        monkeypatch.setattr(f"metacompress.data.{module}.MAX_DATA_BYTES", 120 * 192 * 4 - 1)
    assert torch.equal(load_dataset(f"npz:{tmp_path / 'plain.npz'}").x_train[:], mapped.x_train[:])
    with pytest.raises(UserError, match="compressed x_train holds 184,320 bytes, over the limit .* np.savez"):
        load_dataset(f"npz:{tmp_path / 'packed.npz'}")
    arrays["x_test"][4, 1, 2, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(UserError, match="x_test holds NaN or infinite values"):
        load_dataset(f"npz:{tmp_path / 'nan.npz'}")


def test_an_iterable_dataset_too_big_to_hold_is_refused_with_the_way_out(monkeypatch):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(64):
                yield torch.full((1, 8, 8), float(i)), i % 4

    monkeypatch.setattr("metacompress.data.torchdata.MAX_DATA_BYTES", 40 * 64 * 4)
    with pytest.raises(UserError, match="train holds more than .* not a map-style dataset.*pass a map-style Dataset"):
        from_torch(DataLoader(Stream(), batch_size=8))
    monkeypatch.setattr("metacompress.data.torchdata.MAX_DATA_BYTES", 64 * 64 * 4)
    assert len(from_torch(DataLoader(Stream(), batch_size=8)).x_train) + 7 == 64  # 10 % held out for validation


@pytest.mark.parametrize("n,classes", [(64, 10), (30, 10), (200, 10)])
def test_a_validation_split_too_small_for_every_class_is_random_not_an_error(n, classes):
    """64 samples of 10 classes hold out 7: too few to stratify (sklearn raises). The split is then
    plain random; where every class fits, it stays stratified."""
    y = torch.arange(n) % classes
    data = from_torch((torch.randn(n, 1, 4, 4), y))
    assert len(data.x_train) + len(data.x_val) == n and len(data.x_val) == -(-n // 10)
    if n >= 10 * classes:
        assert len(torch.unique(data.y_val)) == classes


class DictSamples(Generated):
    """Samples as dicts, as Hugging Face datasets yield them."""

    def __init__(self, n: int, seed: int, keys: tuple[str, str] = ("pixel_values", "labels")) -> None:
        super().__init__(n, seed)
        self.keys = keys

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return {self.keys[0]: x, self.keys[1]: y, "id": i}


@pytest.mark.parametrize("in_memory", [True, False])
def test_dict_samples_read_as_the_same_pairs(monkeypatch, in_memory):
    if not in_memory:
        monkeypatch.setattr("metacompress.data.lazy.IN_MEMORY_BYTES", 0)
    pairs, dicts = from_torch(Generated(60, seed=3)), from_torch(DataLoader(DictSamples(60, seed=3), batch_size=16))
    assert torch.equal(dicts.x_train[:], pairs.x_train[:]) and torch.equal(dicts.y_val, pairs.y_val)
    assert torch.equal(from_torch(DictSamples(60, seed=3, keys=("image", "label"))).x_val[:], pairs.x_val[:])
    with pytest.raises(UserError, match="yields dicts with keys img, cls, id: the input is read under one of pixel_values"):
        from_torch(DictSamples(60, seed=3, keys=("img", "cls")))


class _TokenSet(TorchDataset):
    """A map-style dataset of (token ids, label) pairs."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.ids[i], self.labels[i]


def test_token_ids_read_lazily_stay_int64_and_equal_the_ids_held_in_memory(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    ids, y = rng.integers(0, 50, (90, 7)), np.arange(90) % 3
    np.savez(tmp_path / "tokens.npz", x=ids, y=y)
    eager = load_dataset(f"npz:{tmp_path / 'tokens.npz'}:tokens")
    held = from_torch(_TokenSet(torch.as_tensor(ids).int(), torch.as_tensor(y)))
    monkeypatch.setattr("metacompress.data.lazy.IN_MEMORY_BYTES", 0)
    mapped = load_dataset(f"npz:{tmp_path / 'tokens.npz'}:tokens")
    lazy = from_torch(_TokenSet(torch.as_tensor(ids).int(), torch.as_tensor(y)))
    for split in SPLITS:
        for x, ref in ((getattr(mapped, f"x_{split}"), getattr(eager, f"x_{split}")),
                       (getattr(lazy, f"x_{split}"), getattr(held, f"x_{split}"))):
            assert isinstance(x, LazySamples) and ref.dtype == torch.int64
            assert x[:].dtype == torch.int64 and torch.equal(x[:], ref)
    assert load_dataset(f"npz:{tmp_path / 'tokens.npz'}").x_train[:].dtype == torch.float32  # features without :tokens
    np.savez(tmp_path / "negative.npz", x=ids - 1, y=y)
    with pytest.raises(UserError, match="token ids must be >= 0"):
        load_dataset(f"npz:{tmp_path / 'negative.npz'}:tokens")
