"""Built-in demo: a small Qwen3-MoE trained on the Python standard library (see docs/demo-model.md).

``rq.demo.corpus`` loads the committed text splits and locates the committed checkpoint;
``rq.demo.train`` rebuilds the checkpoint from scratch.
"""
