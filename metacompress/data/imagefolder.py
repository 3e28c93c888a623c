"""``imagefolder:DIR[:size=S]`` data: every image's header checked first, pixels read whole for
small folders and batch by batch for big ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from metacompress.data.datasets import (
    MAX_IMAGE_SIZE,
    MAX_SAMPLE_ELEMENTS,
    TEST_FRACTION,
    Dataset,
    make_dataset,
    stratified_split,
)
from metacompress.data.lazy import DECODE_THREADS, LazySamples, fits_in_memory
from metacompress.errors import UserError


def load_imagefolder(arg: str, default_size: int | None = None) -> Dataset:
    """``imagefolder:DIR[:size=S]``: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (or
    ``DIR/val/``) images, or ``DIR/<class>/*`` whose test split is carved here (``TEST_FRACTION``
    of each class, seeded, as ``npz`` x and y are split); with ``size``, each is
    resized so that its shorter side is S and center-cropped to S x S (images of any size and
    aspect). Without it, images that all share one size are read as they are, and images of
    mixed sizes are resized and cropped to ``default_size`` (the size the model is made for), or
    refused when there is none. Every file's header is checked first; a split too big for
    IN_MEMORY_BYTES is then read lazily, batch by batch, as the stages ask."""
    try:
        from torchvision import datasets
    except ImportError:
        raise UserError("imagefolder data needs torchvision: pip install 'metacompress[vision]'") from None
    root, size = _imagefolder_options(arg)
    splits = _train_and_test(datasets, root)
    paths = [path for split in splits for path in split[0]]
    sizes = [_image_size(path) for path in paths]  # every header checked before any pixel is read
    if size is None and len(set(sizes)) > 1:
        size = default_size
    shape = (3, size, size) if size else _one_image_size(paths, sizes, root)
    out = []
    for split_paths, *_ in splits:
        if fits_in_memory(len(split_paths), shape):
            out.append(np.stack([_read_image(p, size) for p in split_paths]))
        else:
            out.append(LazySamples(lambda i, ps=split_paths: _read_image(ps[i], size), len(split_paths), shape,
                                   threads=DECODE_THREADS))
    return make_dataset(f"imagefolder:{arg}", out[0], splits[0][1], out[1], splits[1][1], len(splits[0][2]))


def _train_and_test(datasets: Any, root: str) -> list[tuple[list[str], np.ndarray, list[str]]]:
    """The train and test splits' image paths, labels and class names (``_scan_split``)."""
    base = Path(root)
    if not (base / "train").is_dir():
        paths, labels, classes = _scan_split(datasets, root, ".")
        kept, held, y_kept, y_held = stratified_split(np.arange(len(paths)), labels, TEST_FRACTION, seed=0)
        return [([paths[i] for i in kept], y_kept, classes), ([paths[i] for i in held], y_held, classes)]
    test = next((name for name in ("test", "val") if (base / name).is_dir()), None)
    if test is None:
        raise UserError(f"imagefolder:{root} has train/ but no test/ or val/ beside it (one folder per class in each)")
    splits = [_scan_split(datasets, root, split) for split in ("train", test)]
    if splits[0][2] != splits[1][2]:
        raise UserError(f"imagefolder:{root}: {test}/ has classes {splits[1][2][:5]}..., train/ has "
                        f"{splits[0][2][:5]}...; both need the same class folders")
    return splits


def _scan_split(datasets: Any, root: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """The image paths, labels and class names of ``root/split`` (nothing read yet);
    ``datasets``: torchvision's datasets module."""
    try:
        ds = datasets.ImageFolder(str(Path(root) / split), loader=lambda path: path)
    except (FileNotFoundError, OSError) as exc:  # no class folders, or a class without images
        where = "" if split == "." else f" {split}/:"
        raise UserError(f"imagefolder:{root}:{where} {' '.join(str(exc).split())[:200]}") from None
    return [path for path, _ in ds.samples], np.array([label for _, label in ds.samples]), ds.classes


def _one_image_size(paths: list[str], sizes: list[tuple[int, int]], root: str) -> tuple[int, int, int]:
    """The images' common shape 3 x H x W (``sizes``: their width and height); a second size is an error."""
    (w0, h0) = sizes[0]
    for path, (w, h) in zip(paths, sizes):
        if (w, h) != (w0, h0):
            raise UserError(f"imagefolder:{root}: images differ in size ((3, {h0}, {w0}) and "
                            f"(3, {h}, {w}) at {path}) and the model has no input size of its own; "
                            f"give the size to resize and crop them to: imagefolder:{root}:size=S")
    return (3, h0, w0)


def _imagefolder_options(arg: str) -> tuple[str, int | None]:
    root, *parts = arg.split(":")
    if not parts:
        return root, None
    key, _, value = parts[0].partition("=")
    if len(parts) > 1 or key != "size" or not value.isdigit() or not 1 <= int(value) <= MAX_IMAGE_SIZE:
        raise UserError(f"malformed imagefolder spec 'imagefolder:{arg}': use imagefolder:DIR[:size=S] "
                        f"with 1 <= S <= {MAX_IMAGE_SIZE}")
    return root, int(value)


def _image_size(path: str) -> tuple[int, int]:
    """Width and height from the image's header (nothing decoded), within MAX_SAMPLE_ELEMENTS."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except Exception as exc:  # PIL raises many types for truncated or forged files
        raise UserError(f"cannot read image {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:150]}") from None
    if 3 * w * h > MAX_SAMPLE_ELEMENTS:
        raise UserError(f"{path}: a {w} x {h} image is larger than the limit of {MAX_SAMPLE_ELEMENTS // 3:,} pixels")
    return w, h


def _read_image(path: str, size: int | None = None) -> np.ndarray:
    """One image as float32 C x H x W in [0, 1] (RGB, as torchvision's loader); with ``size``,
    resized (bilinear, shorter side to ``size``) and center-cropped to size x size, the standard
    evaluation transform. Its header has passed ``_image_size``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if size is not None:
                rgb = _resize_center_crop(rgb, size)
            pixels = np.asarray(rgb, dtype=np.float32)
    except Exception as exc:  # PIL raises many types for truncated or forged files
        raise UserError(f"cannot read image {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:150]}") from None
    return pixels.transpose(2, 0, 1) / 255.0


def _resize_center_crop(im, size: int):
    """A PIL image with its shorter side resized to ``size`` (aspect kept), cropped to its central size x size."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))
