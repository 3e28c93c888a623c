"""The user's own data: torch ``Dataset`` / ``DataLoader`` objects or ``(x, y)`` tensors, as the
``Dataset`` splits the compression stages read.

Samples are gathered into tensors once (the stages draw random batches from them), or, for a
map-style dataset too big to hold, read again batch by batch when the stages index them; a validation
split is carved from the training data when none is given, stratified and seeded like the
built-in sets, so choices made on it never see the test split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import Dataset as TorchDataset

from metacompress.data.datasets import MAX_DATA_BYTES, VAL_FRACTION, Dataset
from metacompress.data.inputs import is_token_ids, model_input
from metacompress.data.lazy import LazySamples, Samples, fits_in_memory, take
from metacompress.errors import UserError

DataLike = Union[TorchDataset, DataLoader, tuple]
MAX_SAMPLES = 200_000  # gathered per split; beyond it, pass a subset (torch.utils.data.Subset)
READ_BATCH = 256
INPUT_KEYS = ("pixel_values", "input", "inputs", "image", "images", "x")  # where a dict sample holds its input
LABEL_KEYS = ("labels", "label", "target", "targets", "y")               # and its class index


def _pairs(data: DataLike, what: str) -> tuple[Samples, torch.Tensor]:
    """(x, y) from a loader, a map-style dataset of (input, label) pairs, or a tuple of tensors.

    A map-style dataset (a loader's own, too) whose float32 copy would exceed IN_MEMORY_BYTES
    stays where it is: its labels are read and its samples checked in one pass, and the samples
    are read again, batch by batch, when the stages index them.
    """
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return _checked(*data, what)
    if isinstance(data, DataLoader):
        loader, dataset = data, data.dataset
    elif isinstance(data, TorchDataset) or hasattr(data, "__getitem__"):
        loader, dataset = DataLoader(data, batch_size=READ_BATCH, shuffle=False), data
    else:
        raise UserError(f"{what} must be a torch Dataset, a DataLoader or an (inputs, labels) tuple of tensors, "
                        f"got {type(data).__name__}")
    if _map_style(dataset) and len(dataset) > 0:
        first = torch.as_tensor(_pair(dataset[0], what)[0])
        if not fits_in_memory(len(dataset), tuple(first.shape)):
            return _lazy(dataset, first, what)
    xs, ys, values = [], [], 0
    for x, y in _batches(loader, what):
        values += x.numel()
        if values * 4 > MAX_DATA_BYTES:  # only a map-style dataset can be read again batch by batch
            raise UserError(f"{what} holds more than {MAX_DATA_BYTES / 2**30:.0f} GiB as float32 and is not a map-style "
                            "dataset, so it cannot be read again batch by batch: pass a map-style Dataset or a Subset")
        xs.append(x)
        ys.append(y)
    if not xs:
        raise UserError(f"{what} is empty")
    return _checked(torch.cat(xs), torch.cat(ys), what)


def _map_style(dataset: Any) -> bool:
    return not isinstance(dataset, IterableDataset) and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def _pair(item: Any, what: str) -> tuple[Any, Any]:
    """(input, label) of a sample or batch: a pair, or a dict under common names (as Hugging Face
    datasets yield them)."""
    if isinstance(item, Mapping):
        x = next((item[k] for k in INPUT_KEYS if k in item), None)
        y = next((item[k] for k in LABEL_KEYS if k in item), None)
        if x is None or y is None:
            raise UserError(f"{what} yields dicts with keys {', '.join(map(str, list(item)[:8]))}: the input is read "
                            f"under one of {', '.join(INPUT_KEYS)} and the label under one of {', '.join(LABEL_KEYS)}")
        return x, y
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise UserError(f"{what} must yield (input, label) pairs or dicts of them; got {type(item).__name__}")
    return item[0], item[1]


def _batches(loader: Any, what: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's (inputs, labels) batches, at most MAX_SAMPLES samples in all."""
    n = 0
    try:
        for batch in loader:
            x, y = _pair(batch, what)
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            n += len(x)
            if n > MAX_SAMPLES:
                raise UserError(f"{what} holds more than {MAX_SAMPLES} samples: pass a subset "
                                "(torch.utils.data.Subset) for compression")
            yield x, y
    except RuntimeError as exc:  # the default collate refuses samples of different shapes
        raise UserError(f"{what}: cannot batch its samples: {' '.join(str(exc).split())[:200]}") from None


def _lazy(dataset: Any, first: torch.Tensor, what: str) -> tuple[LazySamples, torch.Tensor]:
    """Labels read (and every sample's shape and values checked) in one pass; the samples stay
    unread, of ``first``'s shape and input kind (``data.inputs``)."""
    ys = []
    for x, y in _batches(DataLoader(dataset, batch_size=READ_BATCH, shuffle=False), what):
        _checked(x, y, what)
        ys.append(y)
    y = torch.cat(ys).long()
    dtype = np.int64 if is_token_ids(first) else np.float32

    def read(i: int) -> np.ndarray:
        return model_input(torch.as_tensor(_pair(dataset[i], what)[0]).detach()).numpy()

    return LazySamples(read, len(dataset), tuple(first.shape), dtype=dtype), y


def _checked(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) != len(y) or len(x) == 0:
        raise UserError(f"{what}: {len(x)} inputs but {len(y)} labels")
    if y.dim() != 1 or y.is_floating_point():
        raise UserError(f"{what}: labels must be a 1-D integer tensor of class indices, got {tuple(y.shape)} "
                        f"{y.dtype}")
    x = model_input(x)
    if is_token_ids(x):
        if len(x) and int(x.min()) < 0:
            raise UserError(f"{what}: integer inputs are token ids and must be >= 0, found {int(x.min())}")
        return x, y.long()
    if not torch.isfinite(x).all():
        raise UserError(f"{what}: inputs hold NaN or infinite values")
    return x, y.long()


def from_torch(train: DataLike, val: DataLike | None = None, test: DataLike | None = None,
               num_classes: int | None = None, name: str = "user", seed: int = 0) -> Dataset:
    """A ``Dataset`` from the user's data. ``val`` defaults to a stratified 10 % of ``train``;
    ``test`` (used only for the figures reported) defaults to ``val``."""
    x_tr, y_tr = _pairs(train, "train")
    if val is None:
        _, counts = torch.unique(y_tr, return_counts=True)
        n_val = math.ceil(VAL_FRACTION * len(y_tr))  # as train_test_split rounds it
        # stratified where every class can have a sample on both sides, else a plain random split
        stratifiable = int(counts.min()) >= 2 and min(n_val, len(y_tr) - n_val) >= len(counts)
        stratify: Any = y_tr.numpy() if stratifiable else None
        from sklearn.model_selection import train_test_split

        idx_tr, idx_va = train_test_split(np.arange(len(y_tr)), test_size=VAL_FRACTION, random_state=seed,
                                          stratify=stratify) if len(y_tr) >= 10 else (np.arange(len(y_tr)),) * 2
        x_va, y_va = take(x_tr, idx_va), y_tr[idx_va]
        x_tr, y_tr = take(x_tr, idx_tr), y_tr[idx_tr]
    else:
        x_va, y_va = _pairs(val, "val")
    x_te, y_te = _pairs(test, "test") if test is not None else (x_va, y_va)
    for what, x in (("val", x_va), ("test", x_te)):
        if x.shape[1:] != x_tr.shape[1:]:
            raise UserError(f"{what} inputs {tuple(x.shape[1:])} differ in shape from train {tuple(x_tr.shape[1:])}")
    seen = int(max(y_tr.max(), y_va.max(), y_te.max())) + 1
    classes = num_classes or seen
    if seen > classes or int(min(y_tr.min(), y_va.min(), y_te.min())) < 0:
        raise UserError(f"labels must be in 0..{classes - 1} (the model has {classes} outputs)")
    return Dataset(name, x_tr, y_tr, x_va, y_va, x_te, y_te, classes)

