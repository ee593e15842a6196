"""Stage 3, the R&Q model: a plan applied to a loaded model, every MoE layer's experts replaced by replica-aware
experts with INT4 copies (``model``). It is the PyTorch reference every runtime is checked against."""
