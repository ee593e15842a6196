"""What each serving engine does with rq's placement files, as read and run from the engines' own code
(docs/multi-gpu.md, "What was verified against the engines"): the flags that load a placement, and a warning
for every engine and architecture that takes none. Data and strings only; ``rq place`` prints them and
``placement.json`` records them.
"""

from __future__ import annotations

from pathlib import Path

from rq.placement import FILENAMES, SGLANG_STATIC_FILENAME

SGLANG_VERSION = "0.5.23"
VLLM_VERSION = "0.33.0"

# Hugging Face model_type -> (SGLang model class, whether it defines get_model_config_for_expert_location).
# Without that classmethod SGLang's ModelConfigForExpertLocation is None: init_by_mapping drops the file and the
# first MoE layer fails with "Expert dispatch requires placement metadata" (run with SGLang 0.5.23's own code).
SGLANG_MODELS: dict[str, tuple[str | None, bool]] = {
    "deepseek_v2": ("DeepseekV2ForCausalLM", True),
    "deepseek_v3": ("DeepseekV3ForCausalLM", True),
    "qwen2_moe": ("Qwen2MoeForCausalLM", True),
    "qwen3_moe": ("Qwen3MoeForCausalLM", True),
    "mixtral": ("MixtralForCausalLM", False),
    "olmoe": ("OlmoeForCausalLM", False),
    "deepseek": ("DeepseekForCausalLM", False),
    # No SGLang model at all (the Hugging Face architecture does not resolve in SGLang's registry).
    "llama_moe": (None, False),
    "switch_transformers": (None, False),
}

# model_type -> (vLLM model class, whether it implements MixtureOfExperts, the interface vLLM's EPLB needs).
VLLM_MODELS: dict[str, tuple[str | None, bool]] = {
    "deepseek": ("DeepseekForCausalLM", True),
    "deepseek_v2": ("DeepseekV2ForCausalLM", True),
    "deepseek_v3": ("DeepseekV3ForCausalLM", True),
    "mixtral": ("MixtralForCausalLM", True),
    "qwen3_moe": ("Qwen3MoeForCausalLM", True),
    "qwen2_moe": ("Qwen2MoeForCausalLM", False),
    "olmoe": ("OlmoeForCausalLM", False),
    "llama_moe": (None, False),
    "switch_transformers": (None, False),
}

# The Hugging Face architecture of the models neither engine has, as the engine checks resolve them.
HF_ARCHITECTURES = {"llama_moe": "LlamaMoEForCausalLM",
                    "switch_transformers": "SwitchTransformersForConditionalGeneration"}


def sglang_takes_placement(architecture: str) -> bool | None:
    """True / False as verified for SGLang's model of ``architecture``; None where rq has not checked it."""
    entry = SGLANG_MODELS.get(architecture)
    return None if entry is None else entry[1]


def _supported(table: dict[str, tuple[str | None, bool]]) -> str:
    return ", ".join(sorted(k for k, (_, ok) in table.items() if ok))


def has_model(table: dict[str, tuple[str | None, bool]], architecture: str) -> bool:
    """False where the engine was checked to have no model class for ``architecture`` at all."""
    entry = table.get(architecture)
    return entry is None or entry[0] is not None


# Environment variables a multi-node flag set leaves to the person starting each node.
NODE_VARIABLES = ("NODE_RANK", "MASTER_ADDR")


def sglang_flags(num_gpus: int, num_nodes: int, redundant: int, location: Path, dispatch: str) -> str:
    """SGLang's expert parallelism needs ``--tp G`` with ``--ep-size G``: the model runner derives
    ``moe_tp_size = tp_size // ep_size`` (0 with TP left at 1). ``dispatch`` is the mode SGLang resolves:
    ``dynamic`` without an all-to-all backend, ``static`` with ``--moe-a2a-backend deepep``."""
    flags = (f"--tp {num_gpus} --ep-size {num_gpus} --ep-num-redundant-experts {redundant} "
             f"--init-expert-location {location}")
    if dispatch == "static":
        flags += " --moe-a2a-backend deepep"
    if num_nodes > 1:
        flags += f" --nnodes {num_nodes} --node-rank $NODE_RANK --dist-init-addr $MASTER_ADDR:5000"
    return flags


def vllm_flags(num_gpus: int, num_nodes: int, redundant: int) -> str:
    """vLLM's EPLB needs tensor, context or data parallelism (ParallelConfig refuses TP=DP=1): one data-parallel
    rank per GPU, experts sharded over all of them (EP size = DP x TP)."""
    flags = (f"--tensor-parallel-size 1 --data-parallel-size {num_gpus} --enable-expert-parallel --enable-eplb "
             f"--eplb-config '{{\"num_redundant_experts\": {redundant}}}'")
    if num_nodes > 1:
        local = num_gpus // num_nodes
        flags += (f" --data-parallel-size-local {local} --data-parallel-address $MASTER_ADDR "
                  f"--data-parallel-rpc-port 13345 --data-parallel-start-rank $((NODE_RANK * {local}))")
    return flags


