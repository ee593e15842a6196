"""Process memory hygiene for the stages that hold a whole model (export, calibration, eval).

Two things inflate a Python process's resident size beyond what it uses, and both showed up as the peak of
``rq-export`` on a 1.7 GB checkpoint (``benchmarks/bench_speed.py``):

* Hugging Face loads safetensors through a private memory map, and the parameters it does not convert stay
  views into that map; the whole file then stays mapped, so every page it read (the experts too, which are
  converted into fresh tensors) counts towards the process for as long as the model lives.
  :func:`own_parameters` copies those views into process memory and lets the map go.
* glibc keeps freed heap memory for reuse instead of handing it back; after a model is dropped its
  gigabytes stay resident until :func:`release_freed_memory` trims the heap.

Both are Linux-specific and do nothing elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch
from torch import nn

_MAPS = Path("/proc/self/maps")


def _mapped_ranges(suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files whose name ends with ``suffix``."""
    if not _MAPS.exists():
        return []
    ranges = []
    for line in _MAPS.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(suffix):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


@torch.no_grad()
def own_parameters(model: nn.Module, suffix: str = ".safetensors") -> int:
    """Copy every parameter and buffer that is a view into a mapped ``*suffix`` file into process memory, so
    the map is released; tied parameters stay tied (one ``Parameter`` object). Returns how many were copied."""
    ranges = _mapped_ranges(suffix)
    if not ranges:
        return 0
    copied = 0
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for _, tensor in tensors:
            pointer = tensor.untyped_storage().data_ptr()
            if any(low <= pointer < high for low, high in ranges):
                tensor.data = tensor.data.clone()
                copied += 1
    gc.collect()
    return copied


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
LARGE_ALLOCATION = 64 << 20
"""Bytes from which an allocation gets its own map: a layer's stacked experts and its copies do (hundreds of
MiB at real shapes), one expert's weights and a call's temporaries (1-10 MiB) stay in the heap, where they are
reused. A 1 MiB threshold made every temporary a fresh map whose pages are faulted in and zeroed again:
calibration of the mid-size model took 2.5x as long."""


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def map_large_allocations(threshold: int = LARGE_ALLOCATION) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own memory map (glibc ``mallopt``), so
    freeing it returns the memory at once. By default glibc raises that threshold after large frees and then
    keeps freed tensors in its heaps (one per thread), where a model streamed layer by layer piles up a
    layer's worth of freed memory per pass. The heap is trimmed only when that much is free at its top, so
    smaller allocations keep reusing its pages. Returns whether the setting took effect (glibc only)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))


def release_freed_memory() -> None:
    """Collect garbage and return the heap's free memory to the operating system (glibc ``malloc_trim``)."""
    gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:  # glibc only
        trim(0)
