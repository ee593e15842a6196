"""The loop on a live server: the demo model with a code-calibrated plan serves prose; while the prose load keeps
running, ``rq.replan.run.replan`` re-plans from the server's own metrics and publishes version 2 through Triton's
repository API. No request fails, every response equals offline generation of the version that served it, version
2 serves, and LIS over copies drops.

Bounded: 8 concurrent clients, at most ``MAX_REQUESTS`` requests of ``MAX_TOKENS`` tokens, the load stops a few
seconds after the new version serves.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

CONCURRENCY = 8
MAX_TOKENS = 12
MAX_REQUESTS = 20000  # a cap only: the load stops a few seconds after version 2 serves
PROMPTS = 16


def _prose_prompts(n: int) -> list[str]:
    from rq.demo import corpus

    words = corpus.load_split("heldout_prose").split()
    return [" ".join(words[i * 10:(i + 1) * 10]) for i in range(n)]


@pytest.fixture(scope="module")
def demo_served(triton_install, demo_export, tmp_path_factory):
    """The demo export of tests/conftest.py (a plan calibrated on the code split, 8 x 128 tokens) in a repository."""
    import rq
    from rq.engines.tritonserver import ServingOptions, write_model_repository

    result, _ = demo_export
    build = Path(result.out_dir)
    options = ServingOptions(instances=2, intra_op_threads=1, max_context=128, default_max_tokens=MAX_TOKENS,
                             max_tokens_limit=32, forward_model=False)
    repo = write_model_repository(build, tmp_path_factory.mktemp("replan") / "repo", options)
    return Path(rq.__file__).parent / "demo" / "checkpoint", build.parent / "stats", repo


def _copy_lis(after: dict, before: dict | None, version: str) -> float:
    """Mean over layers of LIS over the copies of ``version`` in the traffic between two scrapes."""
    from rq.core.lis import lis_value, model_lis
    from rq.replan.served import copy_loads_by_version

    layers = copy_loads_by_version(after, before)[version]
    return model_lis([lis_value(loads) for loads in layers.values()])[0]


def test_replan_while_serving_swaps_with_no_failed_request(demo_served, triton_install, tmp_path):
    from rq.engines.tritonserver import GENERATE
    from rq.engines.tritonserver_client import parse_metrics, run_load, scrape_metrics
    from rq.export.runtime import OrtGenerator
    from rq.replan.publish import version_build
    from rq.replan.run import replan
    from rq.testing.tritonserver import TritonServer

    demo, stats_dir, repo = demo_served
    prompts = _prose_prompts(PROMPTS)
    cases = [(p, MAX_TOKENS, None) for p in prompts]
    with TritonServer(repo, models=[GENERATE], install=triton_install) as server:
        warm = run_load(server.grpc_url, cases, requests=2 * PROMPTS, concurrency=CONCURRENCY, ignore_eos=True)
        assert warm.errors == 0, warm.error_samples
        stop = threading.Event()
        load = {}
        thread = threading.Thread(target=lambda: load.update(result=run_load(
            server.grpc_url, cases, requests=MAX_REQUESTS, concurrency=CONCURRENCY, ignore_eos=True, stop=stop,
            keep=True, timeout=120)), daemon=True)
        thread.start()
        try:
            time.sleep(2.0)  # the load is running on version 1
            swap = tmp_path / "at_swap.prom"
            result = replan(repo, server.metrics_url, stats_dir, demo, server=server.http_url, save_scrape=swap,
                            margin=0.02)
            assert result.published == 2, result.summary()
            time.sleep(4.0)  # version 2 serves the running load
        finally:
            stop.set()
            thread.join(timeout=300)
        after = scrape_metrics(server.metrics_url, "rq_moe_")
        log = server.log_tail(80)
    served = load["result"]
    assert served.errors == 0, (served.error_samples[:3], log)
    assert {"1", "2"} <= set(served.versions), served.versions
    assert served.versions["2"] >= CONCURRENCY, served.versions
    # every response == offline generation of the version that served it (replica offsets from zero per request)
    offline = {v: OrtGenerator(version_build(repo, int(v)), streaming=True, intra_op_num_threads=1)
               for v in served.versions}
    expected: dict[tuple[str, int], list[int]] = {}
    for index, response in served.responses:
        key = (response.model_version, index)
        if key not in expected:
            gen = offline[response.model_version]
            gen.reset()
            ids = np.asarray([gen.tokenizer.encode(prompts[index]).ids], dtype=np.int64)
            expected[key] = gen.generate(ids, max_new_tokens=MAX_TOKENS, eos_token_id=-1).tokens[0].tolist()
        assert response.tokens == expected[key], (key, response.tokens, expected[key])
    # the re-plan predicted a drop on the served loads, and the server's counters show one
    (old_mean, _), (new_mean, _) = result.model_lis
    assert new_mean < old_mean
    before = parse_metrics(swap.read_text(), "rq_moe_")
    assert _copy_lis(after, None, "2") < _copy_lis(before, None, "1")
