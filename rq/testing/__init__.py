"""Test and benchmark tooling, shipped so that users can try rq without a model: tiny random-weight
checkpoints of every supported architecture (``tiny``), synthetic calibration stats at real model shapes
(``synthetic``) and a local Triton Inference Server with its clients (``tritonserver``). Nothing in the
pipeline imports this package."""
