"""Stage 1, calibrate: run text through the unmodified model and record per layer and expert the loads and
importance metrics (``accumulate``); text windows from local files (``data``); the on-disk stats (``stats``)."""
