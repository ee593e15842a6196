"""Run SGLang's own start-up code on an `rq place` output (used by tests/placement/test_servers.py; needs SGLang).

    python sglang_check.py PLACEMENT_DIR MODEL_DIR [ARCH,...]

For every SGLang flag set `placement.json` prints (the recommended dispatch mode and the alternative): parses it
with SGLang's argument parser, runs its argument resolution (`resolve_once`, where `handle_eplb_and_dispatch`
refuses bad dispatch flags), derives the parallel widths the model runner builds its groups with
(`parallel_widths_of`: `moe_tp_size = tp // ep // moe_dp`) and loads the placement file with SGLang's
`compute_initial_expert_location_metadata` (what the scheduler calls) for every EP rank: the static dispatch
tables are SGLang's own. Also asks SGLang's model registry which model classes define
`get_model_config_for_expert_location`. Prints one JSON object; CPU only (`--device cpu`).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from flags import shell_argv  # noqa: E402


_GLOBAL_SET: list = []


def run_flags(flags: str, model_dir: str, layer: int) -> dict:
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import (compute_initial_expert_location_metadata,
                                                 set_global_expert_location_metadata)
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo
    from sglang.srt.runtime_context import get_exec, parallel_widths_of, publish
    from sglang.srt.server_args import prepare_server_args

    argv = ["--model-path", model_dir, "--device", "cpu"] + shell_argv(flags)
    args = prepare_server_args(argv)
    args.resolve_once()  # raises ValueError for flags SGLang refuses
    publish(args, role="scheduler")
    widths = parallel_widths_of(args)
    out = {"argv": argv, "tp": args.tp_size, "ep": args.ep_size, "nnodes": args.nnodes,
           "moe_tp_size": widths["moe_tp_size"], "moe_ep_size": widths["moe_ep_size"]}
    config = ModelConfig.from_server_args(args)
    tables = []
    for rank in range(args.ep_size):
        metadata = compute_initial_expert_location_metadata(config, moe_ep_rank=rank)
        if metadata is None:
            out["metadata"] = False
            return out
        if rank == 0:
            out["metadata"] = True
            out["map"] = metadata.physical_to_logical_map_cpu.tolist()
            out["dispatch"] = get_exec().moe.ep_dispatch_algorithm
            if not _GLOBAL_SET:  # SGLang sets its global metadata once per process
                set_global_expert_location_metadata(metadata)
                _GLOBAL_SET.append(True)
                info = ExpertLocationDispatchInfo.init_new(layer_id=layer)
                out["dispatch_info"] = None if info is None else info.ep_dispatch_algorithm
        table = metadata.logical_to_rank_dispatch_physical_map
        if table is not None:
            tables.append(table.tolist())
    out["static_tables"] = tables or None
    return out


def main(placement_dir: str, model_dir: str, archs: list[str]) -> dict:
    from sglang.srt.models.registry import ModelRegistry
    from sglang.version import __version__

    manifest = json.loads((Path(placement_dir) / "placement.json").read_text())
    file = str(Path(placement_dir) / "sglang_expert_location.json")
    flags = manifest["engine_flags"]
    out = {"version": __version__, "takes_placement_flags": not flags["sglang"].startswith("none:"), "runs": {}}
    layer = manifest["decoder_layers"][0]
    if out["takes_placement_flags"]:
        for key in ("sglang", "sglang-alternative"):
            out["runs"][key] = run_flags(flags[key], model_dir, layer)
            argv = shell_argv(flags[key])  # static dispatch reads its own layout (sglang_expert_location_static.json)
            location = argv[argv.index("--init-expert-location") + 1]
            out["runs"][key]["file_rows"] = json.loads(Path(location).read_text())["physical_to_logical_map"]
        out["file_rows"] = json.loads(Path(file).read_text())["physical_to_logical_map"]
    else:  # what a user who passes the file anyway gets
        devices = manifest["devices"]
        try:
            out["runs"]["forced"] = run_flags(f"--tp {devices} --ep-size {devices} --ep-num-redundant-experts "
                                              f"{manifest['num_redundant_experts']} --init-expert-location {file}",
                                              model_dir, layer)
        except AssertionError as err:
            out["dispatch_error"] = str(err)
    out["models"] = {}
    for name in archs:
        try:
            cls, _ = ModelRegistry.resolve_model_cls([name])
            out["models"][name] = hasattr(cls, "get_model_config_for_expert_location")
        except Exception as err:  # noqa: BLE001 -- reported, the test decides
            out["models"][name] = f"unresolved: {type(err).__name__}"
    return out


if __name__ == "__main__":
    print("RQ-RESULT " + json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else [])))
