"""Run SGLang's own start-up code on an `rq place` output (used by tests/placement/test_servers.py; needs SGLang).

    python sglang_check.py PLACEMENT_DIR MODEL_DIR

Parses the flags `placement.json` prints with SGLang's argument parser, runs its argument resolution (where
`handle_eplb_and_dispatch` refuses bad dispatch flags), loads the placement file with SGLang's
`compute_initial_expert_location_metadata` (what the scheduler calls) and asks SGLang's model registry which
model classes define `get_model_config_for_expert_location`. Prints one JSON object; CPU only (`--device cpu`).
"""

import json
import shlex
import sys
from pathlib import Path


def main(placement_dir: str, model_dir: str) -> dict:
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import (compute_initial_expert_location_metadata,
                                                 set_global_expert_location_metadata)
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import prepare_server_args
    from sglang.version import __version__

    manifest = json.loads((Path(placement_dir) / "placement.json").read_text())
    flags = manifest["engine_flags"]["sglang"]
    file = str(Path(placement_dir) / "sglang_expert_location.json")
    takes = not flags.startswith("none:")
    if not takes:  # what a user who passes the file anyway gets
        flags = (f"--ep-size {manifest['devices']} --ep-num-redundant-experts {manifest['num_redundant_experts']} "
                 f"--init-expert-location {file}")
    argv = ["--model-path", model_dir, "--device", "cpu", "--tp", str(manifest["devices"])] + shlex.split(flags)
    out = {"version": __version__, "argv": argv, "takes_placement_flags": takes}
    args = prepare_server_args(argv)
    args.resolve_once()  # raises ValueError for flags SGLang refuses
    publish(args, role="scheduler")
    metadata = compute_initial_expert_location_metadata(ModelConfig.from_server_args(args), moe_ep_rank=0)
    out["metadata"] = metadata is not None
    if metadata is not None:
        rows = json.loads(Path(file).read_text())["physical_to_logical_map"]
        out["map_equal"] = metadata.physical_to_logical_map_cpu.tolist() == rows
        out["shape"] = list(metadata.physical_to_logical_map.shape)
    set_global_expert_location_metadata(metadata)
    try:
        info = ExpertLocationDispatchInfo.init_new(layer_id=manifest["decoder_layers"][0])
        out["dispatch"] = None if info is None else info.ep_dispatch_algorithm
    except AssertionError as err:
        out["dispatch_error"] = str(err)
    out["models"] = {}
    for name in sys.argv[3].split(",") if len(sys.argv) > 3 else []:
        try:
            cls, _ = ModelRegistry.resolve_model_cls([name])
            out["models"][name] = hasattr(cls, "get_model_config_for_expert_location")
        except Exception as err:  # noqa: BLE001 -- reported, the test decides
            out["models"][name] = f"unresolved: {type(err).__name__}"
    return out


if __name__ == "__main__":
    print("RQ-RESULT " + json.dumps(main(sys.argv[1], sys.argv[2])))
