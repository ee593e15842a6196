"""The figures of the "R&Q vs baselines" section, drawn from a run's results dict (``rq_vs_baselines.json``).

Like :mod:`benchmarks.report` this measures nothing: ``python -m benchmarks.run_all --from-json`` redraws every
PNG from a stored run. ``lis`` is ``results["lis"]`` (:func:`benchmarks.bench_lis.run`), ``planner`` is
``results["planner"]`` (:func:`benchmarks.bench_planner.run`).
"""

from __future__ import annotations

import math
from pathlib import Path

from rq.calibrate.stats import IMPORTANCE_METRICS

DOMAINS = ("heldout_code", "heldout_prose")

GOAL_LIS, PAPER_LIS, GOAL_PPL = 2.0, 1.4, 0.3
COLORS = {"rq": "#4c72b0", "freq": "#dd8452", "eplb": "#55a868", "random": "#8172b3", "none": "#c44e52",
          "gate_mass": "#937860", "contribution": "#da8bc3"}
DOMAIN_TITLE = {"heldout_code": "held-out code (calibration domain)", "heldout_prose": "held-out prose (other domain)"}
DOMAIN_SHORT = {"heldout_code": "code (calib. domain)", "heldout_prose": "prose (other domain)"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, tight: bool = True) -> None:
    """Write ``fig`` as a PNG at 110 dpi and free it (figures are drawn in a loop; pyplot keeps open ones)."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _budget_series(res: dict, domain: str, prefix: str, key: str, table: str = "table_cumulative"):
    xs, ys = [], []
    for b in res["settings"]["budgets"]:
        name = f"{prefix}@{b:g}"
        if name in res["lis"][domain]:
            xs.append(res["plans"][name]["memory"] if prefix.startswith("rq") else b)
            ys.append(res["lis"][domain][name][table][key])
    return xs, ys


def plot_budget(res: dict, path) -> None:
    """LIS reduction and perplexity change against memory, every method, both domains."""
    plt = _plt()
    s = res["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(16, 8.5), sharex=True)
    for col, domain in enumerate(DOMAINS):
        ax = axes[0, col]
        for prefix, label, color in (("rq[quant_sensitivity]", "R&Q", COLORS["rq"]),
                                     ("eplb", "replicate-only (EPLB), equal memory", COLORS["eplb"])):
            for table, key, style, what in (("table_cumulative", "reduction", "-o", "cumulative"),
                                            ("table_inst", "inst_reduction", "--s", f"per batch of {s['table_batch']}")):
                xs, ys = _budget_series(res, domain, prefix, key, table)
                ax.plot(xs, ys, style, color=color, label=f"{label}: {what}")
        rand = [res["lis"][domain][n]["table_cumulative"]["reduction"] for n in res["lis"][domain] if n.startswith("random")]
        mem = [res["plans"][n]["memory"] for n in res["lis"][domain] if n.startswith("random")]
        if rand:
            ax.plot(mem, rand, "x", color=COLORS["random"], ms=9, mew=2, label="random plans (same counts), cumulative")
        same = res["lis"][domain].get("eplb_same_copies")
        if same:
            ax.annotate(f"EPLB with R&Q's copy count needs {res['plans']['eplb_same_copies']['memory']:.2f}x memory\n"
                        f"for {same['table_cumulative']['reduction']:.2f}x cumulative",
                        xy=(0.98, 0.03), xycoords="axes fraction", va="bottom", ha="right", fontsize=8,
                        bbox=dict(boxstyle="round", fc="white", ec="0.7"))
        ax.axhline(GOAL_LIS, color="k", ls=":", lw=1, label="goal 2x")
        ax.axhline(PAPER_LIS, color="0.5", ls="-.", lw=1, label="paper: up to 1.4x")
        ax.axhline(1.0, color="0.8", lw=0.8)
        ax.set_title(f"LIS reduction, {DOMAIN_SHORT[domain]}")
        ax.set_ylabel("LIS before / LIS after (model LIS)")
        if col == 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        ax = axes[1, col]
        for metric, color in (("quant_sensitivity", COLORS["rq"]), ("frequency", COLORS["freq"])):
            xs, ys, lo, hi = [], [], [], []
            for b in s["budgets"]:
                name = f"rq[{metric}]@{b:g}"
                if name in res["accuracy"][domain]:
                    a = res["accuracy"][domain][name]
                    xs.append(res["plans"][name]["memory"])
                    ys.append(a["ppl_change_pct"])
                    lo.append(a["ppl_change_pct"] - a["ppl_change_ci95"][0])
                    hi.append(a["ppl_change_ci95"][1] - a["ppl_change_pct"])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="-o", color=color, capsize=3,
                        label=f"R&Q, INT4 chosen by {metric}")
        rand = [(res["plans"][n]["memory"], res["accuracy"][domain][n]["ppl_change_pct"])
                for n in res["accuracy"][domain] if n.startswith("random")]
        if rand:
            ax.plot(*zip(*rand), "x", color=COLORS["random"], ms=9, mew=2, label="random plans")
        ax.plot([min(s["budgets"]), max(s["budgets"])], [0, 0], color=COLORS["eplb"], lw=2,
                label="replicate-only / original (0 by construction)")
        ax.axhspan(-GOAL_PPL, GOAL_PPL, color="0.9", zorder=0, label="goal: |change| <= 0.3 %")
        ax.set_title(f"perplexity change (95% bootstrap CI), {DOMAIN_SHORT[domain]}")
        ax.set_xlabel("expert memory / reference (bf16 accounting)" if s["bytes_per_param"] == 2 else
                      "expert memory / reference")
        ax.set_ylabel("perplexity change (%)")
        if col == 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"R&Q vs baselines against memory budget ({res['model']['architecture']}, "
                 f"{res['model']['layers']} layers x {res['model']['experts']} experts, top-{res['model']['top_k']}; "
                 f"{res['data']['accuracy_sequences']} x {s['seq_len']} tokens per domain)")
    _save(fig, path)


def plot_batch(res: dict, path) -> None:
    """Model LIS against batch size (cumulative and per batch) and in streaming decode."""
    plt = _plt()
    head = res["headline"]
    eplb = f"eplb@{max(res['settings']['budgets']):g}"
    fig, axes = plt.subplots(1, 3, figsize=(17, 6.4), gridspec_kw={"width_ratios": [1, 1, 0.9]})
    for ax, domain in zip(axes, DOMAINS):
        entries = res["lis"][domain]
        sizes = sorted(int(k) for k in entries[head] if k.isdigit())
        get = lambda name, key: [entries[name][str(b)][key] for b in sizes]  # noqa: E731
        ax.plot(sizes, get(head, "inst_before"), "-o", color=COLORS["none"], label="no balancing: per batch (mean)")
        ax.plot(sizes, get(head, "inst_p95_before"), ":", color=COLORS["none"], label="no balancing: per batch (p95)")
        ax.plot(sizes, get(head, "inst_after"), "-o", color=COLORS["rq"],
                label=f"R&Q @ {res['plans'][head]['memory']:.2f}x memory: per batch (mean)")
        ax.plot(sizes, get(head, "inst_p95_after"), ":", color=COLORS["rq"], label="R&Q: per batch (p95)")
        ax.plot(sizes, get(eplb, "inst_after"), "-^", color=COLORS["eplb"],
                label=f"replicate-only @ {res['plans'][eplb]['memory']:.2f}x memory: per batch (mean)")
        ax.axhline(entries[head]["cumulative"]["before"], color=COLORS["none"], ls="--", lw=1,
                   label="no balancing: cumulative")
        ax.axhline(entries[head]["cumulative"]["after"], color=COLORS["rq"], ls="--", lw=1, label="R&Q: cumulative")
        floor = entries[head].get("floor", {})
        fs = [b for b in sizes if str(b) in floor]
        if fs:
            ax.plot(fs, [floor[str(b)] for b in fs], ":", color="0.3", lw=1.5,
                    label="uniform-random assignment to R&Q's copies (noise level)")
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"batch size (sequences of {res['settings']['seq_len']} tokens)")
        ax.set_ylabel("model LIS (mean over MoE layers)")
        ax.set_title(DOMAIN_TITLE[domain])
        ax.set_ylim(bottom=0.9)
    ax = axes[2]
    stream = res["streaming"]
    if stream:
        bs = sorted(int(b) for b in stream)
        ax.plot(bs, [stream[str(b)]["none"]["inst_before"] for b in bs], "-o", color=COLORS["none"],
                label="no balancing")
        ax.plot(bs, [stream[str(b)].get(head, {}).get("inst_after", math.nan) for b in bs], "-o", color=COLORS["rq"],
                label="R&Q (rotating offsets)")
        ax.plot(bs, [stream[str(b)][eplb]["inst_after"] for b in bs], "-^", color=COLORS["eplb"],
                label=f"replicate-only @ {res['plans'][eplb]['memory']:.2f}x")
        ax.plot(bs, [stream[str(b)].get("rq_decode_fit", {}).get("inst_after", math.nan) for b in bs], "--o",
                color=COLORS["rq"], mfc="white", label="copies fitted to these decode steps (in-sample bound)")
        ax.plot(bs, [stream[str(b)].get("floor", {}).get("per_step", math.nan) for b in bs], ":", color="0.3",
                lw=1.5, label="uniform-random assignment to R&Q's copies (noise level)")
        for b in bs:
            if math.isnan(stream[str(b)].get(head, {}).get("inst_after", math.nan)):
                ax.annotate("R&Q per step n/a: T*K < copies", xy=(b, 1.0), xytext=(b * 1.15, 1.3), ha="left",
                            fontsize=8, color=COLORS["rq"], arrowprops=dict(arrowstyle="->", color=COLORS["rq"]))
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.set_ylim(bottom=0.9)
        ax.set_xlabel("concurrent sequences B (tokens per decode step)")
        ax.set_ylabel("model LIS per decode step (mean)")
        ax.set_title(f"streaming decode, code prompts, {res['settings']['stream_steps']} steps")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), title="streaming panel (right)",
                  title_fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.33, 0.01), ncol=2, fontsize=8,
               title="batch panels (left, middle)", title_fontsize=8)
    fig.suptitle("LIS vs batch size: R&Q at the headline budget (memory in bf16 accounting)")
    fig.subplots_adjust(left=0.045, right=0.985, top=0.9, bottom=0.36, wspace=0.22)
    _save(fig, path, tight=False)


def plot_importance(res: dict, path) -> None:
    """Finding (ii): accuracy of the INT4 choice by each importance metric vs random, at equal LIS and memory."""
    plt = _plt()
    b = res["settings"]["headline_budget"]
    names = [(f"rq[{m}]@{b:g}", m) for m in IMPORTANCE_METRICS] + \
        [(n, n.split("@")[0]) for n in res["accuracy"]["heldout_code"] if n.startswith("random")]
    names = [(n, label) for n, label in names if n in res["accuracy"]["heldout_code"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, ylabel in ((axes[0], "ppl_change_pct", "perplexity change (%)"),
                            (axes[1], "kl_mean", "mean KL(original || R&Q)")):
        width = 0.38
        for j, domain in enumerate(DOMAINS):
            vals = [res["accuracy"][domain][n][key] for n, _ in names]
            xs = [i + (j - 0.5) * width for i in range(len(names))]
            if key == "ppl_change_pct":
                ci = [res["accuracy"][domain][n]["ppl_change_ci95"] for n, _ in names]
                err = [[v - c[0] for v, c in zip(vals, ci)], [c[1] - v for v, c in zip(vals, ci)]]
                ax.bar(xs, vals, width, yerr=err, capsize=3, label=DOMAIN_TITLE[domain],
                       color=["#4c72b0", "#dd8452"][j])
            else:
                ax.bar(xs, vals, width, label=DOMAIN_TITLE[domain], color=["#4c72b0", "#dd8452"][j])
        ax.set_xticks(range(len(names)), [label for _, label in names], rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="k", lw=0.8)
        if key == "ppl_change_pct":
            ax.axhspan(-GOAL_PPL, GOAL_PPL, color="0.9", zorder=0, label="goal |change| <= 0.3 %")
        ax.legend(fontsize=8)
    head = res["plans"][res["headline"]]
    fig.suptitle(f"Which experts go INT4 (budget {b:g}x: {head['int4']} INT4 primaries, {head['replicas']} INT4 replicas "
                 f"in every variant, so memory and LIS are equal; only accuracy differs)")
    _save(fig, path)


def plot_calibration(res: dict, path) -> None:
    """Finding (iii): stability vs calibration-set size and LIS transfer to the other domain."""
    plt = _plt()
    rows = res["calibration_sweep"]
    ns = [r["sequences"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for key, label in (("spearman_load", "load"), ("spearman_gate_mass", "gate mass"),
                       ("spearman_contribution", "contribution"), ("spearman_quant_sensitivity", "INT4 sensitivity")):
        ax.plot(ns, [r[key] for r in rows], "-o", label=f"Spearman of {label} vs largest set")
    ax.plot(ns, [r["replica_overlap"] for r in rows], "-s", color="k", label="replica allocation overlap")
    ax.plot(ns, [r["int4_overlap"] for r in rows], "--s", color="0.4", label="INT4 set overlap")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"calibration sequences (x {res['settings']['seq_len']} tokens)")
    ax.set_ylabel("agreement with the largest set")
    ax.set_title(f"stability vs the largest set ({max(ns)} sequences)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for domain, color in zip(DOMAINS, ("#4c72b0", "#dd8452")):
        ax.plot(ns, [r[f"{domain}_reduction"] for r in rows], "-o", color=color, label=f"{DOMAIN_TITLE[domain]}: cumulative")
        ax.plot(ns, [r[f"{domain}_inst_reduction"] for r in rows], "--s", color=color,
                label=f"{DOMAIN_TITLE[domain]}: per batch of {res['settings']['table_batch']}")
    oracle = res["prose_oracle"]
    ax.axhline(oracle["prose_calibrated"]["reduction"], color="#dd8452", ls=":",
               label="prose-calibrated plan on prose (in-domain bound), cumulative")
    ax.axhline(GOAL_LIS, color="k", ls=":", lw=1)
    ax.axhline(1.0, color="0.8", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"calibration sequences (x {res['settings']['seq_len']} tokens, code)")
    ax.set_ylabel("LIS reduction")
    ax.set_title(f"LIS reduction of the plan on held-out data (budget {res['settings']['headline_budget']:g}x)")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_planner(res: dict, path) -> None:
    """Plan time vs number of experts, and held-out LIS reduction vs budget at the synthetic shapes."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    sc = res["scaling"]
    ns = [r["experts"] for r in sc]
    ax.plot(ns, [1e3 * r["seconds"] for r in sc], "-o",
            label=f"plan_layer, one layer, budget 1.0x (fit N>=64: ~N^{res.get('exponent', math.nan):.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("experts per layer N (top-2 below 64, top-8 from 64)")
    ax.set_ylabel("milliseconds per layer")
    ds = [c for c in res["cases"] if c["shape"] == "deepseek_v3" and c["budget"] == 1.0]
    if ds:
        ax.set_title(f"planner time (DeepSeek-V3-like, {ds[0]['layers']} x 256: {ds[0]['seconds']:.2f} s in all)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for shape, color in (("deepseek_v3", "#4c72b0"), ("mixtral", "#dd8452")):
        rows = [c for c in res["cases"] if c["shape"] == shape]
        bs = [c["budget"] for c in rows]
        label = "DeepSeek-V3-like (256 exp, top-8)" if shape == "deepseek_v3" else "Mixtral-like (8 exp, top-2)"
        ax.plot(bs, [c["heldout_reduction"] for c in rows], "-o", color=color, label=f"{label}: R&Q")
        ax.plot(bs, [c["eplb_equal_memory_reduction"] for c in rows], "--^", color=color,
                label=f"{label}: replicate-only, equal memory")
    ax.axhline(2.0, color="k", ls=":", lw=1)
    ax.axhline(1.4, color="0.5", ls=":", lw=1)
    ax.axhline(1.0, color="0.8", lw=0.8)
    ax.set_xlabel("memory budget (x reference, bf16)")
    ax.set_ylabel("LIS reduction on held-out synthetic loads")
    ax.set_title(f"held-out synthetic loads (drift {res['drift']:g}); dotted: goal 2x, paper 1.4x", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


LIS_FIGURES = {"lis_vs_budget.png": plot_budget, "lis_vs_batch.png": plot_batch,
               "importance_accuracy.png": plot_importance, "calibration_size.png": plot_calibration}
PLANNER_FIGURE = "planner_scale.png"


def plot_all(results: dict, out_dir: str | Path) -> list[Path]:
    """Every figure the results hold (the LIS part and the planner part each may be absent) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if results.get("lis"):
        for name, draw in LIS_FIGURES.items():
            draw(results["lis"], out_dir / name)
            written.append(out_dir / name)
    if results.get("planner"):
        plot_planner(results["planner"], out_dir / PLANNER_FIGURE)
        written.append(out_dir / PLANNER_FIGURE)
    return written
