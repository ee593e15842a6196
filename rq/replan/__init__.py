"""Close the loop of a served R&Q model: the loads a Triton Inference Server served -> stats (``served``), a new
plan within the same budget judged on those loads and published as the next model version with no failed
request (``run``, ``publish``). The last stage of the data flow: it plans, exports and writes repositories
(docs/tritonserver.md, "Re-planning from served traffic")."""
