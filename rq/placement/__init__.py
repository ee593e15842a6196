"""Expert-parallel placement of a plan's copies on devices (``place``, pure), the files the serving engines load
(``formats``: SGLang, vLLM, TensorRT-LLM, EPLB), what each engine does with them (``servers``), engine load
dumps as rq stats (``loads``), tables and plots (``report``) and the device-LIS simulation against DeepSeek EPLB
with the ``rq place`` / ``rq import-loads`` entry points (``run``)."""

# File formats and engines, here (no torch) so that the command line can list them without loading a stage.
FORMATS = ("sglang", "vllm", "vllm-ascend", "trtllm", "eplb")
FILENAMES = {
    "sglang": "sglang_expert_location.json",
    "vllm": "vllm_physical_to_logical.json",
    "vllm-ascend": "vllm_ascend_expert_map.json",
    "trtllm": "trtllm_moe_load_balancer.yaml",
    "eplb": "eplb_placement.safetensors",
}
# SGLang's static dispatch (--moe-a2a-backend deepep) gets its own layout, placed for its static tables
# (rq.placement.static), written beside the "sglang" file.
SGLANG_STATIC_FILENAME = "sglang_expert_location_static.json"
ENGINES = ("sglang", "vllm", "trtllm")
