"""What ``rq place`` shows a person: markdown tables of the device-balance simulation and per-layer plots. One
table helper (:func:`markdown_table`) serves ``report.md``, the console summary and the placement benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rq.core.lis import fmt
from rq.placement.place import device_lis
from rq.placement.dispatch import DISPATCH_MODES
from rq.placement.simulate import DISPATCH_METHODS, Simulation, lis_summary

if TYPE_CHECKING:
    from rq.plan.schema import Plan

METHODS = ("before", "eplb_same_slots", "eplb_same_memory", "rq")
METHOD_LABELS = {"before": "no replicas, contiguous (engine default)", "eplb_same_slots": "EPLB, same slots",
                 "eplb_same_memory": "EPLB, same memory", "rq": "R&Q placement"}


def markdown_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    """A GitHub markdown table; columns from ``numeric_from`` on are right-aligned (numbers)."""
    align = "|" + "|".join("---" if i < numeric_from else "---:" for i in range(len(header))) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", align] + ["| " + " | ".join(r) + " |" for r in rows])


def byte_unit(rows: list[dict]) -> tuple[str, float]:
    """The unit that prints the rows' bytes per GPU readably: GiB, MiB or KiB."""
    largest = max(r["expert_bytes_per_gpu"] for r in rows)
    return next((u, d) for u, d in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if largest >= d or u == "KiB")


def summary_table(rows: list[dict], load_sets: list[str], digits: int = 2, joined: bool = False) -> str:
    """One row per method (:data:`METHODS` order): slots, expert bytes per GPU and, per load set, device LIS
    mean and worst layer and the makespan ratio. ``joined`` prints LIS as ``mean / worst`` in one column."""
    unit, div = byte_unit(rows)
    header = ["method", "slots", "slots/GPU", f"expert {unit}/GPU max (mean)"]
    for key in load_sets:
        header += ([f"device LIS ({key}) mean / worst"] if joined else [f"device LIS mean ({key})", "worst layer"])
        header.append(f"makespan ({key})")
    body = []
    for r in rows:
        cells = [r["label"], str(r["slots"]), f"{r['slots_per_gpu']:.2f}",
                 f"{r['expert_bytes_per_gpu'] / div:.{digits}f} ({r['expert_bytes_per_gpu_mean'] / div:.{digits}f})"]
        for key in load_sets:
            s = r[key]
            mean, worst = fmt(s["device_lis_mean"], 3), fmt(s["device_lis_worst"], 3)
            cells += [f"{mean} / {worst}"] if joined else [mean, worst]
            cells.append(f"{s['makespan_ratio']:.3f}")
        body.append(cells)
    return markdown_table(header, body)


MODE_LABELS = {"rq": "rq runtime (spec §4)", "sglang-dynamic": "SGLang dynamic (no a2a backend)",
               "sglang-static": "SGLang static (--moe-a2a-backend deepep)", "vllm": "vLLM EPLB (row hash)",
               "trtllm": "TensorRT-LLM load balancer"}


def dispatch_table(modes: list[dict], load_sets: list[str], recommended: dict[str, str]) -> str:
    """Device LIS (mean / worst layer) of R&Q's and EPLB's placement (same slots) under each engine's dispatch;
    the mode rq recommends for each engine is marked."""
    chosen = set(recommended.values())
    header = ["dispatch"] + [f"{who} ({key})" for key in load_sets for who in ("R&Q", "EPLB same slots")]
    body = []
    for r in modes:
        cells = [MODE_LABELS[r["mode"]] + (" **(recommended)**" if r["mode"] in chosen else "")]
        for key in load_sets:
            for name in ("rq", "eplb_same_slots"):
                s = r[name][key]
                cells.append(f"{fmt(s['device_lis_mean'], 3)} / {fmt(s['device_lis_worst'], 3)}")
        body.append(cells)
    return markdown_table(header, body)


def layers_table(sim: Simulation, decoder: list[int], num_phy: int, added: list[int], removed: list[int],
                 plan_counts: list[int]) -> str:
    """Device LIS of every layer, method and load set, with the copies the placement added or removed."""
    load_sets = list(sim.loads["rq"])
    header = ["layer", "decoder", "plan copies", "placed (+added/-removed)"]
    header += [f"{name} ({key})" for key in load_sets for name in METHODS]
    lis = {name: {key: device_lis(v) for key, v in sim.loads[name].items()} for name in METHODS}
    body = [[str(li), str(d), str(plan_counts[li]), f"{num_phy} (+{added[li]}/-{removed[li]})"]
            + [fmt(float(lis[name][key][li]), 3) for key in load_sets for name in METHODS]
            for li, d in enumerate(decoder)]
    return markdown_table(header, body, numeric_from=0)


