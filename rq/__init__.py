"""rq: Replicate-and-Quantize for sparse Mixture-of-Experts models.

Calibrate expert loads and importance, plan replicas and INT4 quantization within the original memory
budget, measure the Load-Imbalance Score, and deploy (ONNX, TensorRT, Triton, expert-parallel engines).
"""

__version__ = "0.1.0"
