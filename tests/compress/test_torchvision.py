"""torchvision models through the toolkit: prune to 0.5 MACs, export, check parity in onnxruntime.

The zoo tests cover our own small models; users bring torchvision ones, whose graphs (ResNet's
downsample shortcuts, MobileNetV2's depthwise inverted residuals) exercise other torch-pruning
dependency paths and exporter ops. Weights are random (no downloads) and the input is synthetic
224x224, so the test checks mechanics and numbers, not accuracy.

Why BN recalibration: a randomly initialised torchvision MobileNetV2 in eval mode (running mean 0,
var 1) gives logits of ~1e-9, against which "max abs diff <= 1e-4" and top-1 agreement mean
nothing. Re-estimating the BN statistics on training samples (the toolkit's own repair step, done
on the pruned model as the pipeline does) brings logits to O(0.1-1) like a trained net; the test
then asserts that the logit scale and the top-1/top-2 margins are large enough for the parity
thresholds to bite (see ``_check_conditioning``).

The legacy exporter (``dynamo=False``) is used: same parity as dynamo here (both ~1e-6), but
measured 1.4 s vs 2.7 s on resnet18 and 0.65 s vs 5.9 s on mobilenet_v2 (2 shared cores).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")

from metacompress.compress.attention import split_self_attention  # noqa: E402
from metacompress.compress.distill import recalibrate_bn  # noqa: E402
from metacompress.compress.measure import count_macs  # noqa: E402
from metacompress.compress.prune import PruningSpace  # noqa: E402
from metacompress.compress.rules import rule_allocation  # noqa: E402
from metacompress.data import Dataset, load_dataset  # noqa: E402
from metacompress.deploy import export_onnx, verify_onnx  # noqa: E402
from metacompress.zoo import build_model  # noqa: E402

TARGET_MACS = 0.5
MACS_TOL = 0.02          # relative: achieved / dense MACs within 0.49-0.51
MAX_ABS_DIFF = 1e-4
MIN_TOP1_AGREEMENT = 0.995
BN_SAMPLES = 32
# n=140: every stratified split must hold each of the 10 classes (load_dataset asks n >= 135).
# Test split: 28 samples.
DATA_SPEC = "synthetic:3x224x224:n=140"
# seed 2: the smallest top-1/top-2 logit gap over the test samples is ~4500x (resnet18, 6.4e-3) and
# ~15000x (mobilenet_v2, 3.2e-2) the ONNX error (~2e-6); seed 0 gives mobilenet_v2 a gap of only
# 170-200x the error (3.8e-4), passing but with little headroom on another CPU's kernels (seeds 0-4
# measured; all agreed 100 %).
SEED = 2


@pytest.fixture(scope="module")
def data224() -> Dataset:
    return load_dataset(DATA_SPEC)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run torch on one thread here (onnxruntime too: ``threads=1`` below), then restore.

    On 2 cores shared with other jobs, two spin-waiting threads thrash: measured, this module took
    42-46 s with torch on 2 threads and ORT on 2, and ~8 s with both on 1 (each stage 5-10x faster).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _compress(spec: str, data: Dataset, seed: int = 0) -> tuple[nn.Module, float]:
    """Build ``spec`` with seeded random weights, prune to TARGET_MACS (uniform, round_to=8), recalibrate BN.

    Returns the pruned model (eval mode) and its achieved MACs as a fraction of the dense model's.
    """
    torch.manual_seed(seed)
    model = build_model(spec, data.input_shape, data.num_classes, data.mean, data.std).eval()
    example = data.x_train[:1]
    space = PruningSpace(model, example, data.num_classes, round_to=8)
    keep = space.project(rule_allocation("uniform", space, model, calib=None), TARGET_MACS, "macs")
    space.apply(model, keep)
    recalibrate_bn(model, data.x_train, BN_SAMPLES, batch_size=BN_SAMPLES, seed=seed)
    model.eval()
    return model, count_macs(model, example) / space.dense_macs


def _check_conditioning(model: nn.Module, x: torch.Tensor, max_abs_diff: float) -> None:
    """Fail when the parity thresholds could not detect a problem on these logits.

    The logits must be large against MAX_ABS_DIFF (else any file passes), and every sample's
    top-1/top-2 gap must dwarf the measured ONNX error (else top-1 agreement is luck on near-ties).
    """
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, dim=1).values
    min_margin = float((top2[:, 0] - top2[:, 1]).min())
    assert float(logits.std()) >= 1000 * MAX_ABS_DIFF, f"logit std {float(logits.std()):.3g} too small"
    assert min_margin >= 100 * max(max_abs_diff, 1e-7), \
        f"near-tied logits: min top-1 margin {min_margin:.3g} vs ONNX error {max_abs_diff:.3g}"


@pytest.mark.integration
@pytest.mark.parametrize("spec", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_torchvision_compress_export_parity(spec: str, data224: Dataset, tmp_path: Path) -> None:
    model, macs_ratio = _compress(spec, data224, SEED)
    assert abs(macs_ratio - TARGET_MACS) <= MACS_TOL * TARGET_MACS, f"achieved MACs {macs_ratio:.4f}"

    path = tmp_path / "model.onnx"
    info = export_onnx(model, data224.x_test[:2], path, dynamo=False)
    assert info["exporter"] == "legacy"
    res = verify_onnx(path, model, data224.x_test, data224.y_test, threads=1)
    assert res["samples"] == len(data224.x_test) == 28
    assert res["max_abs_diff"] <= MAX_ABS_DIFF, res["max_abs_diff"]
    assert res["top1_agreement"] >= MIN_TOP1_AGREEMENT, res["top1_agreement"]
    _check_conditioning(model, data224.x_test, res["max_abs_diff"])

    # negative control: the same file against a reference whose classifier is 1 % off must fail parity,
    # so the threshold above is discriminative at this logit scale
    off = copy.deepcopy(model)
    head = [m for m in off.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(1.01)
    assert verify_onnx(path, off, data224.x_test, None, threads=1)["max_abs_diff"] > MAX_ABS_DIFF


def test_vision_transformer_keeps_its_residual_width_and_prunes_the_rest(tmp_path):
    """torchvision's ViT reads its residual width as a constant (reshape by ``hidden_dim``, class
    token, position embedding): that group stays whole; MLP hidden units and attention heads are
    pruned to the budget, and the exported model matches PyTorch."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                            num_classes=10).eval()
    for p in vit.heads.parameters():  # torchvision zero-initialises the head: give parity something to bite on
        nn.init.normal_(p, std=0.5)
    x = torch.randn(16, 3, 32, 32)
    assert split_self_attention(vit, x[:1]) == 2  # as ``compress`` does: heads become prunable
    space = PruningSpace(vit, x[:1], 10, round_to=1)
    assert all(g.name != "conv_proj" for g in space.groups)
    assert sorted(g.kind for g in space.groups) == ["attention", "attention", "linear", "linear"]
    keep = space.project(rule_allocation("uniform", space, vit, calib=None), TARGET_MACS, "macs")
    pruned = space.apply(copy.deepcopy(vit), keep)
    assert pruned.conv_proj.out_channels == 64 and pruned.hidden_dim == 64
    assert pruned.encoder.layers[0].self_attention.qkv.out_features < 3 * 64
    ratio = count_macs(pruned, x[:1]) / count_macs(vit, x[:1])
    assert ratio < 0.95 and abs(ratio - space.kept_fraction(keep, "macs")) < 0.02
    export_onnx(pruned, x[:2], tmp_path / "vit.onnx", dynamo=False)
    res = verify_onnx(tmp_path / "vit.onnx", pruned, x, None)
    assert res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0


