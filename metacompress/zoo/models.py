"""Built-in models. Each takes the input shape and class count from the data.

Every model starts with ``Normalize`` so that the exported graph takes raw data: deploying
it needs nothing but onnxruntime and the data as the loader gives it. Widths and depths are
arguments so that the policy's meta-training can draw whole families of architectures.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std with the statistics stored as buffers, so they travel with the weights."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _w(channels: float) -> int:
    """Round a scaled width to a multiple of 8 (what fast kernels like), at least 8."""
    return max(8, int(round(channels / 8)) * 8)


class MLP(nn.Module):
    """Flatten + ``depth`` hidden ReLU layers: the seed's 784-64-10 example, generalised."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(self.normalize(x)))


def _conv_bn(cin, cout, k=3, stride=1, groups=1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


def _require_image(name: str, input_shape) -> int:
    if len(input_shape) != 3:
        from metacompress.errors import UserError

        hint = " (npz reads N x C x L arrays as sequences: give grayscale images a channel axis)" \
            if len(input_shape) == 2 else ""
        raise UserError(f"model '{name}' needs image input C x H x W; the data gives samples of shape "
                        f"{tuple(input_shape)}{hint} (use an image data set, e.g. digits or synthetic:3x32x32, or mlp)")
    return int(input_shape[0])


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; padding keeps it valid on 8x8 digits."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, width: float = 1.0):
        super().__init__()
        cin = _require_image("lenet5", input_shape)
        c1, c2, f1, f2 = _w(6 * width), _w(16 * width), _w(120 * width), _w(84 * width)
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(cin, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(c2 * 4, f1), nn.ReLU(), nn.Linear(f1, f2), nn.ReLU())
        self.classifier = nn.Linear(f2, num_classes)

    def forward(self, x):
        return self.classifier(self.fc(self.features(self.normalize(x))))


class VGGSmall(nn.Module):
    """Three VGG stages of two 3x3 conv-BN-ReLU layers each, max-pooled between stages."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, width: float = 1.0, stages: int = 3):
        super().__init__()
        cin = _require_image("vgg-small", input_shape)
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        for s in range(stages):
            cout = _w(32 * width * 2**s)
            layers += [_conv_bn(cin, cout), _conv_bn(cout, cout)]
            if s < stages - 1:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(self.normalize(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; the 1x1 projection shortcut couples channels through the residual."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016): resnet20 is n=3, resnet56 n=9."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, depth: int = 20, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            from metacompress.errors import UserError

            raise UserError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        cin = _require_image(f"resnet{depth}", input_shape)
        widths = [_w(16 * width), _w(32 * width), _w(64 * width)]
        self.normalize = Normalize(mean, std)
        self.stem = _conv_bn(cin, widths[0])
        blocks: list[nn.Module] = []
        c = widths[0]
        for s, w in enumerate(widths):
            for b in range(n):
                blocks.append(BasicBlock(c, w, 2 if (s > 0 and b == 0) else 1))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.layers(self.stem(self.normalize(x)))))


class MobileNetSmall(nn.Module):
    """MobileNet-v1 style: depthwise 3x3 + pointwise 1x1 blocks (depthwise separable)."""

    CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1))

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, width: float = 1.0):
        super().__init__()
        cin = _require_image("mobilenet-small", input_shape)
        self.normalize = Normalize(mean, std)
        c = _w(32 * width)
        layers: list[nn.Module] = [_conv_bn(cin, c)]
        for cout, stride in self.CFG:
            cout = _w(cout * width)
            layers += [_conv_bn(c, c, 3, stride, groups=c), _conv_bn(c, cout, 1)]
            c = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.features(self.normalize(x)))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    Head count and head size are read from the layer sizes at run time, so the block stays
    valid after torch-pruning removes heads or head dimensions (``nn.MultiheadAttention``
    cannot be pruned that way).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        # Fixed at construction: pruning head dims must not change the attention temperature.
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    @property
    def head_dim(self) -> int:
        return self.qkv.out_features // 3 // self.num_heads

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = _w(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """A small vision transformer: conv patch embedding onto a 4x4 grid, mean-pooled tokens."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 2.0, grid: int = 4):
        super().__init__()
        cin = _require_image("vit-tiny", input_shape)
        h, w = input_shape[1:]
        patch = max(1, min(h, w) // grid)
        tokens = (h // patch) * (w // patch)
        self.normalize = Normalize(mean, std)
        self.patch_embed = nn.Conv2d(cin, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2) + self.pos_embed
        return self.classifier(self.norm(self.blocks(x)).mean(dim=1))

    def pruning_hints(self) -> dict:
        """What torch-pruning cannot infer alone.

        The attention blocks (pruned by head dimension), the position embedding's channel dim,
        and the residual stream, kept whole (``frozen``): torch-pruning mis-maps its indices
        through the patch embedding's flatten/transpose. Pruning heads and MLP widths still
        reaches every block's MACs.
        """
        return {
            "unwrapped_parameters": [(self.pos_embed, 2)],
            "attention": [(blk.attn.qkv, blk.attn.proj, blk.attn.num_heads) for blk in self.blocks],
            "frozen": [self.patch_embed],
        }
