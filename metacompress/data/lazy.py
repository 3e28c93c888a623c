"""Samples read from storage when they are indexed, so that a data set of any size costs memory
only for the batches in use.

``LazySamples`` stands in for a split's input tensor wherever the stages read batches: ``len``,
``shape``, ``x[i]``, ``x[a:b]`` and ``x[index_tensor]`` behave as on a tensor (the result is a
float32 tensor of the samples asked for). Splits are ``subset`` views that share the reader.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Union

import numpy as np
import torch

from metacompress.errors import UserError

IN_MEMORY_BYTES = 2**26    # a split whose float32 copy is at most this is read once into memory
STATS_SAMPLES = 2048       # samples (evenly spaced) that estimate a lazy set's mean and std
DECODE_THREADS = min(4, os.cpu_count() or 1)  # image decoding releases the GIL: threads overlap it


class LazySamples:
    """``count`` samples of ``sample_shape``; ``read(i)`` returns sample ``i`` as an array of
    ``dtype`` (float32, or int64 for token ids: ``data.inputs``).

    ``threads`` > 1 reads a batch's samples in that many threads (for readers that are
    thread-safe and release the GIL, such as image decoding); the batch is the same either way.
    """

    def __init__(self, read: Callable[[int], np.ndarray], count: int, sample_shape: Sequence[int],
                 rows: np.ndarray | None = None, threads: int = 1, dtype: type = np.float32) -> None:
        self._read = read
        self._dtype = np.dtype(dtype)
        self._torch_dtype = torch.from_numpy(np.zeros(0, self._dtype)).dtype
        self._threads = max(1, threads)
        self._rows = np.arange(count) if rows is None else rows
        self._sample_shape = tuple(int(d) for d in sample_shape)
        self._stats: tuple[float, float] | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self._rows), *self._sample_shape))

    def __len__(self) -> int:
        return len(self._rows)

    def subset(self, index: Any) -> LazySamples:
        """The samples at ``index`` (positions in this set), still unread."""
        return LazySamples(self._read, 0, self._sample_shape, self._rows[_numpy_index(index)], self._threads,
                           self._dtype)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(self._checked(self._rows[index])).clone()
        rows = np.atleast_1d(self._rows[_numpy_index(index)])
        # torch's own memory, not numpy's: a training batch is saved for the backward pass, and
        # compress crashed (SIGSEGV in backward) when batches lived in numpy-allocated memory
        batch = torch.empty((len(rows), *self._sample_shape), dtype=self._torch_dtype)

        def fill(i: int) -> None:
            batch[i] = torch.from_numpy(self._checked(rows[i]))

        threads = min(self._threads, len(rows))
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:  # per call: nothing to go stale in a forked worker
                list(pool.map(fill, range(len(rows))))  # the first failing sample (in order) raises
        else:
            for i in range(len(rows)):
                fill(i)
        return batch

    def _checked(self, row: int) -> np.ndarray:
        x = np.asarray(self._read(int(row)), dtype=self._dtype)
        if x.shape != self._sample_shape:
            raise UserError(f"sample {row} has shape {x.shape}, the first sample {self._sample_shape}: "
                            "every sample needs one shape")
        return x

    def stats(self, batch_size: int = 64) -> tuple[float, float]:
        """Mean and standard deviation of all values, over at most STATS_SAMPLES evenly spaced
        samples (read once: the answer is kept)."""
        if self._stats is None:
            self._stats = self._estimate_stats(batch_size)
        return self._stats

    def _estimate_stats(self, batch_size: int) -> tuple[float, float]:
        pick = np.unique(np.linspace(0, len(self) - 1, min(len(self), STATS_SAMPLES)).round().astype(np.int64))
        total = total_sq = 0.0
        count = 0
        for i in range(0, len(pick), batch_size):
            batch = self[pick[i:i + batch_size]].double()
            total += float(batch.sum())
            total_sq += float((batch * batch).sum())
            count += batch.numel()
        mean = total / count
        return mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1)))


Samples = Union[torch.Tensor, LazySamples]


def _numpy_index(index: Any) -> Any:
    return index.numpy() if isinstance(index, torch.Tensor) else index


def take(x: Any, index: np.ndarray) -> Any:
    """``x[index]`` for arrays and tensors; for lazy samples the unread subset."""
    return x.subset(index) if isinstance(x, LazySamples) else x[index]


def fits_in_memory(count: int, sample_shape: Sequence[int]) -> bool:
    return count * int(np.prod(sample_shape, dtype=np.int64)) * 4 <= IN_MEMORY_BYTES
