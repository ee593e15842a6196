"""Live MoE load telemetry for rq's Triton Python-backend models, as Triton custom metrics.

Copied next to ``model.py`` in the model repository (``rq.engines.tritonserver.write_model_repository``); it
needs numpy only, and gets ``triton_python_backend_utils`` passed in (so it can be tested without Triton).

Every forward call of the R&Q graph returns, per MoE layer, ``expert_counts [N]`` (the logical loads of the
call) and used replica offsets ``o [N]``. By the replica rule (docs/spec.md §4) the ``n``-th assignment routed to
expert ``e`` goes to copy ``(o_e + n) mod C_e``, so the load of each physical copy follows exactly from
``(count, offset, C_e)`` with no per-token data:

    copy_load[e, c] = L_e // C_e + (1 if (c - o_e) mod C_e < L_e mod C_e else 0)

Metrics (Prometheus names; Triton serves them on ``/metrics`` of its metrics port):

- ``rq_moe_expert_load_total{model, layer, expert, copy}`` counter: assignments served by each physical
  copy (``sum by (layer, expert)`` gives logical loads). Shared by all instances of the model.
- ``rq_moe_lis{model, instance, layer, units, scope}`` gauge, ``units`` = ``copies`` (after R&Q) or
  ``experts`` (the same tokens over logical experts: the no-R&Q view), ``scope`` =
  ``instantaneous`` (the latest call that could be balanced at all, i.e. with at least as many
  assignments as units, docs/spec.md §2), ``window`` (loads of the last ``window`` calls summed: the live view
  when decode steps are too small to balance one by one) and ``cumulative`` (since the instance started).
  A series is created with its first value: an idle instance exports none (a gauge created up front
  would read 0, which LIS never is).
- ``rq_moe_unbalanceable_calls_total{model, layer, units}`` counter: calls with fewer assignments than
  units (their instantaneous LIS is not reported, docs/spec.md §2).
- ``rq_moe_calls_total{model}`` counter: forward calls (prefill + decode steps) of the graph.
- ``rq_moe_plan_lis{model, version, layer}`` gauge: the LIS over copies the plan predicted for each layer on its
  calibration data (``lis_after`` of the export's ``plan.json``), and
  ``rq_moe_plan_drift{model, version, instance, layer}`` gauge: windowed LIS over copies divided by that
  prediction. When it exceeds ``drift_threshold`` on a window of at least ``DRIFT_MIN_PER_UNIT`` assignments
  per copy, the instance logs one warning for the layer naming ``rq replan`` (again only after it has fallen
  back below the threshold): traffic no longer looks like the calibration data.

Every series but ``rq_moe_calls_total`` and ``rq_moe_unbalanceable_calls_total`` carries the model ``version``:
while a re-plan swaps version N for N+1 (docs/tritonserver.md), both serve for a moment with different copies.

Counters are flushed every ``flush_every`` calls and by :meth:`LoadTelemetry.flush` (end of a request),
so a scrape lags a running request by at most ``flush_every`` calls.

Both models also read their shared ``config.pbtxt`` parameters here (:func:`model_parameter`,
:func:`runtime_settings`, :meth:`LoadTelemetry.from_config`), so the two agree on names and defaults.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np

DRIFT_MIN_PER_UNIT = 8  # assignments per copy a window needs before its drift is worth a warning
REPLAN_COMMAND = "rq replan REPO --metrics URL --stats STATS_DIR --model MODEL_DIR"


def model_parameter(config: dict, name: str, default: str) -> str:
    """A ``parameters { key: name value { string_value } }`` entry of the model config, or ``default``."""
    value = config.get("parameters", {}).get(name, {}).get("string_value")
    return default if value in (None, "") else value


def runtime_settings(args: dict, config: dict) -> tuple[Path, int, list[str]]:
    """The export folder (``rq_build_dir``, relative to the repository root; ``{version}`` in it is this model's
    own version, so version N serves the export published as version N), ONNX Runtime's intra-op thread
    count (``intra_op_threads``, 0: its default) and execution providers (``providers``, comma-separated).
    Repositories written before versioned exports name ``rq_onnx/1`` literally and keep working."""
    repo_root = Path(args["model_repository"]).resolve().parent
    relative = model_parameter(config, "rq_build_dir", "rq_onnx/1").replace("{version}", str(args["model_version"]))
    build = (repo_root / relative).resolve()
    threads = int(model_parameter(config, "intra_op_threads", "0"))
    providers = [p.strip() for p in model_parameter(config, "providers", "CPUExecutionProvider").split(",")
                 if p.strip()]
    return build, threads, providers


def plan_predictions(build: Path) -> dict[int, float]:
    """``{MoE layer: predicted LIS over copies}`` from the export's ``plan.json`` (``lis_after``); empty when the
    export has no plan or the plan predicts nothing for a layer (no calibration load)."""
    path = Path(build) / "plan.json"
    if not path.is_file():
        return {}
    plan = json.loads(path.read_text())
    return {int(layer["layer"]): float(layer["lis_after"]) for layer in plan.get("layers", [])
            if layer.get("lis_after") is not None}


def copy_loads(counts: np.ndarray, offsets: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """Loads ``[P]`` of the physical copies (logical-major order) for one call, by the replica rule."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    copies = np.asarray(copies, dtype=np.int64)
    out = []
    for load, off, c in zip(counts.tolist(), offsets.tolist(), copies.tolist()):
        base, extra = divmod(load, c)
        out.extend(base + (1 if (k - off) % c < extra else 0) for k in range(c))
    return np.asarray(out, dtype=np.int64)


