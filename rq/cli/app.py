"""The typer application every ``rq`` command registers on, and the helpers commands share.

Imports nothing heavy: each command imports its stage inside its body, so ``rq --help`` starts in a fraction
of a second and ``import rq.cli`` loads neither torch nor transformers. Every command turns
:class:`rq.errors.RQError` into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from typing import Callable, Iterator

import typer
from rich.console import Console

from rq.errors import RQError

app = typer.Typer(
    help="Replicate-and-Quantize (R&Q): balance the experts of a Mixture-of-Experts model without retraining.\n\n"
         "Typical flow: rq calibrate MODEL_DIR --data TEXT --out stats/ ; rq plan stats/ --out plan.json ; "
         "rq eval MODEL_DIR --plan plan.json --data TEXT.  Try `rq demo` first.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(width=None if sys.stdout.isatty() else 130)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def friendly_errors(fn: Callable) -> Callable:
    """One line naming the problem and the fix, exit code 2, for every user error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RQError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


QUIET_HELP = "Print nothing but errors (and warnings on stderr)."


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Standard output to nowhere and rq's progress bars (on stderr) off; errors still reach stderr."""
    from rq.progress import console as progress_console

    was = progress_console.quiet
    progress_console.quiet = True
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        progress_console.quiet = was


def with_quiet(fn: Callable) -> Callable:
    """``fn`` with a ``--quiet`` option (every command has one), unless it declares its own."""
    signature = inspect.signature(fn, eval_str=True)  # typer reads this signature as is: no string annotations
    if "quiet" in signature.parameters:
        return fn

    @functools.wraps(fn)
    def wrapper(*args, quiet: bool = False, **kwargs):
        if not quiet:
            return fn(*args, **kwargs)
        with silenced():
            return fn(*args, **kwargs)

    option = inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                               default=typer.Option(False, "--quiet", help=QUIET_HELP))
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), option])
    return wrapper


def command(name: str | None = None, target: typer.Typer = app,
            aliases: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """``@command("plan")``: register ``fn`` on ``target`` (the ``rq`` app by default) with friendly errors and
    ``--quiet``. ``aliases``: former names of a renamed command, kept working (hidden from ``--help``) for a
    release."""

    def register(fn: Callable) -> Callable:
        registered = friendly_errors(with_quiet(fn))
        target.command(name)(registered)
        for alias in aliases:
            target.command(alias, hidden=True)(registered)
        return fn

    return register


def quiet_transformers() -> None:
    """transformers' load-time warnings and progress bars are not actionable for rq users."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


DTYPE_HELP = "Compute dtype: auto (the checkpoint's own), float32, float16 or bfloat16."


def parse_dtype(name: str):
    """A torch dtype, or ``"auto"`` (the checkpoint's own dtype, what loaders take as is)."""
    import torch

    table = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise RQError(f"--dtype must be one of {', '.join(table)}, got '{name}'")
    return table[name]


def parse_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise RQError(f"--device '{name}' is not a device; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RQError(f"--device {name} asked for, but this machine has no CUDA GPU; use --device cpu")
    return device


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RQError(f"{option} takes comma-separated integers like 1,4,16, got '{text}'") from None
    if not values or min(values) < 1:
        raise RQError(f"{option} needs positive integers, got '{text}'")
    return values
