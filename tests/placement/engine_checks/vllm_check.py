"""Run vLLM's own argument and EPLB code on an `rq place` output (used by tests/placement/test_servers.py; needs
vLLM, CPU is enough with VLLM_TARGET_DEVICE=cpu).

    python vllm_check.py PLACEMENT_DIR MODEL_DIR [ARCH,...]

Parses the flags `placement.json` prints with vLLM's EngineArgs parser, checks that vLLM's EPLBConfig refuses
`initial_expert_map_path` (so the written map cannot be loaded), that EPLB starts from vLLM's own initial map,
and which model classes implement MixtureOfExperts (what EPLB needs). Prints one JSON object.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from flags import shell_argv  # noqa: E402


def parallel_config(args) -> dict:
    """The flags through vLLM's configuration with the platform set to CUDA, as vLLM's own tests set it: the full
    ``create_engine_config`` where it builds without a GPU, else the ``ParallelConfig`` it would build."""
    import vllm.config.parallel
    from vllm.config import ParallelConfig
    from vllm.platforms import PlatformEnum, current_platform

    class Cuda(type(current_platform)):  # CUDA as far as the config checks ask (vLLM's CUDA platform needs libcuda)
        _enum = PlatformEnum.CUDA

        def is_cuda_alike(self) -> bool:
            return True

    vllm.config.parallel.current_platform = Cuda()
    try:
        config = args.create_engine_config().parallel_config
        path = "create_engine_config"
    except Exception as err:  # noqa: BLE001 -- a GPU-only step; fall back to the ParallelConfig itself
        if "EPLB" in str(err) or "parallel" in str(err).lower():
            raise
        config = ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                                data_parallel_size=args.data_parallel_size,
                                data_parallel_size_local=args.data_parallel_size_local or args.data_parallel_size,
                                enable_expert_parallel=args.enable_expert_parallel, enable_eplb=args.enable_eplb,
                                eplb_config=args.eplb_config)
        path = f"ParallelConfig ({type(err).__name__} in create_engine_config: {str(err)[:120]})"
    return {"path": path, "tp": config.tensor_parallel_size, "dp": config.data_parallel_size,
            "dp_local": config.data_parallel_size_local, "ep_enabled": config.enable_expert_parallel,
            "eplb": config.enable_eplb, "redundant": config.eplb_config.num_redundant_experts}


def main(placement_dir: str, model_dir: str, archs: list[str]) -> dict:
    import importlib

    from vllm import __version__
    from vllm.config.parallel import EPLBConfig
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.interfaces import MixtureOfExperts
    from vllm.model_executor.models.registry import _VLLM_MODELS
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    manifest = json.loads((Path(placement_dir) / "placement.json").read_text())
    flags = manifest["engine_flags"]["vllm"].split(" (vLLM")[0]
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--model", model_dir] + shell_argv(flags)))
    out = {"version": __version__, "enable_eplb": args.enable_eplb, "enable_expert_parallel": args.enable_expert_parallel,
           "num_redundant_experts": args.eplb_config.num_redundant_experts, "parallel": parallel_config(args)}
    try:
        EPLBConfig(num_redundant_experts=1, initial_expert_map_path=str(Path(placement_dir) / "vllm_physical_to_logical.json"))
        out["initial_map_refused"] = False
    except Exception as err:  # noqa: BLE001 -- pydantic's ValidationError
        out["initial_map_refused"] = "initial_expert_map_path" in str(err)
    n, r = manifest["num_logical_experts"], manifest["num_redundant_experts"]
    out["initial_map"] = list(EplbState.build_initial_global_physical_to_logical_map(n, r))
    out["moe"] = {}
    for name in archs:
        module, cls = _VLLM_MODELS[name]
        out["moe"][name] = MixtureOfExperts in getattr(importlib.import_module(f"vllm.model_executor.models.{module}"),
                                                       cls).__mro__
    return out


if __name__ == "__main__":
    print("RQ-RESULT " + json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else [])))
