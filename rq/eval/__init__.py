"""Stage 4, evaluate: LIS before/after (batch sizes, streaming; cumulative and instantaneous) and accuracy parity
against the original model (``evaluate``), and the tables that print them (``report``)."""
