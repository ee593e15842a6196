"""The demo's PNG plots (matplotlib, Agg backend): one figure per finding, titled and labelled."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from rq.core.replica import split_load  # noqa: E402
from rq.plan.schema import Plan  # noqa: E402
from rq.calibrate.stats import CalibrationStats  # noqa: E402

BEFORE, AFTER = "#c44e52", "#4c72b0"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_heatmap(path: Path, stats: CalibrationStats, plan: Plan) -> None:
    """Per-layer load share per unit: logical experts before, physical copies after (calibration loads)."""
    before = np.stack([(s.load / s.load.sum()).numpy() for s in stats.layers])
    copies = [split_load(s.load.to(torch.int64), torch.tensor(lp.logcnt)).double() for s, lp in zip(stats.layers, plan.layers)]
    width = max(c.numel() for c in copies)
    after = np.full((len(copies), width), np.nan)
    for i, c in enumerate(copies):
        after[i, : c.numel()] = (c / c.sum()).numpy()
    vmax = float(np.nanmax(before))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2 + 0.3 * len(copies)), gridspec_kw={"width_ratios": [before.shape[1], width]})
    for ax, data, title, xlabel in ((axes[0], before, "before: load share per expert", "logical expert"),
                                    (axes[1], after, "after R&Q: load share per copy", "physical copy (logical-major)")):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(data.shape[0]))
    fig.colorbar(im, ax=axes, label="share of the layer's assignments", shrink=0.9)
    fig.suptitle("Expert load on calibration data (white = no such copy)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def lis_vs_batch(path: Path, report: dict) -> None:
    """Finding (i): model LIS (mean over layers) against batch size, cumulative and instantaneous."""
    sizes = sorted(int(b) for b in report["batch"])

    def model_mean(points, key, field=None):
        values = [(p[key][field] if field else p[key]) for p in points]
        values = [v for v in values if v is not None and not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, color, label in (("before", BEFORE, "original"), ("after", AFTER, "R&Q")):
        inst = [model_mean(report["batch"][str(b)], f"inst_{key}", "mean") for b in sizes]
        p95 = [model_mean(report["batch"][str(b)], f"inst_{key}", "p95") for b in sizes]
        cum = [model_mean(report["batch"][str(b)], key) for b in sizes]
        ax.plot(sizes, inst, "o-", color=color, label=f"{label}: instantaneous (mean over batches)")
        ax.fill_between(sizes, inst, p95, color=color, alpha=0.15, label=f"{label}: up to p95 over batches")
        ax.plot(sizes, cum, "--", color=color, label=f"{label}: cumulative")
        if report.get("streaming"):
            ax.axhline(model_mean(report["streaming"], f"inst_{key}", "mean"), color=color, ls=":",
                       label=f"{label}: streaming decode, {report['stream_batch']} seqs (inst. mean)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (sequences per forward pass)")
    ax.set_ylabel("model LIS (mean over MoE layers; 1 = balanced)")
    ax.set_title("Load imbalance vs batch size, held-out code")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    _save(fig, path)


def importance_vs_frequency(path: Path, importance: list[dict]) -> None:
    """Finding (ii): per layer, INT4 sensitivity against selection frequency, with rank correlation."""
    n = len(importance)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, importance):
        load = np.array(layer["load"])
        sens = np.array(layer["quant_sensitivity"])
        ax.scatter(load / load.sum(), sens / max(sens.sum(), 1e-30), color=AFTER, s=22)
        for e, (x, y) in enumerate(zip(load / load.sum(), sens / max(sens.sum(), 1e-30))):
            ax.annotate(str(e), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_title(f"layer {layer['layer']}: Spearman rho = {layer['spearman_sensitivity_vs_frequency']:+.2f}",
                     fontsize=9)
        ax.set_xlabel("selection frequency (load share)")
        ax.set_ylabel("INT4 sensitivity (share)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Importance (error INT4 would add) vs how often an expert is picked; labels = expert id")
    _save(fig, path)


def lis_by_domain(path: Path, reports: dict[str, dict]) -> None:
    """Finding (iii): model LIS before/after on calibration data vs held-out data of two domains."""
    names = list(reports)
    before, after = [], []
    for name in names:
        points = reports[name]["batch"][str(max(int(b) for b in reports[name]["batch"]))]
        before.append(np.nanmean([p["before"] for p in points]))
        after.append(np.nanmean([p["after"] for p in points]))
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.bar(x - 0.2, before, 0.4, color=BEFORE, label="original")
    ax.bar(x + 0.2, after, 0.4, color=AFTER, label="R&Q (plan from calibration data)")
    for xi, b, a in zip(x, before, after):
        ax.text(xi - 0.2, b, f"{b:.2f}", ha="center", va="bottom", fontsize=8)
        ax.text(xi + 0.2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xticks(x, [n.replace("_", " ") for n in names])
    ax.set_ylabel("model LIS, cumulative (mean over layers)")
    ax.set_title("Does a plan made on one domain hold on another?")
    ax.legend()
    _save(fig, path)


def calibration_size(path: Path, sweep: list[dict]) -> None:
    """Finding (iii): plan quality against calibration-set size."""
    n = [row["sequences"] for row in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, style in (("heldout_code", "o-"), ("heldout_prose", "s-")):
        ax.plot(n, [row[f"{key}_after"] for row in sweep], style, color=AFTER, label=f"R&Q, {key.replace('_', ' ')}")
        ax.plot(n, [row[f"{key}_before"] for row in sweep], style.replace("-", "--"), color=BEFORE,
                label=f"original, {key.replace('_', ' ')}")
    ax2 = ax.twinx()
    ax2.plot(n, [100 * row["replica_overlap_with_largest"] for row in sweep], "^:", color="gray",
             label="replicas shared with largest plan")
    ax2.set_ylabel("replica allocation shared with the largest set (%)")
    ax2.set_ylim(0, 105)
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_xlabel("calibration sequences")
    ax.set_ylabel("model LIS on held-out data (cumulative)")
    ax.set_title("How much calibration data does a plan need?")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def write_plots(out_dir: Path, summary: dict, stats: CalibrationStats, plan: Plan) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in ("load_heatmap.png", "lis_vs_batch.png", "importance_vs_frequency.png",
                                         "lis_by_domain.png", "calibration_size.png")]
    load_heatmap(paths[0], stats, plan)
    lis_vs_batch(paths[1], summary["reports"]["heldout_code"])
    importance_vs_frequency(paths[2], summary["importance"])
    lis_by_domain(paths[3], summary["reports"])
    calibration_size(paths[4], summary["calibration_sweep"])
    return paths
