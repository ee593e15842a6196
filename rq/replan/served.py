"""The loads a Triton Inference Server served, as rq stats (``rq import-loads tritonserver``, ``rq replan``).

rq's ``generate`` and ``rq_forward`` models count every assignment each physical copy served
(``rq_moe_expert_load_total{model, version, layer, expert, copy}``, engines/tritonserver_models/rq_telemetry.py).
Summed over copies (and versions), a counter gives the exact logical load of each expert; the difference of two
scrapes gives the loads of the traffic in between (a window). A counter that is new in the later scrape (a version
loaded in between) counts from zero; one that went backwards (a restarted server) counts from zero too; one that is
gone (a version unloaded in between) drops out, with what it served since the earlier scrape.

:func:`window_loads` is pure over parsed scrapes; :func:`served_stats` makes stats for ``rq plan`` out of the
calibration stats the running plan was made from (shapes, bytes, importance) and the served loads.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import torch

from rq.calibrate.stats import METRICS, CalibrationStats, LayerStats
from rq.documents import CalibrationInfo
from rq.engines.tritonserver import GENERATE
from rq.engines.tritonserver_client import MetricKey, parse_metrics
from rq.errors import RQError

LOAD_COUNTER = "rq_moe_expert_load_total"
IMPORTANCE = tuple(m for m in METRICS if m != "load")  # the metrics carried over per assignment


def read_scrape_text(source: str | Path) -> str:
    """The Prometheus text of ``source``: an ``http(s)://`` ``/metrics`` URL (Triton's metrics port) or a file a
    previous scrape was saved to (``--save-scrape``)."""
    text = str(source)
    if text.startswith(("http:/", "https:/")) and "://" not in text:  # a URL that went through pathlib
        text = text.replace(":/", "://", 1)
    if text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=10) as response:
                return response.read().decode("utf-8", errors="replace")
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise RQError(f"cannot read metrics from {text} ({reason}); pass Triton's metrics URL, e.g. "
                          f"http://localhost:8002/metrics, or a saved scrape file") from None
    path = Path(text)
    if not path.is_file():
        raise RQError(f"{path} is neither a metrics URL nor a saved scrape file; pass http://HOST:8002/metrics or "
                      f"the file --save-scrape wrote")
    return path.read_text(errors="replace")


def read_scrape(source: str | Path) -> dict[MetricKey, float]:
    """:func:`read_scrape_text` parsed (``rq.engines.tritonserver_client.parse_metrics``), rq's series only."""
    text = read_scrape_text(source)
    try:
        return parse_metrics(text, "rq_moe_")
    except ValueError as err:
        raise RQError(f"{source} is not Prometheus text ({err}); pass Triton's /metrics or a saved scrape") from None


def _load_series(scrape: dict[MetricKey, float], model: str) -> dict[tuple, tuple[int, int, float]]:
    out = {}
    for (name, labels), value in scrape.items():
        label = dict(labels)
        if name != LOAD_COUNTER or label.get("model") != model:
            continue
        try:
            out[labels] = (int(label["layer"]), int(label["expert"]), value)
        except (KeyError, ValueError):
            raise RQError(f"a {LOAD_COUNTER} series has labels {label}, not rq's (layer, expert, copy); "
                          f"scrape a server that serves an rq repository") from None
    return out


def window_loads(after: dict[MetricKey, float], before: dict[MetricKey, float] | None, num_layers: int,
                 num_experts: int, model: str = GENERATE) -> torch.Tensor:
    """``[num_layers, num_experts]`` int64 logical loads served between the scrapes ``before`` and ``after``
    (since the server started when ``before`` is None), summed over copies, versions and instances."""
    now = _load_series(after, model)
    if not now:
        raise RQError(f"the scrape has no {LOAD_COUNTER}{{model=\"{model}\"}} series; is the server serving an rq "
                      f"repository with metrics on, and has {model} served a request yet?")
    then = _load_series(before, model) if before is not None else {}
    loads = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    for labels, (layer, expert, value) in now.items():
        if not (0 <= layer < num_layers and 0 <= expert < num_experts):
            raise RQError(f"the server counts layer {layer} expert {expert}; the stats have {num_layers} MoE layers x "
                          f"{num_experts} experts: not the model the server serves")
        start = then.get(labels, (layer, expert, 0.0))[2]
        loads[layer, expert] += value - start if value >= start else value
    if float(loads.sum()) == 0:
        raise RQError("no assignments were served between the two scrapes; let traffic run, then scrape again")
    return loads.round().to(torch.int64)


