"""Expert-parallel placement of a plan's copies on devices (``place``, pure), the files the serving engines load
(``formats``: SGLang, vLLM, TensorRT-LLM, EPLB) and the device-LIS simulation against DeepSeek EPLB (``run``)."""
