"""Datasets without downloads: sklearn's bundled digits, generated data, and user files.

``load_dataset(spec)`` understands:

- ``digits``: sklearn's 8x8 digits as 1x8x8 images (raw pixel values 0..16);
  ``digits@32`` resizes them to 1x32x32 for image models.
- ``synthetic:SHAPE``: seeded, learnable classification data, e.g. ``synthetic:3x32x32``
  (images) or ``synthetic:20`` (features); ``synthetic:3x32x32:classes=5:n=2000`` sets more.
- ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test``; images NCHW, NHWC or flat.
  ``npz:PATH:tokens``: the x arrays are N x L integer token ids, fed to the model as int64
  (for a model that starts with an ``nn.Embedding``).
- ``imagefolder:DIR[:size=S]``: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (needs
  torchvision); ``size`` resizes each image's shorter side to S and center-crops S x S, so images
  may have any size. Without it, images of mixed sizes get the model's own input size (224 for
  most torchvision classifiers), and images of one size are read as they are.
- ``idx:DIR[:n=N][:size=S][:labels=A-B]``: MNIST-format idx files (plain or .gz), e.g. Fashion-MNIST from
  ``/usr/share/datasets/fashion-mnist``; ``n`` keeps N training images, ``size`` resizes,
  ``labels`` keeps classes A..B (renumbered from 0).

A fixed validation split is always carved from the training split. Image folders and
uncompressed ``.npz`` arrays whose float32 copy exceeds ``lazy.IN_MEMORY_BYTES`` are read batch
by batch (``LazySamples``) whenever a stage indexes them.
"""

from metacompress.data.datasets import Dataset, data_paths, load_dataset, subsample_per_class

__all__ = ["Dataset", "data_paths", "load_dataset", "subsample_per_class"]
