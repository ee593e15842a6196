"""Rich tables for humans; the same numbers go to JSON for machines."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from rq.evaluate import EvalReport
from rq.lis import fmt
from rq.schema import Plan


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"R&Q plan ({plan.importance_metric} importance, budget {plan.budget.budget_factor:g}x)")
    for col in ("layer", "module", "INT4 primaries", "replicas", "copies", "LIS before", "LIS after (pred.)",
                "bytes vs original"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for layer in plan.layers:
        reference = None
        table.add_row(str(layer.layer), layer.module, str(sum(e.precision == "int4" for e in layer.experts)),
                      str(sum(e.replicas for e in layer.experts)), str(sum(layer.logcnt)),
                      fmt(layer.lis_before if layer.lis_before is not None else float("nan")),
                      fmt(layer.lis_after if layer.lis_after is not None else float("nan")), reference or "")
    table.caption = (f"planned {plan.budget.planned_bytes:,} B of {plan.budget.reference_bytes:,} B reference "
                     f"({plan.budget.planned_bytes / plan.budget.reference_bytes:.3f}x)")
    return table


def lis_table(report: EvalReport, title: str = "Load-Imbalance Score (LIS) before -> after R&Q") -> Table:
    table = Table(title=title)
    table.add_column("layer", justify="left")
    sizes = sorted(report.batch)
    for b in sizes:
        table.add_column(f"B={b} cum.", justify="right")
        table.add_column(f"B={b} inst. mean/max", justify="right")
    if report.streaming is not None:
        table.add_column(f"stream B={report.stream_batch} cum.", justify="right")
        table.add_column("stream inst. mean/p95", justify="right")
    rows = [(name, [report.batch[b][i] for b in sizes], report.streaming[i] if report.streaming else None)
            for i, name in enumerate(report.layers)]
    for name, points, stream in rows:
        cells = []
        for p in points:
            cells += [f"{fmt(p.before)} -> {fmt(p.after)}",
                      f"{fmt(p.inst_before.mean)}/{fmt(p.inst_before.max)} -> {fmt(p.inst_after.mean)}/{fmt(p.inst_after.max)}"]
        if report.streaming is not None:
            cells += [f"{fmt(stream.before)} -> {fmt(stream.after)}",
                      f"{fmt(stream.inst_before.mean)}/{fmt(stream.inst_before.p95)} -> "
                      f"{fmt(stream.inst_after.mean)}/{fmt(stream.inst_after.p95)}"]
        table.add_row(name, *cells)
    model_cells = []
    for b in sizes:
        mb, wb, ma, wa = report.model_point(report.batch[b])
        model_cells += [f"{fmt(mb)} -> {fmt(ma)}", f"worst {fmt(wb)} -> {fmt(wa)}"]
    if report.streaming is not None:
        mb, wb, ma, wa = report.model_point(report.streaming)
        model_cells += [f"{fmt(mb)} -> {fmt(ma)}", f"worst {fmt(wb)} -> {fmt(wa)}"]
    table.add_row("[bold]model (mean over layers)", *model_cells, end_section=True)
    unbalanceable = sum(p.inst_after.unbalanceable for p in (report.streaming or []))
    if unbalanceable:
        table.caption = (f"{unbalanceable} streaming layer-steps had fewer assignments than copies (T*K < U) and are "
                         f"left out of the instantaneous statistics")
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
    console.print(lis_table(report))
    console.print(accuracy_table(report))
