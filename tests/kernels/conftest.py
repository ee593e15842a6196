"""Kernel tests run on CPU through Triton's interpreter unless a CUDA GPU is present.

``TRITON_INTERPRET=1`` must be set before ``@triton.jit`` decorates the kernels, so it is set here, at
conftest import, and kernel modules imported earlier by another test folder are reloaded.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for _name in ("rq.kernels.gemm", "rq.kernels.dispatch", "rq.kernels.combine", "rq.kernels.moe"):
        if _name in sys.modules:  # decorated before the flag was set: decorate again, interpreted
            importlib.reload(sys.modules[_name])

from rq.core import int4  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """CUDA when present, else CPU (kernels interpreted)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def make_layer(
    logcnt: list[int],
    precision: list[int],
    hidden_size: int,
    inter_size: int,
    activation: str,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, object]:
    """Random weights of one R&Q layer in the op's layout (docs/spec.md §8); INT4 copies via rq.core.int4.quantize."""
    gen = torch.Generator().manual_seed(seed)
    glu = activation.endswith("_glu")
    in_rows = 2 * inter_size if glu else inter_size
    n_orig = precision.count(0)
    n_int4 = precision.count(1)
    w = lambda *s: (torch.randn(*s, generator=gen) / s[-1] ** 0.5)  # noqa: E731
    w_in = w(n_orig, in_rows, hidden_size).to(dtype)
    w_out = w(n_orig, hidden_size, inter_size).to(dtype)
    q_in = [int4.quantize(w(in_rows, hidden_size), group_size) for _ in range(n_int4)]
    q_out = [int4.quantize(w(hidden_size, inter_size), group_size) for _ in range(n_int4)]
    empty = lambda *s: torch.zeros(0, *s)  # noqa: E731
    stack = lambda xs, attr, *s, dt: (torch.stack([getattr(q, attr) for q in xs]) if xs else empty(*s).to(dt))  # noqa: E731
    layer = dict(
        logcnt=torch.tensor(logcnt),
        precision=torch.tensor(precision),
        w_in=w_in,
        w_out=w_out,
        w_in_q=stack(q_in, "packed", in_rows, int4.packed_width(hidden_size), dt=torch.uint8),
        w_in_scales=stack(q_in, "scales", in_rows, int4.num_blocks(hidden_size, group_size), dt=torch.float16),
        w_out_q=stack(q_out, "packed", hidden_size, int4.packed_width(inter_size), dt=torch.uint8),
        w_out_scales=stack(q_out, "scales", hidden_size, int4.num_blocks(inter_size, group_size), dt=torch.float16),
        activation=activation,
        group_size=group_size,
    )
    return {k: (v.to(device) if isinstance(v, torch.Tensor) and k not in ("logcnt", "precision") else v)
            for k, v in layer.items()}


def random_routing(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype, ids_dtype: torch.dtype,
                   device: torch.device | str = "cpu", seed: int = 0, drop: float = 0.1,
                   skew: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_ids [T, K]`` (distinct per token, some dropped as -1 or N) and ``topk_weights [T, K]``."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if skew:  # uneven loads, some experts empty
        logits += torch.linspace(3, -3, num_experts)
    k = min(top_k, num_experts)
    ids = torch.topk(logits, k, dim=-1).indices
    if k < top_k:
        ids = torch.cat([ids, torch.full((num_tokens, top_k - k), -1)], dim=1)
    dropped = torch.rand(num_tokens, top_k, generator=gen) < drop
    bad = torch.where(torch.rand(num_tokens, top_k, generator=gen) < 0.5, -1, num_experts)
    ids = torch.where(dropped, bad, ids)
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), dim=-1)
    return ids.to(ids_dtype).to(device), weights.to(dtype).to(device)


@pytest.fixture(name="make_layer")
def make_layer_fixture():
    """The :func:`make_layer` factory (fixtures keep tests independent of pytest's import mode)."""
    return make_layer


@pytest.fixture(name="random_routing")
def random_routing_fixture():
    """The :func:`random_routing` factory."""
    return random_routing