def copy_loads_by_version(after: dict[MetricKey, float], before: dict[MetricKey, float] | None = None,
                          model: str = GENERATE) -> dict[str, dict[int, torch.Tensor]]:
    """``{version: {layer: loads of its copies [P]}}`` served between two scrapes (copies in logical-major order):
    what LIS over copies each version's traffic had (:func:`rq.core.lis.lis_value` of each)."""
    then = _load_series(before, model) if before is not None else {}
    rows: dict[str, dict[int, dict[tuple[int, int], float]]] = {}
    for labels, (layer, expert, value) in _load_series(after, model).items():
        label = dict(labels)
        start = then.get(labels, (layer, expert, 0.0))[2]
        copy = int(label.get("copy", 0))
        rows.setdefault(label.get("version", "1"), {}).setdefault(layer, {})[(expert, copy)] = (
            value - start if value >= start else value)
    return {v: {l: torch.tensor([c[k] for k in sorted(c)], dtype=torch.float64) for l, c in sorted(layers.items())}
            for v, layers in rows.items()}


def served_stats(calibration: CalibrationStats, loads: torch.Tensor, source: str, blend: float = 1.0) -> CalibrationStats:
    """Stats for ``rq plan`` with the served ``loads [L, N]`` and the calibration run's shapes, bytes and
    importance.

    load = ``blend`` x served + (1 - blend) x the calibration load rescaled to the served total, per layer
    (``blend`` 1: the served traffic alone). Each importance metric (gate mass, contribution, quantization
    sensitivity) is kept per assignment: ``metric[e] / calibration load[e] x new load[e]``, so an expert served
    more weighs more but its per-token importance stays what calibration measured; an expert calibration never
    saw gets its layer's mean per-assignment value.
    """
    if not 0.0 <= blend <= 1.0:
        raise RQError(f"--blend must be in [0, 1] (1: served loads only), got {blend}")
    if tuple(loads.shape) != (len(calibration.layers), calibration.model.num_experts):
        raise RQError(f"served loads have shape {tuple(loads.shape)}, the stats {len(calibration.layers)} MoE layers x "
                      f"{calibration.model.num_experts} experts: not the model the server serves")
    layers = []
    for s, served in zip(calibration.layers, loads.to(torch.float64)):
        cal = s.load.to(torch.float64)
        scaled = cal * (served.sum() / cal.sum()) if float(cal.sum()) > 0 else served
        load = (blend * served + (1.0 - blend) * scaled).round()
        metrics = {}
        for name in IMPORTANCE:
            value = getattr(s, name).to(torch.float64)
            seen = cal > 0
            mean = value[seen].sum() / cal[seen].sum() if bool(seen.any()) else torch.tensor(1.0, dtype=torch.float64)
            per_assignment = torch.where(seen, value / cal.clamp_min(1e-300), mean)
            metrics[name] = per_assignment * load
        layers.append(LayerStats(index=s.index, path=s.path, num_experts=s.num_experts, top_k=s.top_k,
                                 activation=s.activation, w_in_shape=s.w_in_shape, w_out_shape=s.w_out_shape,
                                 original_bytes=list(s.original_bytes), quantizable=s.quantizable, load=load,
                                 load_windows=load.unsqueeze(0), **metrics))  # the served window: one window
    top_k = calibration.model.top_k
    tokens = int(round(float(loads.sum(-1).max()) / top_k))
    info = CalibrationInfo(data=f"{source}; served loads (blend {blend:g}) with the importance per assignment of "
                                f"{calibration.calibration.data}",
                           sequences=0, seq_len=0, tokens=max(tokens, 1), seed=calibration.calibration.seed)
    return CalibrationStats(calibration.model, info, calibration.group_size, layers)
