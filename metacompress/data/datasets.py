"""Dataset container and the loaders behind ``load_dataset``."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from metacompress.data.inputs import is_token_ids
from metacompress.data.lazy import LazySamples, Samples, take
from metacompress.errors import UserError

VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
# Bounds checked before anything is allocated: a forged header or a typo ("digits@100000") is an
# input error, not a request for terabytes. Fashion-MNIST as float32 takes 220 MB.
MAX_DATA_BYTES = 2**32          # all splits together, as float32
MAX_SAMPLE_ELEMENTS = 2**24     # one sample: e.g. 3 x 2364 x 2364
MAX_CLASSES = 100_000
MAX_DIGITS_SIZE = 512
MAX_IMAGE_SIZE = 1024           # imagefolder:DIR:size=S, S at most this
TOKENS_OPTION = ":tokens"       # npz:PATH:tokens: N x L integer arrays are token ids (int64), not features


@dataclass
class Dataset:
    """Train / validation / test inputs and labels, and what a model needs to know about them.

    ``x_*`` hold the data exactly as a deployed model receives it (no normalisation applied):
    tensors, or ``LazySamples`` that read the batches indexed (sets too big to hold); ``mean`` and
    ``std`` are training-set statistics that zoo models fold into their graph.
    """

    name: str
    x_train: Samples
    y_train: torch.Tensor
    x_val: Samples
    y_val: torch.Tensor
    x_test: Samples
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def mean(self) -> float:
        if isinstance(self.x_train, LazySamples):
            return self.x_train.stats()[0]
        return float(self.x_train.float().mean())

    @property
    def std(self) -> float:
        if isinstance(self.x_train, LazySamples):
            return max(self.x_train.stats()[1], 1e-6)
        return float(self.x_train.float().std().clamp_min(1e-6))

    def test_subset(self, n: int) -> "Dataset":
        """The same data with ``n`` test samples spread evenly over the test split (splits are often
        sorted by class): the reported accuracies then cost a pass over ``n`` samples, where a
        test split of tens of thousands of large images would take most of a run."""
        if n < 1:
            raise UserError(f"test samples must be at least 1, got {n}")
        if n >= len(self.y_test):
            return self
        index = np.linspace(0, len(self.y_test) - 1, n).round().astype(np.int64)
        return replace(self, x_test=take(self.x_test, index), y_test=self.y_test[index])

    def calibration_batch(self, n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed random batch of training data (for probes, BN recalibration, Taylor scores)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.x_train), generator=g)[: min(n, len(self.x_train))]
        return self.x_train[idx], self.y_train[idx]


def subsample_per_class(
    x: torch.Tensor, y: torch.Tensor, k: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``k`` random samples of each class: the 'few labelled samples' repair regime."""
    if k <= 0:
        raise UserError(f"samples per class must be positive, got {k}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)][:k]
        keep.append(idx)
    sel = torch.cat(keep)
    sel = sel[torch.randperm(len(sel), generator=g)]
    return x[sel], y[sel]


def check_size(what: str, n: int, sample_shape: tuple[int, ...], whole: bool = True) -> None:
    """Refuse, before allocating, data whose samples or (``whole``: data held in memory) whole
    float32 copy exceed the bounds."""
    per_sample = int(np.prod(sample_shape, dtype=np.int64)) if sample_shape else 1
    if per_sample == 0:
        raise UserError(f"{what}: samples of shape {sample_shape} hold no values")
    if per_sample > MAX_SAMPLE_ELEMENTS:
        raise UserError(f"{what}: samples of shape {'x'.join(map(str, sample_shape))} have {per_sample:,} values; "
                        f"the limit is {MAX_SAMPLE_ELEMENTS:,}")
    if whole and n * per_sample * 4 > MAX_DATA_BYTES:
        raise UserError(f"{what}: {n:,} samples of shape {'x'.join(map(str, sample_shape))} need "
                        f"{n * per_sample * 4 / 2**30:.1f} GiB as float32; the limit is {MAX_DATA_BYTES / 2**30:.0f} GiB")


def check_labels(what: str, y: np.ndarray) -> np.ndarray:
    """Labels as int64 class indices 0..MAX_CLASSES-1 (integer-valued floats are accepted)."""
    y = np.asarray(y)
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise UserError(f"{what}: labels must be integers 0..C-1, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= MAX_CLASSES):
        raise UserError(f"{what}: labels must be class indices 0..C-1 with C <= {MAX_CLASSES:,}, "
                        f"found {int(y.min())}..{int(y.max())}")
    return y.astype(np.int64).ravel()


def stratified_split(x, y: np.ndarray, fraction: float, seed: int):
    """Stratified split of arrays or lazy samples: the same seed always gives the same split."""
    from sklearn.model_selection import train_test_split

    try:
        kept, held = train_test_split(np.arange(len(y)), test_size=fraction, random_state=seed, stratify=y)
    except ValueError as exc:  # too few samples, or a class with a single sample
        raise UserError(f"cannot split {len(y)} samples of {len(np.unique(y))} classes by class "
                        f"({fraction:.0%} held out): {' '.join(str(exc).split())}") from None
    return take(x, kept), take(x, held), y[kept], y[held]


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``a`` as a tensor with the strides of a freshly allocated one. numpy may give a size-1 axis
    any stride, and PyTorch reads an (N, 1, H, W) tensor whose channel stride is 1 as channels-last:
    its convolutions then return channels-last outputs, on which a model's own ``.view()`` fails
    ("view size is not compatible with input tensor's size and stride")."""
    x = torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.insert(0, step)
        step *= size
    return x.as_strided(x.shape, strides)


def make_dataset(name: str, x_tr, y_tr, x_te, y_te, num_classes: int | None = None) -> Dataset:
    """A Dataset from train and test samples (arrays or lazy samples) and labels: the fixed,
    stratified validation split is carved from train here, the same for every loader."""
    if len(x_tr) == 0 or len(x_te) == 0:
        raise UserError(f"{name}: needs training and test samples, got {len(x_tr)} and {len(x_te)}")
    x_tr, x_va, y_tr, y_va = stratified_split(x_tr, y_tr, VAL_FRACTION, seed=0)

    def t(a, dtype=None):
        if isinstance(a, LazySamples):
            return a
        return _tensor(a, dtype or (torch.long if is_token_ids(a) else torch.float32))

    ys = [y_tr, y_va, y_te]
    if num_classes is None:
        num_classes = int(max(int(np.max(a)) for a in ys)) + 1
    return Dataset(
        name=name,
        x_train=t(x_tr), y_train=t(y_tr, torch.long),
        x_val=t(x_va), y_val=t(y_va, torch.long),
        x_test=t(x_te), y_test=t(y_te, torch.long),
        num_classes=num_classes,
    )


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """N x C x H x W images resized to size x size (bilinear)."""
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=(size, size), mode="bilinear",
                         align_corners=False).numpy()


def _digits(size: int) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # N x 1 x 8 x 8, values 0..16
    if size != 8:
        x = _resize(x, size)
    x_tr, x_te, y_tr, y_te = stratified_split(x, d.target, TEST_FRACTION, seed=0)
    return make_dataset("digits" if size == 8 else f"digits@{size}", x_tr, y_tr, x_te, y_te, 10)


def _synthetic(arg: str) -> Dataset:
    """Generated data with class structure a small network can learn, from a fixed seed.

    Each class has a random prototype; samples are prototype + noise, smoothed over space for
    images so that convolutions have local structure to find.
    """
    parts = arg.split(":")
    try:
        shape = tuple(int(s) for s in parts[0].lower().split("x"))
        opts = dict(p.split("=", 1) for p in parts[1:])
        classes = int(opts.pop("classes", 10))
        n = int(opts.pop("n", 1200))
        seed = int(opts.pop("seed", 0))
        if not 0 <= seed < 2**32:
            raise ValueError(seed)
    except ValueError:
        raise UserError(f"malformed synthetic spec 'synthetic:{arg}': use synthetic:SHAPE[:classes=C][:n=N], "
                        "e.g. synthetic:3x32x32 or synthetic:20") from None
    if opts:
        raise UserError(f"unknown synthetic option(s): {', '.join(opts)} (known: classes, n, seed)")
    # every split (test 20 %, validation 10 % of the rest) must hold each class at least once
    min_n = int(np.ceil(classes / (VAL_FRACTION * (1 - TEST_FRACTION)))) + classes
    if len(shape) not in (1, 3) or min(shape) <= 0 or classes < 2 or n < min_n:
        raise UserError(f"synthetic data needs a shape CxHxW or F with positive sizes, >= 2 classes and "
                        f"n >= {min_n} for {classes} classes; got shape {shape}, classes {classes}, n {n}")
    check_size(f"synthetic:{arg}", n, shape)
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn((classes, *shape), generator=g)
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    x = protos[y] + 1.5 * torch.randn((n, *shape), generator=g)
    if len(shape) == 3:
        x = F.avg_pool2d(x, 3, stride=1, padding=1) * 2.0
    x_np, y_np = x.numpy().astype(np.float32), y.numpy()
    x_tr, x_te, y_tr, y_te = stratified_split(x_np, y_np, TEST_FRACTION, seed=0)
    return make_dataset(f"synthetic:{arg}", x_tr, y_tr, x_te, y_te, classes)


def _idx(arg: str) -> Dataset:
    """``idx:DIR[:n=N][:size=S][:labels=A-B]``: MNIST-format files; ``labels`` keeps the classes A..B
    (renumbered from 0), ``n`` then keeps a stratified subset of their training images, ``size``
    resizes images to S x S."""
    from metacompress.data.idx import load_idx_arrays

    root, *parts = arg.split(":")
    usage = "use idx:DIR[:n=N][:size=S][:labels=A-B]"
    try:
        opts = dict(p.split("=", 1) for p in parts)
        labels = tuple(int(v) for v in opts.pop("labels").split("-", 1)) if "labels" in opts else None
        n, size = int(opts.pop("n", 0)), int(opts.pop("size", 0))
    except ValueError:
        raise UserError(f"malformed idx spec 'idx:{arg}': {usage}") from None
    if opts or n < 0 or size < 0 or (labels is not None and (len(labels) != 2 or not 0 <= labels[0] < labels[1])):
        raise UserError(f"idx options must be n=N and size=S with positive integers and labels=A-B with "
                        f"0 <= A < B, got '{arg}'")
    a = load_idx_arrays(root)
    x_tr, y_tr = a["x_train"], check_labels(f"idx:{root}: train labels", a["y_train"])
    x_te, y_te = a["x_test"], check_labels(f"idx:{root}: test labels", a["y_test"])
    if labels is not None:
        x_tr, y_tr = _label_range(x_tr, y_tr, labels, f"idx:{arg}: train")
        x_te, y_te = _label_range(x_te, y_te, labels, f"idx:{arg}: test")
    if len(y_tr) == 0 or len(y_te) == 0:
        raise UserError(f"idx:{root}: needs training and test images, got {len(y_tr)} and {len(y_te)}")
    classes = int(max(y_tr.max(), y_te.max())) + 1
    if n and n < len(x_tr):
        if n < 2 * classes:
            raise UserError(f"idx:{arg}: n={n} is too small for {classes} classes (at least {2 * classes})")
        x_tr, _, y_tr, _ = stratified_split(x_tr, y_tr, 1 - n / len(x_tr), seed=0)
    if size:
        check_size(f"idx:{arg}", len(x_tr) + len(x_te), (x_tr.shape[1], size, size))
        x_tr, x_te = _resize(x_tr, size), _resize(x_te, size)
    return make_dataset(f"idx:{arg}", x_tr, y_tr, x_te, y_te, classes)


def _label_range(x: np.ndarray, y: np.ndarray, labels: tuple[int, int], what: str) -> tuple[np.ndarray, np.ndarray]:
    """The samples whose label is in labels[0]..labels[1], relabelled from 0."""
    first, last = labels
    keep = (y >= first) & (y <= last)
    if len(np.unique(y[keep])) < 2:
        raise UserError(f"{what} labels {first}-{last} select fewer than 2 classes")
    return x[keep], y[keep] - first


def data_paths(spec: str) -> list[str]:
    """The files or folders a data spec reads (none for embedded and generated data)."""
    kind, _, arg = spec.partition(":")
    if kind == "npz" and arg:
        return [arg.removesuffix(TOKENS_OPTION)]
    if kind in ("idx", "imagefolder") and arg:
        return [arg.split(":")[0]]
    return []


def load_dataset(spec: str, image_size: int | None = None) -> Dataset:
    """Build a Dataset from a spec string (see the package docstring for the forms).

    ``image_size``: the size an image folder of mixed image sizes is resized and cropped to when
    its spec gives none (the model's own input size, ``zoo.native_image_size``)."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _digits(8)
    if kind.startswith("digits@") and not arg:
        try:
            size = int(kind.split("@", 1)[1])
        except ValueError:
            size = 0
        if not 8 <= size <= MAX_DIGITS_SIZE:
            raise UserError(f"malformed data spec '{spec}': use digits@SIZE with 8 <= SIZE <= {MAX_DIGITS_SIZE}, "
                            "e.g. digits@32")
        return _digits(size)
    if kind == "synthetic" and arg:
        return _synthetic(arg)
    if kind == "npz" and arg:
        from metacompress.data.npz import load_npz

        return load_npz(arg.removesuffix(TOKENS_OPTION), tokens=arg.endswith(TOKENS_OPTION))
    if kind == "imagefolder" and arg:
        from metacompress.data.imagefolder import load_imagefolder

        return load_imagefolder(arg, image_size)
    if kind == "idx" and arg:
        return _idx(arg)
    raise UserError(f"unknown data spec '{spec}': use digits, digits@32, synthetic:SHAPE, npz:PATH[{TOKENS_OPTION}], "
                    "imagefolder:DIR[:size=S] or idx:DIR")
