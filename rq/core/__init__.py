"""Core math of R&Q, pure functions over tensors (torch only, no I/O): the INT4 format (``int4``), the replica
rule (``replica``), the Load-Imbalance Score (``lis``), what one expert computes (``experts``) and the reference
semantics of the ``rq::RQMoE`` op (``op``). Every other stage builds on these; they import nothing else of rq
but :mod:`rq.errors`."""
