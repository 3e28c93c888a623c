"""Passes over big images run in channels-last layout and give the NCHW results."""

import torch
import torchvision
from torch import nn

from metacompress.compress.distill import recalibrate_bn
from metacompress.training import convolution_layout, predict


def _model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def test_large_images_run_channels_last_and_the_model_returns_to_nchw():
    model, x = _model(), torch.randn(2, 3, 64, 64)
    seen = []
    model.conv1.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].is_contiguous(memory_format=torch.channels_last),
                                  m.weight.is_contiguous(memory_format=torch.channels_last))))
    with convolution_layout(model, x.shape[1:]) as laid_out:
        model(laid_out(x))
    assert seen == [(True, True)]
    assert all(p.is_contiguous() for p in model.parameters())


def test_small_images_and_models_without_convolutions_keep_their_layout():
    model = _model()
    with convolution_layout(model, (3, 32, 32)) as laid_out:
        assert model.conv1.weight.is_contiguous()
        assert laid_out(torch.randn(1, 3, 32, 32)).is_contiguous()
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 4))
    with convolution_layout(mlp, (3, 64, 64)) as laid_out:
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


def test_channels_last_repair_matches_nchw_repair(monkeypatch):
    import contextlib

    from metacompress.compress import distill
    from metacompress.compress.distill import RepairConfig, repair
    from metacompress.data.datasets import make_dataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 3, 64, 64, generator=g), torch.arange(80) % 5
    data = make_dataset("tiny64", x[:60].numpy(), y[:60].numpy(), x[60:].numpy(), y[60:].numpy(), 5)
    teacher, cfg = _model(), RepairConfig(steps=3, batch_size=8, bn_samples=16, lr=1e-3)
    fast = repair(_model(), teacher, data, cfg, seed=0, progress=False)
    monkeypatch.setattr(distill, "convolution_layout", lambda m, s: contextlib.nullcontext(lambda t: t))
    plain = repair(_model(), teacher, data, cfg, seed=0, progress=False)
    assert all(p.is_contiguous() for p in fast.parameters())
    worst = max(float((a - b).abs().max()) for a, b in zip(fast.parameters(), plain.parameters()))
    # Adam normalises each gradient: a float difference can move a near-zero component by lr a step
    assert worst <= cfg.lr * cfg.steps, f"channels-last repair drifted from the NCHW repair by {worst}"
    with torch.no_grad():
        assert torch.allclose(fast(data.x_test), plain(data.x_test), atol=5e-2)  # logits of scale 1-4
