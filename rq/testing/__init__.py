"""Test and benchmark tooling, shipped so that users can try rq without a model: tiny random-weight
checkpoints of every supported architecture (``tiny``) and synthetic calibration stats at real model shapes
(``synthetic``). Nothing in the pipeline imports this package."""
