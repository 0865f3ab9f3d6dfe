"""Where and how models compute: the device rule (training and both encoders), bfloat16 where the
hardware has it natively, and the allocator setting of the training process."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. Asking for ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA device is available")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively (and so faster than float32) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def dense_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a model's dense MLPs: None means plain float32.

    ``auto`` picks bfloat16 only where the hardware has it natively: elsewhere it is emulated and
    slower than float32.
    """
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


def dense_autocast(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` (a no-op context for None)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Let glibc keep freed blocks of up to ``mmap_threshold`` bytes for reuse (up to
    ``trim_threshold`` bytes of free heap) instead of handing them back to the system.

    A training step allocates and frees the same few multi-megabyte tensors every time; by default
    glibc maps each afresh, and every new page then costs a fault: measured here, Baby's Â @ 64
    columns took 7-10 ms that way against 2.4 ms with reuse. The same advice as PyTorch's CPU
    tuning guide (jemalloc or tcmalloc), without another library. Process-wide, once; a no-op
    (False) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    log.debug("malloc keeps freed blocks up to %d bytes: %s", mmap_threshold, ok)
    return ok
