"""Shared by the placement tests."""

import pytest
import torch

from rq.plan.planner import make_plan
from rq.plan.schema import save_plan
from rq.testing.synthetic import synthetic_stats


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny tensor ops: one intra-op thread is faster (and immune to a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mixtral_plan(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("placement")
    stats = synthetic_stats("mixtral", num_layers=3, tokens=4096)
    stats.save(root / "calib")
    synthetic_stats("mixtral", num_layers=3, tokens=4096, drift=0.25, sample_seed=1).save(root / "held")
    plan = make_plan(stats)
    save_plan(plan, root / "plan.json")
    return root, plan
