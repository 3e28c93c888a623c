"""Inference passes over big images run in channels-last layout and give the NCHW results."""

import torch
import torchvision
from torch import nn

from metacompress.compress.distill import recalibrate_bn
from metacompress.training import inference_layout, predict


def _model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def test_large_images_run_channels_last_and_the_model_returns_to_nchw():
    model, x = _model(), torch.randn(2, 3, 64, 64)
    seen = []
    model.conv1.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].is_contiguous(memory_format=torch.channels_last),
                                  m.weight.is_contiguous(memory_format=torch.channels_last))))
    with inference_layout(model, x.shape[1:]) as laid_out:
        model(laid_out(x))
    assert seen == [(True, True)]
    assert all(p.is_contiguous() for p in model.parameters())


def test_small_images_and_models_without_convolutions_keep_their_layout():
    model = _model()
    with inference_layout(model, (3, 32, 32)) as laid_out:
        assert model.conv1.weight.is_contiguous()
        assert laid_out(torch.randn(1, 3, 32, 32)).is_contiguous()
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 4))
    with inference_layout(mlp, (3, 64, 64)) as laid_out:
        assert laid_out(torch.randn(1, 3, 64, 64)).is_contiguous()


def test_channels_last_predictions_and_bn_statistics_match_nchw():
    torch.manual_seed(1)
    x = torch.randn(12, 3, 64, 64)
    model = _model()
    with torch.no_grad():
        reference = model(x)
    assert torch.allclose(predict(model, x), reference, atol=1e-4, rtol=1e-4)
    a, b = _model(), _model()
    recalibrate_bn(a, x, 12, seed=0)
    b.train()
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        b(x)
    assert torch.allclose(a.bn1.running_var, b.bn1.running_var, rtol=1e-4)
    assert torch.allclose(a.layer4[1].bn2.running_mean, b.layer4[1].bn2.running_mean, atol=1e-5)
