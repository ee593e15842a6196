"""Fixtures of the export tests: tiny checkpoints of every architecture with an R&Q plan, and their exports.

Checkpoints, plans and exports are built once per session (they take a few seconds each) and shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch



from rq.models.adapters import load_model
from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import TokenData
from rq.plan.planner import PlanOptions, make_plan
from rq.plan.schema import save_plan
from rq.testing.tiny import save_tiny_checkpoint

GROUP_SIZE = 64
BUDGET = 1.0  # at the original footprint INT4 frees room: the plans hold INT4 primaries and replicas


def make_tiny(arch: str, root: Path, router_std: float = 0.2) -> tuple[Path, Path]:
    """``(model_dir, plan.json)`` of a tiny ``arch`` checkpoint calibrated on seeded random tokens."""
    model_dir = save_tiny_checkpoint(arch, root / arch, router_std=router_std)
    if arch.startswith("deepseek"):
        # Real DeepSeek checkpoints have num_key_value_heads == num_attention_heads (MLA expands the
        # latent to every head); with fewer, Hugging Face's attention fails as soon as a padding mask
        # exists. Weight shapes do not depend on it.
        config = json.loads((model_dir / "config.json").read_text())
        config["num_key_value_heads"] = config["num_attention_heads"]
        (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    model, adapter = load_model(model_dir)
    tokens = torch.randint(2, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, adapter, TokenData(tokens, "seeded random tokens"), batch_size=4,
                      group_size=GROUP_SIZE, show_progress=False)
    plan = make_plan(stats, PlanOptions(budget_factor=BUDGET))
    precision = [p for layer in plan.layers for p in layer.precision]
    assert 0 in precision and 1 in precision, f"{arch}: plan needs original and INT4 copies"
    assert any(e.replicas for layer in plan.layers for e in layer.experts), f"{arch}: plan needs replicas"
    save_plan(plan, model_dir / "plan.json")
    return model_dir, model_dir / "plan.json"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny(arch) -> (model_dir, plan_path)``, built once per architecture."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(arch: str, router_std: float = 0.2) -> tuple[Path, Path]:
        if (arch, router_std) not in cache:
            cache[(arch, router_std)] = make_tiny(arch, root / f"r{router_std:g}", router_std)
        return cache[(arch, router_std)]

    return get


@pytest.fixture(scope="session")
def exported(tiny, tmp_path_factory):
    """``exported(arch, dtype="float32") -> ExportResult`` (with its parity check), built once."""
    from rq.export import export_model

    root = tmp_path_factory.mktemp("builds")
    cache = {}

    def get(arch: str, dtype: str = "float32"):
        if (arch, dtype) not in cache:
            # float16 routing resolves router logits to about 3 digits: a near-tie between two experts may
            # go either way in PyTorch and ONNX Runtime and flip an assignment (exact expert_counts, §9);
            # sharper routers keep the float16 check about the export, not about coin flips
            model_dir, plan = tiny(arch, router_std=1.0 if dtype == "float16" else 0.2)
            cache[(arch, dtype)] = export_model(model_dir, plan, root / f"{arch}-{dtype}", dtype=dtype,
                                                show_progress=False)
        return cache[(arch, dtype)]

    return get
