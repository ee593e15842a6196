"""Rich tables for humans; the same numbers go to JSON for machines."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from rq.eval.evaluate import EvalReport
from rq.core.lis import fmt, model_lis
from rq.plan.schema import Plan


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"R&Q plan ({plan.importance_metric} importance, budget {plan.budget.budget_factor:g}x)")
    mixed = any(2 in layer.precision for layer in plan.layers)  # INT8 columns only where there are INT8 copies
    columns = ("layer", "module", "INT4 primaries", "replicas", "copies", "LIS before", "LIS after (pred.)")
    for col in columns + (("INT8 copies", "INT4 copies", "pred. error") if mixed else ()):
        table.add_column(col, justify="right" if col != "module" else "left")
    for layer in plan.layers:
        row = [str(layer.layer), layer.module, str(sum(e.precision == "int4" for e in layer.experts)),
               str(sum(e.replicas for e in layer.experts)), str(sum(layer.logcnt)),
               fmt(layer.lis_before if layer.lis_before is not None else float("nan")),
               fmt(layer.lis_after if layer.lis_after is not None else float("nan"))]
        if mixed:
            error = layer.predicted_error
            row += [str(layer.precision.count(2)), str(layer.precision.count(1)),
                    "n/a" if error is None else f"{error:.3g}"]
        table.add_row(*row)
    table.caption = (f"planned {plan.budget.planned_bytes:,} B of {plan.budget.reference_bytes:,} B reference "
                     f"({plan.budget.planned_bytes / plan.budget.reference_bytes:.3f}x)")
    return table


def _arrow(before: float, after: float) -> str:
    return f"{fmt(before)} -> {fmt(after)}"


def lis_by_batch(report: EvalReport, title: str) -> Table:
    table = Table(title=title, caption="model LIS = mean over MoE layers; inst. = per call (batch or decode step)")
    for col in ("setting", "cumulative", "reduction", "inst. mean", "inst. p95", "worst layer (cum.)"):
        table.add_column(col, justify="right")
    rows = [(f"batch {b} seq", pts) for b, pts in sorted(report.batch.items())]
    if report.streaming is not None:
        rows.append((f"streaming, {report.stream_batch} seqs", report.streaming))
    for label, points in rows:
        mb, wb, ma, wa = report.model_point(points)
        inst_b = model_lis([p.inst_before.mean for p in points])[0]
        inst_a = model_lis([p.inst_after.mean for p in points])[0]
        p95_b = model_lis([p.inst_before.p95 for p in points])[0]
        p95_a = model_lis([p.inst_after.p95 for p in points])[0]
        table.add_row(label, _arrow(mb, ma), f"{mb / ma:.2f}x" if ma == ma and ma else "n/a",
                      _arrow(inst_b, inst_a), _arrow(p95_b, p95_a), _arrow(wb, wa))
    skipped = sum(p.inst_after.unbalanceable for p in report.streaming or [])
    if skipped:
        table.caption += (f"; {skipped} streaming layer-steps had fewer assignments than copies (T*K < U): "
                          f"left out of the instantaneous statistics (n/a when all are)")
    return table


def per_layer(report: EvalReport, title: str) -> Table:
    table = Table(title=title)
    largest = max(report.batch)
    for col in ("layer", f"batch {largest}: cum. LIS", "inst. mean", "streaming cum.", "streaming inst. mean"):
        table.add_column(col, justify="right")
    for i, name in enumerate(report.layers):
        p = report.batch[largest][i]
        s = report.streaming[i] if report.streaming else None
        table.add_row(name, _arrow(p.before, p.after), _arrow(p.inst_before.mean, p.inst_after.mean),
                      _arrow(s.before, s.after) if s else "", _arrow(s.inst_before.mean, s.inst_after.mean) if s else "")
    return table


def accuracy_table(report: EvalReport) -> Table:
    table = Table(title="Accuracy and memory: R&Q vs original")
    for col in ("metric", "original", "R&Q", "change"):
        table.add_column(col, justify="right")
    acc = report.accuracy
    if acc is not None:
        table.add_row("perplexity", f"{acc.ppl_original:.3f}", f"{acc.ppl_rq:.3f}", f"{acc.ppl_change_pct:+.3f}%")
        table.add_row("next-token top-1 agreement", "", f"{100 * acc.top1_agreement:.2f}%", "")
        table.add_row("mean KL(original || R&Q)", "", f"{acc.kl_mean:.5f}", "")
        table.add_row("tokens", f"{acc.tokens}", "", "")
    table.add_row("expert bytes", f"{report.bytes_before:,}", f"{report.bytes_after:,}",
                  f"{report.bytes_after / report.bytes_before:.3f}x")
    return table


def print_eval(report: EvalReport, console: Console | None = None) -> None:
    console = console or Console()
    console.print(lis_by_batch(report, "Load-Imbalance Score (LIS) before -> after R&Q"))
    console.print(per_layer(report, "Per-layer LIS"))
    console.print(accuracy_table(report))
    for line in loss_warnings(report):
        console.print(line, markup=False, highlight=False)


LOSS_FIX = ("re-plan on the traffic this model serves (`rq replan`, or `rq calibrate --generate N` on such text, "
            "then `rq plan --hedge`)")


def loss_warnings(report: EvalReport) -> list[str]:
    """One line per (mode, layer) where the plan loses to no balancing, with the fix."""
    return [f"warning: {loss['mode']}, {loss['layer']}: the plan raises LIS above no balancing "
            f"({fmt(loss['before'])} -> {fmt(loss['after'])}); {LOSS_FIX}" for loss in report.losses()]