def engine_flags(num_gpus: int, num_phy: int, n: int, out_dir: Path, architecture: str, num_nodes: int = 1,
                 sglang_dispatch: str = "dynamic") -> dict[str, str]:
    """The command-line pieces that start each engine on ``num_gpus`` GPUs over ``num_nodes`` nodes with this
    placement (docs/multi-gpu.md has the full story); ``none: ...`` where the engine takes no placement for the
    architecture. Multi-node sets read ``$NODE_RANK`` (0 on the first node) and ``$MASTER_ADDR`` (the first node's
    address) from the shell. SGLang's dispatch is chosen by its flags, never by ``--ep-dispatch-algorithm``
    (``static`` without ``--moe-a2a-backend`` is refused at start-up); ``sglang_dispatch`` picks the mode."""
    redundant = num_phy - n
    if not has_model(SGLANG_MODELS, architecture):
        sglang = f"none: SGLang {SGLANG_VERSION} has no model for {architecture}"
    elif sglang_takes_placement(architecture) is False:
        sglang = f"none: SGLang {SGLANG_VERSION} takes no placement for {architecture} (serve it without these flags)"
    else:
        # static dispatch reads the layout placed for its static tables (rq.placement.static)
        name = SGLANG_STATIC_FILENAME if sglang_dispatch == "static" else FILENAMES["sglang"]
        sglang = sglang_flags(num_gpus, num_nodes, redundant, out_dir / name, sglang_dispatch)
    if not has_model(VLLM_MODELS, architecture):
        vllm = f"none: vLLM {VLLM_VERSION} has no model for {architecture}"
    else:
        vllm = (f"{vllm_flags(num_gpus, num_nodes, redundant)} (vLLM {VLLM_VERSION} cannot load "
                f"{FILENAMES['vllm']}; see docs/multi-gpu.md)")
    nodes = (f"; {num_nodes} nodes x {num_gpus // num_nodes} GPUs: one MPI world of {num_gpus} ranks "
             f"(mpirun or srun with trtllm-llmapi-launch)" if num_nodes > 1 else "")
    return {
        "sglang": sglang,
        "vllm-ascend": f"--data-parallel-size {num_gpus} --enable-expert-parallel --additional-config "
                       f"'{{\"eplb_config\": {{\"expert_map_path\": \"{out_dir / FILENAMES['vllm-ascend']}\", "
                       f"\"num_redundant_experts\": {redundant}}}}}'",
        "vllm": vllm,
        "trtllm": f"extra_llm_api_options.yaml: {{enable_attention_dp: true, moe_config: {{load_balancer: "
                  f"{out_dir / FILENAMES['trtllm']}}}}} with --tp_size {num_gpus} --ep_size {num_gpus}{nodes}",
    }


def engine_warnings(formats: list[str], architecture: str) -> list[str]:
    """One line for each requested engine file that the engine will not use as written."""
    out = []
    if "sglang" in formats:
        takes = sglang_takes_placement(architecture)
        if not has_model(SGLANG_MODELS, architecture):
            out.append(f"SGLang {SGLANG_VERSION} has no model for {architecture} ({HF_ARCHITECTURES[architecture]} is not "
                       f"in its registry): serve it with rq's runtime; SGLang takes a placement for "
                       f"{_supported(SGLANG_MODELS)}")
        elif takes is False:
            cls = SGLANG_MODELS[architecture][0]
            out.append(f"SGLang {SGLANG_VERSION}'s {cls} has no get_model_config_for_expert_location: SGLang drops "
                       f"{FILENAMES['sglang']} and then fails ('Expert dispatch requires placement metadata'); "
                       f"SGLang takes a placement for {_supported(SGLANG_MODELS)}")
        elif takes is None:
            out.append(f"rq has not checked whether SGLang's model for '{architecture}' takes a placement (checked: "
                       f"{', '.join(sorted(SGLANG_MODELS))}); it does where the model class defines "
                       f"get_model_config_for_expert_location")
    if "vllm" in formats:
        out.append(f"vLLM {VLLM_VERSION} cannot load {FILENAMES['vllm']}: its EPLBConfig refuses "
                   f"initial_expert_map_path; vLLM starts from experts 0..N-1 plus redundant copies of 0, 1, ... and "
                   f"--enable-eplb rebalances from measured loads, so only the slot count (num_redundant_experts) "
                   f"carries over")
        entry = VLLM_MODELS.get(architecture)
        if not has_model(VLLM_MODELS, architecture):
            out.append(f"vLLM {VLLM_VERSION} has no model for {architecture} ({HF_ARCHITECTURES[architecture]} is not "
                       f"in its registry)")
        elif entry is not None and not entry[1]:
            out.append(f"vLLM {VLLM_VERSION}'s {entry[0]} does not implement MixtureOfExperts, so --enable-eplb does "
                       f"not balance it (vLLM's EPLB serves {_supported(VLLM_MODELS)})")
    return out
