"""What each serving engine does with rq's placement files, as read and run from the engines' own code
(docs/multi-gpu.md, "What was verified against the engines"): the flags that load a placement, and a warning
for every engine and architecture that takes none. Data and strings only; ``rq place`` prints them and
``placement.json`` records them.
"""

from __future__ import annotations

from pathlib import Path

from rq.placement import FILENAMES

SGLANG_VERSION = "0.5.23"
VLLM_VERSION = "0.33.0"

# Hugging Face model_type -> (SGLang model class, whether it defines get_model_config_for_expert_location).
# Without that classmethod SGLang's ModelConfigForExpertLocation is None: init_by_mapping drops the file and the
# first MoE layer fails with "Expert dispatch requires placement metadata" (run with SGLang 0.5.23's own code).
SGLANG_MODELS = {
    "deepseek_v2": ("DeepseekV2ForCausalLM", True),
    "deepseek_v3": ("DeepseekV3ForCausalLM", True),
    "qwen2_moe": ("Qwen2MoeForCausalLM", True),
    "qwen3_moe": ("Qwen3MoeForCausalLM", True),
    "mixtral": ("MixtralForCausalLM", False),
    "olmoe": ("OlmoeForCausalLM", False),
    "deepseek": ("DeepseekForCausalLM", False),
}

# model_type -> (vLLM model class, whether it implements MixtureOfExperts, the interface vLLM's EPLB needs).
VLLM_MODELS = {
    "deepseek": ("DeepseekForCausalLM", True),
    "deepseek_v2": ("DeepseekV2ForCausalLM", True),
    "deepseek_v3": ("DeepseekV3ForCausalLM", True),
    "mixtral": ("MixtralForCausalLM", True),
    "qwen3_moe": ("Qwen3MoeForCausalLM", True),
    "qwen2_moe": ("Qwen2MoeForCausalLM", False),
    "olmoe": ("OlmoeForCausalLM", False),
}


def sglang_takes_placement(architecture: str) -> bool | None:
    """True / False as verified for SGLang's model of ``architecture``; None where rq has not checked it."""
    entry = SGLANG_MODELS.get(architecture)
    return None if entry is None else entry[1]


def _supported(table: dict[str, tuple[str, bool]]) -> str:
    return ", ".join(sorted(k for k, (_, ok) in table.items() if ok))


def engine_flags(num_gpus: int, num_phy: int, n: int, out_dir: Path, architecture: str) -> dict[str, str]:
    """The command-line pieces that load each file (docs/multi-gpu.md has the full story). SGLang resolves the
    dispatch algorithm itself (``dynamic`` without an all-to-all backend, ``static`` with one): rq prints no
    ``--ep-dispatch-algorithm``, since ``static`` without ``--moe-a2a-backend`` is refused at start-up."""
    redundant = num_phy - n
    sglang = (f"--ep-size {num_gpus} --ep-num-redundant-experts {redundant} "
              f"--init-expert-location {out_dir / FILENAMES['sglang']}")
    if sglang_takes_placement(architecture) is False:
        sglang = f"none: SGLang {SGLANG_VERSION} takes no placement for {architecture} (serve it without these flags)"
    return {
        "sglang": sglang,
        "vllm-ascend": f"--enable-expert-parallel --additional-config '{{\"eplb_config\": {{\"expert_map_path\": "
                       f"\"{out_dir / FILENAMES['vllm-ascend']}\", \"num_redundant_experts\": {redundant}}}}}'",
        "vllm": f"--enable-expert-parallel --enable-eplb --eplb-config '{{\"num_redundant_experts\": {redundant}}}' "
                f"(vLLM {VLLM_VERSION} cannot load {FILENAMES['vllm']}; see docs/multi-gpu.md)",
        "trtllm": f"extra_llm_api_options.yaml: moe_config: {{load_balancer: {out_dir / FILENAMES['trtllm']}}} "
                  f"with --ep_size {num_gpus}",
    }


def engine_warnings(formats: list[str], architecture: str) -> list[str]:
    """One line for each requested engine file that the engine will not use as written."""
    out = []
    if "sglang" in formats:
        takes = sglang_takes_placement(architecture)
        if takes is False:
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
        if entry is not None and not entry[1]:
            out.append(f"vLLM {VLLM_VERSION}'s {entry[0]} does not implement MixtureOfExperts, so --enable-eplb does "
                       f"not balance it (vLLM's EPLB serves {_supported(VLLM_MODELS)})")
    return out
