"""Fixtures for the live Triton tests: a tiny R&Q export, its model repository, and a running tritonserver.

The server is the one the ``nvidia-pytriton`` wheel ships (Triton 2.51, Python backend, CPU). It is started
once per module on 127.0.0.1 with free ports in its own process group and always stopped by its finalizer
(SIGTERM to the group, SIGKILL after a grace period), whatever the tests did.
"""

from __future__ import annotations

import pytest

GROUP = 64
MAX_CONTEXT = 64  # small, so an over-long prompt is cheap to send


@pytest.fixture(scope="module")
def triton_install():
    from rq.testing.tritonserver import find_tritonserver

    install = find_tritonserver()
    if install is None:
        pytest.skip("tritonserver is not installed (pip install nvidia-pytriton, or run in NVIDIA's Triton container)")
    return install


@pytest.fixture(scope="module")
def rq_build(tiny_checkpoints, text_file, tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint, calibrated, planned (with replicas and INT4 copies) and exported to ONNX."""
    from rq.models.adapters import load_model
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.export import export_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import save_plan

    ckpt = tiny_checkpoints("qwen3_moe")
    model, adapter = load_model(ckpt)
    data = load_token_data(load_tokenizer(ckpt), text_file, seq_len=32, max_sequences=12)
    stats = calibrate(model, adapter, data, batch_size=4, group_size=GROUP, show_progress=False)
    root = tmp_path_factory.mktemp("triton_build")
    plan = make_plan(stats, PlanOptions(budget_factor=1.0))
    save_plan(plan, root / "plan.json")
    build = root / "build"
    export_model(ckpt, root / "plan.json", build, check=False, show_progress=False)
    return build


@pytest.fixture(scope="module")
def model_repo(rq_build, tmp_path_factory):
    from rq.engines.tritonserver import ServingOptions, write_model_repository

    # 2 instances x 1 ONNX Runtime thread: two requests run at once on a 2-core CI machine
    options = ServingOptions(instances=2, intra_op_threads=1, max_context=MAX_CONTEXT, default_max_tokens=8,
                             max_tokens_limit=32)
    return write_model_repository(rq_build, tmp_path_factory.mktemp("triton") / "repo", options)


@pytest.fixture(scope="module")
def triton_server(triton_install, model_repo):
    """A live tritonserver with every model whose backend it has (the wheel's server has only the Python backend,
    so ``rq_onnx`` is left out there; ``test_onnx_model_with_tritons_loader`` covers it)."""
    from rq.engines.tritonserver import FORWARD_MODEL, GENERATE
    from rq.testing.tritonserver import TritonServer, servable_models

    models, missing = servable_models(model_repo, triton_install)
    assert {GENERATE, FORWARD_MODEL} <= set(models), (models, missing)
    server = TritonServer(model_repo, models=models, install=triton_install)
    try:
        server.start(timeout=180)
        yield server
    finally:
        server.stop()
        # the whole process group (server and Python-backend stubs) is gone; zombies await their reaper
        assert not server.alive() and server.group_members() == [], server.group_members()


@pytest.fixture(scope="module")
def offline(rq_build):
    """The offline reference: ``rq.export.runtime.OrtGenerator`` on the same export."""
    from rq.export.runtime import OrtGenerator

    return OrtGenerator(rq_build, streaming=True, intra_op_num_threads=1)
