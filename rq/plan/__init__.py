"""Stage 2, plan: the greedy replicate-and-quantize planner (``planner``, pure) and the versioned, validated
``plan.json`` document (``schema``)."""
