"""CLI commands of the later pipeline stages (demo, export, check, build, place, triton), registered
onto the main app. Each stage's implementation lives in its own package; this file only wires it."""

from __future__ import annotations

from typing import Callable

import typer


def register(app: typer.Typer, friendly_errors: Callable) -> None:
    from rq.demo.cli import demo
    from rq.placement_cli import import_command, place_command

    app.command("demo")(friendly_errors(demo))
    app.command("place")(friendly_errors(place_command))
    app.command("import-loads")(friendly_errors(import_command))


def export_app(friendly_errors: Callable) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    return app
