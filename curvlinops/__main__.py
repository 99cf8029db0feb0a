"""Command line: ``python -m curvlinops demo`` (also the console script ``curvlinops``).

Usage::

    curvlinops demo [--backend torch|jax|all] [--dtype float32|float64]
                    [--out DIR] [--json FILE] [--seed N] [--quiet]

A bad option (an unknown backend, a backend that is not installed, an output
directory or JSON file that cannot be written) ends the program with exit
status 2 and one line on stderr that says what to do; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from curvlinops.backends._namespaces import FRAMEWORKS, is_installed

__all__ = ["main"]

PROG = "curvlinops"
BACKEND_CHOICES = (*FRAMEWORKS, "all")
DTYPE_CHOICES = ("float32", "float64")
EXTRA_NAMES = {"torch": "PyTorch", "jax": "JAX"}


class UsageError(Exception):
    """A bad command-line option; its message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}. See '{self.prog} --help'.")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Matrix-free curvature operators for PyTorch and JAX.",
    )
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    demo = commands.add_parser(
        "demo",
        help="the lecture's curvature study of a regularised linear autoencoder",
        description=(
            "Train a regularised linear autoencoder, then measure its curvature: Rayleigh "
            "quotients along scaling and rotation, top Hessian/GGN eigenvalues, 2/lambda_max, "
            "the SLQ spectral density (PNG), and one CG solve; on every installed backend, "
            "with a comparison table."
        ),
    )
    demo.add_argument(
        "--backend",
        default="all",
        metavar="{torch,jax,all}",
        help="one backend, or all installed ones (default: all)",
    )
    demo.add_argument(
        "--dtype", default="float64", metavar="{float32,float64}", help="default: float64"
    )
    demo.add_argument(
        "--out",
        default="curvlinops-demo",
        metavar="DIR",
        help="directory for the spectral-density PNGs (default: ./curvlinops-demo)",
    )
    demo.add_argument(
        "--json", default=None, metavar="FILE", help="write every reported number to FILE"
    )
    demo.add_argument(
        "--seed", default="0", metavar="N", help="seed of data and initialisation (default 0)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars; print the table")
    return parser


def _backends(choice: str) -> list[str]:
    if choice not in BACKEND_CHOICES:
        raise UsageError(
            f"--backend: expected 'torch', 'jax' or 'all', got {choice!r}. Run "
            "'curvlinops demo --backend all' to use every installed backend."
        )
    wanted = list(FRAMEWORKS) if choice == "all" else [choice]
    installed = [name for name in wanted if is_installed(name)]
    if choice != "all" and not installed:
        raise UsageError(
            f"--backend {choice}: {EXTRA_NAMES[choice]} is not installed. Install it with "
            f"pip install 'curvlinops[{choice}]', or pick another backend."
        )
    if not installed:
        raise UsageError(
            "--backend all: neither PyTorch nor JAX is installed. Install one with "
            "pip install 'curvlinops[torch]' or pip install 'curvlinops[jax]'."
        )
    return installed


def _dtype(choice: str) -> str:
    if choice not in DTYPE_CHOICES:
        raise UsageError(f"--dtype: expected 'float32' or 'float64', got {choice!r}.")
    return choice


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if seed < 0:
        raise UsageError(f"--seed: expected a non-negative integer, got {text!r}.")
    return seed


def _writable_dir(path: Path, option: str) -> Path:
    """Create the directory ``path`` if needed and check that a file can be written there."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a directory. Pass a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(
            f"{option} {path}: cannot write there ({reason}). Pass a writable directory."
        ) from None
    return path


def _writable_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"--json {path}: is a directory. Pass a file name, e.g. {path}/demo.json.")
    _writable_dir(path.parent, "--json: the directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"--json {path}: the file is not writable. Pass another file name.")
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for a bad option (after printing one line to stderr).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(argv)
        if args.command is None:
            raise UsageError("choose a command: 'demo' (see curvlinops --help).")
        options = {
            "backends": _backends(args.backend),
            "dtype": _dtype(args.dtype),
            "seed": _seed(args.seed),
            "json_path": None if args.json is None else _writable_file(args.json),
        }
        options["out_dir"] = _writable_dir(Path(args.out), "--out")
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if args.backend == "all" and len(options["backends"]) < len(FRAMEWORKS):
        missing = [n for n in FRAMEWORKS if n not in options["backends"]]
        print(
            f"{PROG}: note: {', '.join(missing)} not installed; running "
            f"{', '.join(options['backends'])} only (pip install 'curvlinops[{missing[0]}]' "
            "to compare).",
            file=sys.stderr,
        )
    from curvlinops.demo import run_demo

    try:
        run_demo(quiet=args.quiet, command=[PROG, *argv], **options)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
