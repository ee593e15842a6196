"""Entry points of the ``rq`` and ``rq-export`` commands.

Importing the command modules registers their commands on :data:`rq.cli.app.app`; none of them imports a
stage (or torch) until its command runs.
"""

from __future__ import annotations

from rq.cli import demo, deploy, pipeline, placement, replan  # noqa: F401  (registers the commands)
from rq.cli.app import app


def main() -> None:
    app()


def export_main() -> None:
    """``rq-export MODEL_DIR --plan plan.json``: the same command as ``rq export``."""
    deploy.export_app()


if __name__ == "__main__":  # pragma: no cover
    main()
