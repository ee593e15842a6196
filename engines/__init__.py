"""Inference-engine builders for exported R&Q models (installed as ``rq.engines``)."""
