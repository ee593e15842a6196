"""The demo's rich tables: one screen per question, numbers from this run."""

from __future__ import annotations

from rich.table import Table

from rq.evaluate import EvalReport
from rq.lis import fmt, model_lis


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


def domains(reports: dict[str, EvalReport]) -> Table:
    table = Table(title="Does the plan hold off its calibration data? (finding iii) + accuracy parity")
    for col in ("data", "model LIS (cum.)", "reduction", "perplexity", "ppl change", "top-1 agree", "KL(orig||R&Q)"):
        table.add_column(col, justify="right")
    for name, report in reports.items():
        largest = max(report.batch)
        mb, _, ma, _ = report.model_point(report.batch[largest])
        acc = report.accuracy
        table.add_row(name, _arrow(mb, ma), f"{mb / ma:.2f}x", f"{acc.ppl_original:.2f} -> {acc.ppl_rq:.2f}",
                      f"{acc.ppl_change_pct:+.2f}%", f"{100 * acc.top1_agreement:.2f}%", f"{acc.kl_mean:.5f}")
    report = next(iter(reports.values()))
    table.caption = (f"expert memory {report.bytes_before:,} B -> {report.bytes_after:,} B "
                     f"({report.bytes_after / report.bytes_before:.3f}x)")
    return table


def importance(summary: dict) -> Table:
    table = Table(title="Importance is not frequency (finding ii): Spearman rank correlation with load")
    for col in ("layer", "INT4 sensitivity vs load", "contribution vs load"):
        table.add_column(col, justify="right")
    for row in summary["importance"]:
        table.add_row(str(row["layer"]), f"{row['spearman_sensitivity_vs_frequency']:+.2f}",
                      f"{row['spearman_contribution_vs_frequency']:+.2f}")
    return table


def calibration_sizes(summary: dict) -> Table:
    table = Table(title="Calibration-set size (finding iii): plan LIS on held-out data, replica overlap")
    for col in ("calib. seqs", "tokens", "held-out code", "held-out prose", "replicas shared with largest"):
        table.add_column(col, justify="right")
    for row in summary["calibration_sweep"]:
        table.add_row(str(row["sequences"]), f"{row['tokens']:,}",
                      _arrow(row["heldout_code_before"], row["heldout_code_after"]),
                      _arrow(row["heldout_prose_before"], row["heldout_prose_after"]),
                      f"{100 * row['replica_overlap_with_largest']:.0f}%")
    return table


def demo_tables(summary: dict, reports: dict[str, EvalReport]) -> list[Table]:
    code = reports["heldout_code"]
    return [lis_by_batch(code, "LIS before -> after R&Q on held-out code (finding i: batch size)"),
            per_layer(code, "Per-layer LIS on held-out code"), domains(reports), importance(summary),
            calibration_sizes(summary)]
