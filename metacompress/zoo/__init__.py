"""Model zoo: built-in models, torchvision models and user factories behind one spec string.

- built-in names: ``mlp``, ``lenet5``, ``vgg-small``, ``resnet20``, ``resnet56``,
  ``mobilenet-small``, ``vit-tiny``
- ``torchvision:NAME``: any torchvision classification model, random weights
- ``path/to/file.py:factory`` or ``package.module:factory``: a user's model
"""

from metacompress.zoo.registry import BUILTIN, build_model, check_forward, is_builtin, native_image_size

__all__ = ["BUILTIN", "build_model", "check_forward", "is_builtin", "native_image_size"]
