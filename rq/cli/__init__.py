"""The ``rq`` and ``rq-export`` command lines (``main``): thin typer wrappers over the stages."""
