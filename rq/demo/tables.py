"""The demo's rich tables: one screen per question, numbers from this run."""

from __future__ import annotations

from rich.table import Table

from rq.eval.evaluate import EvalReport
from rq.eval.report import _arrow, lis_by_batch, per_layer


def domains(reports: dict[str, EvalReport]) -> Table:
    table = Table(title="Does the plan hold off its calibration data? (finding iii) + accuracy parity")
    for col in ("data", "model LIS (cum.)", "reduction", "streaming decode", "layers worse", "perplexity",
                "ppl change", "top-1 agree", "KL(orig||R&Q)"):
        table.add_column(col, justify="right")
    for name, report in reports.items():
        largest = max(report.batch)
        mb, _, ma, _ = report.model_point(report.batch[largest])
        acc = report.accuracy
        if report.streaming is None:
            streaming = "-"
        else:
            sb, _, sa, _ = report.model_point(report.streaming)
            streaming = f"{_arrow(sb, sa)} ({sb / sa:.2f}x)"
        table.add_row(name, _arrow(mb, ma), f"{mb / ma:.2f}x", streaming, str(len(report.losses())),
                      f"{acc.ppl_original:.2f} -> {acc.ppl_rq:.2f}",
                      f"{acc.ppl_change_pct:+.2f}%", f"{100 * acc.top1_agreement:.2f}%", f"{acc.kl_mean:.5f}")
    report = next(iter(reports.values()))
    table.caption = ("layers worse: (mode, layer) pairs where the plan's LIS exceeds no balancing's; "
                     f"expert memory {report.bytes_before:,} B -> {report.bytes_after:,} B "
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
