"""What changes between two placements of one model (``rq place --previous``): per layer and device, the copies
to load and the copies to drop, so that an SGLang / TensorRT-LLM operator sees what a new plan would move before
rolling it out. Reading is I/O; :func:`placement_diff` is a pure function over the ``phy2log`` tables.

A device holds the slots ``[g * P / G, (g + 1) * P / G)`` of a layer (the engines' contiguous layout,
docs/multi-gpu.md); the copies a device holds are a multiset of logical experts, and the diff of two placements is,
per device, the multiset difference both ways. Moving a copy between devices shows up as removed on one and added
on the other; a copy that only changes slot on its device is not a move.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rq.errors import RQError
from rq.placement import FILENAMES


def read_placement(folder: str | Path) -> dict:
    """``placement.json`` of an earlier ``rq place`` output with its ``phy2log [L, P]`` (int64 tensor): from the
    manifest, or, for outputs written before it carried the table, from the EPLB or vLLM file beside it."""
    folder = Path(folder)
    manifest_path = folder / "placement.json"
    fix = "pass the --out folder of an earlier `rq place`"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RQError(f"--previous {folder}: no readable placement.json ({type(err).__name__}); {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "rq-placement":
        raise RQError(f"--previous {folder}: placement.json is not an rq placement; {fix}")
    table = manifest.get("phy2log")
    if table is None:
        table = _table_from_files(folder, manifest.get("files") or {})
    try:
        phy2log = torch.tensor(table, dtype=torch.int64)
    except (TypeError, ValueError):
        raise RQError(f"--previous {folder}: its phy2log is not a table of expert ids; {fix}") from None
    if phy2log.dim() != 2:
        raise RQError(f"--previous {folder}: its phy2log must be [layers, slots], got {list(phy2log.shape)}; {fix}")
    return {**manifest, "phy2log": phy2log}


def _table_from_files(folder: Path, files: dict) -> list:
    if "eplb" in files and (folder / files["eplb"]).is_file():
        try:
            return load_file(str(folder / files["eplb"]))["phy2log"].tolist()
        except (SafetensorError, OSError, KeyError):
            pass
    if "vllm" in files and (folder / files["vllm"]).is_file():
        try:
            return json.loads((folder / files["vllm"]).read_text())
        except (OSError, json.JSONDecodeError):
            pass
    raise RQError(f"--previous {folder}: neither placement.json nor a {FILENAMES['eplb']} / {FILENAMES['vllm']} "
                  f"beside it holds the slot table; place the old plan again with this rq version")


def device_copies(row: torch.Tensor, devices: int) -> list[Counter]:
    """The multiset of logical experts on each device for one layer's ``phy2log`` row ``[P]``."""
    per = row.numel() // devices
    return [Counter(row[g * per:(g + 1) * per].tolist()) for g in range(devices)]


def placement_diff(old: torch.Tensor, new: torch.Tensor, devices: int) -> list[list[dict]]:
    """Per layer, per device: ``{"added": {expert: copies}, "removed": {expert: copies}}`` from ``old`` to ``new``
    (``[L, P]`` tables; ``P`` may differ between them, both divisible by ``devices``)."""
    if old.shape[0] != new.shape[0]:
        raise RQError(f"the previous placement has {old.shape[0]} MoE layers, this one {new.shape[0]}: not the same "
                      f"model")
    for name, table in (("previous", old), ("new", new)):
        if table.shape[1] % devices:
            raise RQError(f"the {name} placement's {table.shape[1]} slots do not split over {devices} devices")
    layers = []
    for before_row, after_row in zip(old, new):
        rows = []
        for before, after in zip(device_copies(before_row, devices), device_copies(after_row, devices)):
            rows.append({"added": dict(sorted((after - before).items())),
                         "removed": dict(sorted((before - after).items()))})
        layers.append(rows)
    return layers


def diff_document(diff: list[list[dict]], decoder: list[int], previous: str) -> dict:
    """The JSON of a diff: per layer and device, and the copies to load per device in all."""
    per_device = [sum(sum(layer[g]["added"].values()) for layer in diff) for g in range(len(diff[0]) if diff else 0)]
    return {"previous": previous, "copies_loaded_per_device": per_device,
            "copies_dropped_per_device": [sum(sum(layer[g]["removed"].values()) for layer in diff)
                                          for g in range(len(per_device))],
            "layers": [{"decoder_layer": d, "devices": [{"device": g, "added": {str(k): v for k, v in x["added"].items()},
                                                         "removed": {str(k): v for k, v in x["removed"].items()}}
                                                        for g, x in enumerate(layer)]}
                       for d, layer in zip(decoder, diff)]}


def diff_lines(document: dict) -> list[str]:
    """Markdown lines for ``report.md`` and the console: per device the copies to load / drop, then per layer the
    devices that change (``+e`` load a copy of expert ``e``, ``-e`` drop one)."""
    loaded, dropped = document["copies_loaded_per_device"], document["copies_dropped_per_device"]
    lines = [f"Against {document['previous']}: {sum(loaded)} copies to load, {sum(dropped)} to drop.", "",
             "| device | copies to load | copies to drop |", "|---:|---:|---:|"]
    lines += [f"| {g} | {a} | {r} |" for g, (a, r) in enumerate(zip(loaded, dropped))]
    lines += [""]
    for layer in document["layers"]:
        changes = []
        for dev in layer["devices"]:
            moves = [f"+{e}" + (f"x{c}" if c > 1 else "") for e, c in dev["added"].items()]
            moves += [f"-{e}" + (f"x{c}" if c > 1 else "") for e, c in dev["removed"].items()]
            if moves:
                changes.append(f"device {dev['device']}: {' '.join(moves)}")
        lines.append(f"- layer {layer['decoder_layer']}: " + ("; ".join(changes) if changes else "unchanged"))
    return lines
