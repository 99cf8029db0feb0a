"""Command line: ``python -m curvlinops demo|influence|spectrum`` (also the console script).

Usage::

    curvlinops demo [--backend torch|jax|all] [--dtype float32|float64]
                    [--out DIR] [--json FILE] [--seed N] [--quiet]
    curvlinops influence [--backend torch|jax|all] [--method M[,M...]]
                         [--out DIR] [--json FILE] [--seed N] [--quiet]
    curvlinops spectrum [--backend torch|jax|all] [--steps 0,50,100,200,400]
                        [--twin-steps ends|all]
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
from typing import Any, NoReturn

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
        "--dtype", default="float64", metavar="{float32,float64}", help="default: float64"
    )
    _add_common_options(
        demo,
        "demo",
        out_help="directory for the spectral-density PNGs",
        seed_help="seed of data and initialisation",
        quiet_help="no progress bars; print the table",
    )
    _add_influence_parser(commands)
    _add_spectrum_parser(commands)
    return parser


INFLUENCE_METHODS = ("exact", "ggn", "kfac", "ekfac", "loss", "grad_norm", "random")


def _add_influence_parser(commands: Any) -> None:
    influence = commands.add_parser(
        "influence",
        help="influence functions that find mislabelled digits (scikit-learn's digits)",
        description=(
            "Flip 10% of the training labels of scikit-learn's digits, train logistic "
            "regression and a tanh MLP, and rank the training points by self-influence "
            "(exact Hessian and GGN by batched CG, KFAC, EKFAC) against baselines; recall "
            "curves, a test-influence image grid and leave-one-out validation (PNGs)."
        ),
    )
    influence.add_argument(
        "--method",
        default=None,
        metavar="M[,M...]",
        help=f"any of {', '.join(INFLUENCE_METHODS)}, or all (default: all but the MLP's "
        "exact Hessian, which takes minutes)",
    )
    _add_common_options(influence, "influence", seed_help="seed of split, flips and weights")


def _add_spectrum_parser(commands: Any) -> None:
    spectrum = commands.add_parser(
        "spectrum",
        help="the lecture's Figure 2: a ResNet's Hessian spectrum during momentum training",
        description=(
            "Train a small ResNet with batch normalisation on scikit-learn's digits by SGD "
            "with momentum; at each checkpoint measure the Hessian's spectral density (SLQ, "
            "full training set), its extreme eigenvalues (eigsh), the negative mass, and the "
            "GGN's density; validated against a dense Hessian on a reduced network (PNGs)."
        ),
    )
    spectrum.add_argument(
        "--steps",
        default="0,50,100,200,400",
        metavar="N[,N...]",
        help="SGD steps at which to measure (default: 0,50,100,200,400)",
    )
    spectrum.add_argument(
        "--twin-steps",
        choices=("ends", "all"),
        default="ends",
        help="checkpoints the second backend measures from the same weights: the first "
        "and the last (default), or all (about twice the time)",
    )
    _add_common_options(spectrum, "spectrum", seed_help="seed of split, weights and batches")


def _add_common_options(
    parser: Any,
    command: str,
    *,
    out_help: str = "directory for the PNGs",
    seed_help: str,
    quiet_help: str = "print only the final table",
) -> None:
    """The options every job has: --backend, --out, --json, --seed, --quiet."""
    parser.add_argument(
        "--backend",
        default="all",
        metavar="{torch,jax,all}",
        help="one backend, or all installed ones (default: all)",
    )
    parser.add_argument(
        "--out",
        default=f"curvlinops-{command}",
        metavar="DIR",
        help=f"{out_help} (default: ./curvlinops-{command})",
    )
    parser.add_argument(
        "--json", default=None, metavar="FILE", help="write every reported number to FILE"
    )
    parser.add_argument("--seed", default="0", metavar="N", help=f"{seed_help} (default 0)")
    parser.add_argument("--quiet", action="store_true", help=quiet_help)


MAX_STEPS = 100_000


def _steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        steps = []
    if not steps or any(not 0 <= step <= MAX_STEPS for step in steps):
        raise UsageError(
            f"--steps: expected a comma-separated list of SGD steps between 0 and {MAX_STEPS}, "
            f"got {text!r}. For example: --steps 0,50,100,200,400."
        )
    return sorted(set(steps))


def _methods(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text == "all":
        return list(INFLUENCE_METHODS)
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in INFLUENCE_METHODS]
    if unknown or not names:
        raise UsageError(
            f"--method: expected a comma-separated list of {', '.join(INFLUENCE_METHODS)} "
            f"(or all), got {text!r}. For example: --method exact,kfac,loss."
        )
    return list(dict.fromkeys(names))


def _check_sklearn(command: str) -> None:
    if not is_installed("sklearn"):
        raise UsageError(
            f"{command}: scikit-learn is not installed (its digits are the data). Install it "
            "with pip install 'curvlinops[data]'."
        )


def _backends(choice: str, command: str) -> list[str]:
    if choice not in BACKEND_CHOICES:
        raise UsageError(
            f"--backend: expected 'torch', 'jax' or 'all', got {choice!r}. Run "
            f"'curvlinops {command} --backend all' to use every installed backend."
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


def _writable_file(text: str, command: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise UsageError(
            f"--json {path}: is a directory. Pass a file name, e.g. {path}/{command}.json."
        )
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
            raise UsageError(
                "choose a command: 'demo', 'influence' or 'spectrum' (see curvlinops --help)."
            )
        options = {
            "backends": _backends(args.backend, args.command),
            "seed": _seed(args.seed),
            "json_path": None if args.json is None else _writable_file(args.json, args.command),
        }
        if args.command == "influence":
            options["methods"] = _methods(args.method)
            _check_sklearn(args.command)
        elif args.command == "spectrum":
            options["steps"] = _steps(args.steps)
            options["twin_steps"] = args.twin_steps
            _check_sklearn(args.command)
        else:
            options["dtype"] = _dtype(args.dtype)
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
    if args.command == "influence":
        from curvlinops.jobs.influence import run_influence_study as run
    elif args.command == "spectrum":
        from curvlinops.jobs.spectrum import run_spectrum as run
    else:
        from curvlinops.jobs.demo import run_demo as run

    from curvlinops.jobs._parallel import keep_freed_memory

    keep_freed_memory()  # this process is the job: reuse freed memory (no page-fault storm)
    try:
        run(quiet=args.quiet, command=[PROG, *argv], **options)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