def _windowed_transformer(kind: str) -> nn.Module:
    """A small torchvision Swin (v1, v2) or MaxViT for 32x32 inputs, with a head whose random
    logits are large enough for parity to mean something."""
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    if kind == "maxvit":
        model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                       block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
        head = model.classifier
    else:
        extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if kind == "swin_v2" else {}
        model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                                num_classes=10, **extra)
        head = model.head
    for p in head.parameters():
        nn.init.normal_(p, std=0.5)
    return model.eval()


# Swin's MLPs hold ~60 % of its MACs at 224 px, less at this size: its target is milder
@pytest.mark.parametrize("kind,target", [("swin", 0.75), ("swin_v2", 0.75), ("maxvit", TARGET_MACS)])
def test_windowed_attention_keeps_its_width_and_the_rest_is_pruned(kind: str, target: float, tmp_path: Path) -> None:
    """torchvision's Swin and MaxViT attention read their head layout off their input width, and
    tracing their window partitions exploded torch-pruning (swin_t: out of memory, maxvit_t: no
    result in minutes). The attention blocks are kept whole with the width they sit on; every MLP's
    hidden units (and MaxViT's convolutions) are pruned to the budget, and the export matches PyTorch."""
    model = _windowed_transformer(kind)
    x = torch.randn(16, 3, 32, 32)
    space = PruningSpace(model, x[:1], 10, round_to=1)
    names = {g.name for g in space.groups}
    mlps = {n for n, m in model.named_modules() if n.endswith((".mlp.0", "mlp_layer.1"))}
    assert mlps and mlps <= names and (kind == "maxvit" or names == mlps)
    keep = space.project(rule_allocation("uniform", space, model, calib=None), target, "macs")
    pruned = space.apply(copy.deepcopy(model), keep)
    qkv = "to_qkv" if kind == "maxvit" else "qkv"
    width = {n: getattr(m, qkv).in_features for n, m in pruned.named_modules() if hasattr(m, qkv)}
    assert width and width == {n: getattr(m, qkv).in_features for n, m in model.named_modules() if hasattr(m, qkv)}
    ratio = count_macs(pruned, x[:1]) / count_macs(model, x[:1])
    assert abs(ratio - target) <= MACS_TOL * target and abs(ratio - space.kept_fraction(keep, "macs")) < 1e-6
    export_onnx(pruned, x[:2], tmp_path / "model.onnx", dynamo=False)
    with torch.no_grad():
        assert float(pruned(x).std()) >= 1000 * MAX_ABS_DIFF
    res = verify_onnx(tmp_path / "model.onnx", pruned, x, None)
    assert res["max_abs_diff"] <= MAX_ABS_DIFF and res["top1_agreement"] == 1.0