def plot_layers(sim: Simulation, plan: Plan, decoder: list[int], num_gpus: int, out_dir: Path) -> list[Path]:
    """One PNG per layer (device loads / mean, devices sorted by load, per method and load set) and a
    ``summary.png`` (device LIS per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    load_sets = list(sim.loads["rq"])
    colors = {"before": "tab:gray", "eplb_same_slots": "tab:blue", "eplb_same_memory": "tab:orange", "rq": "tab:green"}
    paths = []
    for li, d in enumerate(decoder):
        fig, axes = plt.subplots(1, len(load_sets), figsize=(5.5 * len(load_sets), 3.8), squeeze=False, sharey=True)
        for ax, key in zip(axes[0], load_sets):
            for name in METHODS:
                loads = sim.loads[name][key][li]
                if float(loads.sum()) == 0:
                    continue
                rel = (loads / loads.mean()).sort(descending=True).values
                lis_v = float(rel[0])
                ax.step(range(1, num_gpus + 1), rel.tolist(), where="mid", color=colors[name],
                        label=f"{METHOD_LABELS[name]} [{sim.slots[name]} slots]: LIS {lis_v:.2f}")
            _frame(ax, key, "device, sorted by load (most loaded first)")
            ax.legend(fontsize=7, loc="upper right")
        axes[0][0].set_ylabel("device load / mean device load")
        fig.suptitle(f"MoE layer {li} (decoder layer {d}, {plan.layers[li].module}): {num_gpus} devices", fontsize=10)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"layer_{li:03d}.png"))
    fig, axes = plt.subplots(1, len(load_sets), figsize=(6.5 * len(load_sets), 4.6), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], load_sets):
        for name in METHODS:
            ax.plot(range(len(decoder)), device_lis(sim.loads[name][key]).tolist(), marker=".", color=colors[name],
                    label=f"{METHOD_LABELS[name]} [{sim.slots[name]} slots]")
        _frame(ax, key, "MoE layer")
    axes[0][0].set_ylabel("device LIS (max / mean device load)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Device load imbalance per layer, {num_gpus} devices ({plan.model.architecture})", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return [_save(fig, out_dir / "summary.png")] + paths


def _frame(ax, key: str, xlabel: str) -> None:
    """The axes every plot shares: the perfect-balance line at 1, integer ticks, a grid, the load set as title."""
    from matplotlib.ticker import MaxNLocator

    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_title(f"{key} loads")
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# A mode whose worst layer's device LIS (R&Q, calibration loads) is at most this counts as balanced.
BALANCED_LIS = 1.05
ENGINE_LABELS = {"rq": "rq runtime", "sglang": "SGLang", "vllm": "vLLM", "trtllm": "TensorRT-LLM"}


def recommendation_lines(modes: list[dict], recommended: dict[str, str], flags: dict[str, str]) -> list[str]:
    """Per engine: the dispatch mode rq recommends with its device LIS (R&Q, calibration loads, mean / worst layer),
    whether that is balanced (worst layer <= :data:`BALANCED_LIS`) and where its flags are; for SGLang also the
    other mode (static dispatch reads the layout placed for its tables)."""
    by_mode = {r["mode"]: r["rq"]["calibration"] for r in modes}

    def lis(mode: str) -> str:
        s = by_mode[mode]
        verdict = "balanced" if s["device_lis_worst"] <= BALANCED_LIS else f"not balanced: worst > {BALANCED_LIS}"
        return f"device LIS {fmt(s['device_lis_mean'], 3)} / {fmt(s['device_lis_worst'], 3)} ({verdict})"

    where = {"rq": "rq's runtime (rq export)", "vllm": "engine_flags.vllm", "trtllm": "engine_flags.trtllm"}
    out = []
    for engine, mode in recommended.items():
        if engine == "sglang":
            if flags.get("sglang", "").startswith("none:"):
                out.append(f"SGLang: {flags['sglang'].removeprefix('none: ')}")
                continue
            other = "sglang-static" if mode == "sglang-dynamic" else "sglang-dynamic"
            out.append(f"SGLang: {MODE_LABELS[mode]}, {lis(mode)}: engine_flags.sglang; {MODE_LABELS[other]}, "
                       f"{lis(other)}: engine_flags.sglang-alternative")
        else:
            out.append(f"{ENGINE_LABELS[engine]}: {MODE_LABELS[mode]}, {lis(mode)}: {where[engine]}")
    return out


def dispatch_rows(sim: Simulation) -> list[dict]:
    """One row per dispatch mode: device LIS of R&Q's and EPLB's placement (same slots) per load set."""
    return [{"mode": mode, **{name: {key: lis_summary(v) for key, v in sim.dispatch[mode][name].items()}
                              for name in DISPATCH_METHODS}} for mode in DISPATCH_MODES]


def summary_rows(sim: Simulation, num_gpus: int) -> list[dict]:
    rows = []
    for name in METHODS:
        mean = sim.bytes_per_gpu_mean if name == "rq" else sim.bytes_per_gpu[name]
        row = {"method": name, "label": METHOD_LABELS[name], "slots": sim.slots[name],
               "slots_per_gpu": sim.slots[name] / num_gpus, "expert_bytes_per_gpu": sim.bytes_per_gpu[name],
               "expert_bytes_per_gpu_mean": mean}
        for key, loads in sim.loads[name].items():
            row[key] = lis_summary(loads)
        rows.append(row)
    return rows
