"""rq's benchmarks: measurements against baselines measured in the same run (RESULTS.md).

Run from the repository root as modules, e.g. ``python -m benchmarks.run_all`` or ``python -m benchmarks.bench_speed``;
the tests import them as the package ``benchmarks`` (pyproject.toml puts the root on pytest's path).
"""
