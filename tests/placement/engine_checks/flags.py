"""Shared by the engine checks: a printed flag string as the argv a shell gives the engine."""

import subprocess

# What a person sets on the first of the nodes before pasting a multi-node flag set.
NODE_ENV = {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def shell_argv(flags: str) -> list[str]:
    """``flags`` expanded by bash with :data:`NODE_ENV` set (variables, quotes and ``$((...))`` as typed)."""
    out = subprocess.run(["bash", "-c", f'printf "%s\\0" {flags}'], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", **NODE_ENV})
    return [a for a in out.stdout.split("\0") if a]
