"""Facts about the runtime that will run the exported model on this machine: execution provider,
thread count, CPU and the channel block its convolution kernels compute in.

onnxruntime's CPU convolutions on x86 run in the NCHWc layout: channels are processed in blocks
of the SIMD width (16 floats on AVX-512, 8 on AVX/AVX2), and a layer whose width is not a
multiple of the block is padded up to one. A pruned width between two multiples therefore
costs the time of the larger one: channel counts should be multiples of the block
(``round_to auto``). On other CPUs (Arm) and on GPUs there is no such blocking; 8 keeps widths
friendly to their matrix kernels (NEON's 4-wide vectors, tensor-core tiles) without being coarse.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import onnxruntime as ort

from metacompress.errors import UserError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider",
             "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider"}
DEFAULT_BLOCK = 8   # no NCHWc blocking known for this provider or CPU


def provider_name(provider: str) -> str:
    """onnxruntime's name for a provider given as ``cpu``, ``cuda``, ... or its full name; it must
    be available in this onnxruntime build."""
    name = PROVIDERS.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if name not in available:
        short = [k for k, v in PROVIDERS.items() if v in available]
        raise UserError(f"execution provider '{provider}' is not available in this onnxruntime build; "
                        f"available: {', '.join(short or available)}")
    return name


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa() -> str:
    """The widest SIMD extension onnxruntime's CPU kernels use here: avx512, avx2, avx or the machine."""
    flags = cpu_flags()
    for name, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")):
        if flag in flags:
            return name
    return platform.machine() or "unknown"


def channel_block(provider: str = "cpu") -> int:
    """The channel multiple the provider computes convolutions in (see the module docstring)."""
    if provider_name(provider) != PROVIDERS["cpu"]:
        return DEFAULT_BLOCK
    return {"avx512": 16, "avx2": 8, "avx": 8}.get(isa(), DEFAULT_BLOCK)


def resolve_round_to(round_to: int | str, provider: str = "cpu") -> int:
    """``auto`` -> the runtime's channel block; an integer (or its string) as given."""
    if isinstance(round_to, str):
        if round_to.strip().lower() == "auto":
            return channel_block(provider)
        try:
            round_to = int(round_to)
        except ValueError:
            raise UserError(f"--round-to must be 'auto' or a positive integer, got '{round_to}'") from None
    if round_to < 1:
        raise UserError(f"--round-to must be 'auto' or a positive integer, got {round_to}")
    return int(round_to)


def default_threads() -> int:
    """Cores this process may use: the intra-op thread count when none is given."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def runtime_signature(provider: str, threads: int) -> dict[str, str | int]:
    """What changes a latency measurement besides the model: keys the latency model's cache."""
    return {"provider": provider_name(provider), "threads": int(threads), "cpu": cpu_model(), "isa": isa(),
            "onnxruntime": ort.__version__}