def lis(loads: np.ndarray) -> float | None:
    """``max / mean`` over units (docs/spec.md §2); ``None`` when the total is 0 (no LIS, never 0 or 1)."""
    loads = np.asarray(loads, dtype=np.float64)
    total = loads.sum()
    if total <= 0:
        return None
    return float(loads.max() * loads.size / total)


class LoadTelemetry:
    """Per-layer expert loads and LIS gauges of one Triton model instance."""

    UNITS = ("copies", "experts")

    def __init__(self, pb_utils, model: str, instance: str, moe_layers: list[dict], *, window: int = 64,
                 flush_every: int = 16, enabled: bool = True, version: str = "1",
                 predicted: dict[int, float] | None = None, drift_threshold: float = 1.25):
        self.enabled = enabled
        self.version = str(version)
        self.predicted = {int(l): float(v) for l, v in (predicted or {}).items() if v is not None and v > 0}
        self.drift_threshold = float(drift_threshold)
        self.drifted: set[int] = set()  # layers whose drift warning is out (re-armed below the threshold)
        self.logger = getattr(pb_utils, "Logger", None)
        self.layers = {int(layer["index"]): np.asarray(layer["copies"], dtype=np.int64) for layer in moe_layers}
        self.flush_every = max(1, int(flush_every))
        self.pending = {l: np.zeros(int(c.sum()), np.int64) for l, c in self.layers.items()}
        self.pending_unbalanceable = {(l, u): 0 for l in self.layers for u in self.UNITS}
        self.pending_calls = 0
        self.cumulative = {l: (np.zeros(int(c.sum()), np.int64), np.zeros(c.size, np.int64))
                           for l, c in self.layers.items()}
        self.recent = {l: deque(maxlen=max(1, int(window))) for l in self.layers}
        self.calls = 0
        if not enabled:
            return
        self._register_metrics(pb_utils, model, instance)

    @classmethod
    def from_config(cls, pb_utils, config: dict, model: str, instance: str, moe_layers: list[dict], *,
                    version: str = "1", build: Path | None = None) -> LoadTelemetry:
        """Telemetry as the model config asks: ``metrics`` (on/off), ``lis_window``, ``metrics_flush_every``,
        ``drift_threshold``; the plan's predictions from ``build/plan.json`` when there is one."""
        return cls(pb_utils, model, instance, moe_layers,
                   window=int(model_parameter(config, "lis_window", "64")),
                   flush_every=int(model_parameter(config, "metrics_flush_every", "16")),
                   enabled=model_parameter(config, "metrics", "true").lower() in ("1", "true", "yes"),
                   version=version, predicted=plan_predictions(build) if build is not None else None,
                   drift_threshold=float(model_parameter(config, "drift_threshold", "1.25")))

    def _register_metrics(self, pb_utils, model: str, instance: str) -> None:
        family = pb_utils.MetricFamily
        # the families must outlive their metrics: keep references on self
        self.f_load = family(name="rq_moe_expert_load_total", kind=family.COUNTER,
                             description="Assignments served per physical expert copy (R&Q replica rule)")
        self.f_lis = family(name="rq_moe_lis", kind=family.GAUGE,
                            description="Load-Imbalance Score max/mean per MoE layer; units=copies after "
                                        "R&Q, units=experts the same tokens over logical experts")
        self.f_unb = family(name="rq_moe_unbalanceable_calls_total", kind=family.COUNTER,
                            description="Forward calls with fewer assignments than units (no instantaneous LIS)")
        self.f_calls = family(name="rq_moe_calls_total", kind=family.COUNTER,
                              description="Forward calls (prefill and decode steps) of the R&Q graph")
        self.m_load = {}
        for l, copies in self.layers.items():
            for e, c in enumerate(copies.tolist()):
                for k in range(c):
                    self.m_load[(l, e, k)] = self.f_load.Metric(labels={
                        "model": model, "version": self.version, "layer": str(l), "expert": str(e), "copy": str(k)})
        self.lis_labels = {"model": model, "version": self.version, "instance": instance}
        self.f_plan = family(name="rq_moe_plan_lis", kind=family.GAUGE,
                             description="LIS over copies the plan predicted per MoE layer on its calibration data")
        self.f_drift = family(name="rq_moe_plan_drift", kind=family.GAUGE,
                              description="Windowed LIS over copies divided by the plan's predicted LIS")
        self.m_plan = {}
        for l, value in self.predicted.items():
            self.m_plan[l] = self.f_plan.Metric(labels={"model": model, "version": self.version, "layer": str(l)})
            self.m_plan[l].set(value)
        self.m_drift = {}
        self.m_lis = {}  # created on the first value: an instance that has no LIS exports no series
        self.m_unb = {(l, u): self.f_unb.Metric(labels={"model": model, "layer": str(l), "units": u})
                      for l in self.layers for u in self.UNITS}
        self.m_calls = self.f_calls.Metric(labels={"model": model})

    def _set_lis(self, layer: int, units: str, scope: str, value: float) -> None:
        """Set one ``rq_moe_lis`` gauge, creating its series the first time it has a value. Triton's gauges
        start at 0, a value LIS never has (it is >= 1): a series created up front would read 0 on an idle
        instance and fire alerts such as ``rq_moe_lis > 2`` or ``< 1.2``. An absent series is Prometheus'
        way to say "no data" (``absent()`` alerts on it); docs/tritonserver.md says so."""
        key = (layer, units, scope)
        if key not in self.m_lis:
            self.m_lis[key] = self.f_lis.Metric(labels={**self.lis_labels, "layer": str(layer), "units": units,
                                                        "scope": scope})
        self.m_lis[key].set(value)

    def _drift(self, layer: int, window_lis: float, assignments: int, units: int) -> None:
        """Update ``rq_moe_plan_drift`` for ``layer``; log one warning when it crosses the threshold on a window
        big enough to say so (a few decode steps are imbalanced by chance, docs/spec.md §2)."""
        predicted = self.predicted.get(layer)
        if predicted is None:
            return
        ratio = window_lis / predicted
        if layer not in self.m_drift:
            self.m_drift[layer] = self.f_drift.Metric(labels={**self.lis_labels, "layer": str(layer)})
        self.m_drift[layer].set(ratio)
        if ratio <= self.drift_threshold:
            self.drifted.discard(layer)
        elif assignments >= DRIFT_MIN_PER_UNIT * units and layer not in self.drifted:
            self.drifted.add(layer)
            if self.logger is not None:
                self.logger.log_warn(
                    f"rq: MoE layer {layer} windowed LIS over copies {window_lis:.2f} is {ratio:.2f}x the plan's "
                    f"predicted {predicted:.2f} (threshold {self.drift_threshold:.2f}): traffic has drifted from the "
                    f"calibration data; re-plan from the served loads with `{REPLAN_COMMAND}`")

    def record(self, counts: dict[int, np.ndarray], offsets: dict[int, np.ndarray]) -> None:
        """One forward call: ``counts`` and the ``offsets`` it used, per MoE layer index."""
        if not self.enabled:
            return
        for l, cnt in counts.items():
            if l not in self.layers:
                continue
            cnt = np.asarray(cnt, dtype=np.int64).reshape(-1)
            off = np.asarray(offsets.get(l, np.zeros_like(cnt)), dtype=np.int64).reshape(-1)
            phys = copy_loads(cnt, off, self.layers[l])
            self.pending[l] += phys
            self.cumulative[l][0][:] += phys
            self.cumulative[l][1][:] += cnt
            self.recent[l].append((phys, cnt))
            total = int(cnt.sum())
            for units, loads in (("copies", phys), ("experts", cnt)):
                if total >= loads.size:
                    value = lis(loads)
                    if value is not None:
                        self._set_lis(l, units, "instantaneous", value)
                elif total > 0:
                    self.pending_unbalanceable[(l, units)] += 1
        self.pending_calls += 1
        self.calls += 1
        if self.calls % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        """Push pending counter increments and refresh the window and cumulative gauges."""
        if not self.enabled or self.pending_calls == 0:
            return
        for l, copies in self.layers.items():
            pending = self.pending[l]
            if pending.any():
                p = 0
                for e, c in enumerate(copies.tolist()):
                    for k in range(c):
                        if pending[p]:
                            self.m_load[(l, e, k)].increment(float(pending[p]))
                        p += 1
                pending[:] = 0
            if self.recent[l]:
                phys = np.sum([r[0] for r in self.recent[l]], axis=0)
                logical = np.sum([r[1] for r in self.recent[l]], axis=0)
                for units, loads in (("copies", phys), ("experts", logical)):
                    value = lis(loads)
                    if value is not None:
                        self._set_lis(l, units, "window", value)
                        if units == "copies":
                            self._drift(l, value, int(phys.sum()), phys.size)
            for units, loads in zip(self.UNITS, self.cumulative[l]):
                value = lis(loads)
                if value is not None:
                    self._set_lis(l, units, "cumulative", value)
        for key, n in self.pending_unbalanceable.items():
            if n:
                self.m_unb[key].increment(float(n))
                self.pending_unbalanceable[key] = 0
        self.m_calls.increment(float(self.pending_calls))
        self.pending_calls = 0
