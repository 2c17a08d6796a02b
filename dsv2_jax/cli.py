"""`dsv2` command line: each subcommand lives in its own module, which defines `register(subparsers)`.

Errors a user can fix (bad paths, bad configs, bad checkpoints) and OS errors (permissions, full disk) print one line
and exit with status 2; Ctrl-C prints one line and exits with 130. Outputs are staged, so neither leaves partial files.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dsv2_jax.config import ConfigError
from dsv2_jax.errors import one_line
from dsv2_jax.checkpoint.safetensors_io import CheckpointError

SUBCOMMAND_MODULES = [
    "dsv2_jax.commands.info",
    "dsv2_jax.commands.convert",
    "dsv2_jax.commands.generate",
    "dsv2_jax.commands.train",
    "dsv2_jax.commands.serve",
]
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (*USER_ERRORS, OSError) as e:
        print(f"dsv2 {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv2 {args.command}: interrupted; no partial output kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
