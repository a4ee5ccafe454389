"""The `deeplab` command: a click group whose subcommands load only when they run.

Each subcommand lives in its own module of this package and imports nothing heavy at
module level, so `deeplab --help` and `deeplab --version` stay instant.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import MutableMapping

import click

from deeplab_cli import __version__

# OpenMP threads (torch's, and those of numba's CRF loops) spin for a while between parallel
# regions by default. With another busy process on the same cores that spinning eats their
# time: on 2 cores, two concurrent `deeplab segment` runs took 3.6-10x longer per image than
# one run alone, against 2x with a short spin, and a run alone was as fast as before
# (benchmarked by hand, 384 px photos). Only filled in when the user set neither variable,
# and only effective because no OpenMP runtime is loaded yet when this module is imported.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "1000"}
OPENMP_USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def openmp_defaults(environ: MutableMapping[str, str]) -> None:
    """Fill in OPENMP_DEFAULTS unless `environ` already says how OpenMP threads should wait."""
    if not any(name in environ for name in OPENMP_USER_SETTINGS):
        environ.update(OPENMP_DEFAULTS)


openmp_defaults(os.environ)

# command name -> "module:attribute", imported on first use.
COMMANDS = {
    "weights": "deeplab_cli.cli.weights:weights",
    "crf": "deeplab_cli.cli.crf:crf",
    "segment": "deeplab_cli.cli.segment:segment",
    "evaluate": "deeplab_cli.cli.evaluate:evaluate",
    "tune-crf": "deeplab_cli.cli.evaluate:tune_crf",
}

SHORT_HELP = {
    "weights": "List, download, inspect and convert pretrained weights.",
    "crf": "Refine class probabilities with the fully connected CRF.",
    "segment": "Segment images, folders or a stream of paths.",
    "evaluate": "Score segmentations against ground truth (mIoU and more).",
    "tune-crf": "Grid-search the CRF parameters on a labelled split.",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context):
        # Library errors a user can cause become one line and exit status 1.
        from deeplab_cli.errors import DeeplabError, one_line

        try:
            return super().invoke(ctx)
        except DeeplabError as exc:
            raise click.ClickException(one_line(str(exc))) from None
        except click.UsageError as exc:
            # click's own checks (a missing file, a value out of range, an unknown option): one
            # line and status 1 as well, not a usage block and 2; a bare group still shows its help
            if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                raise
            raise click.ClickException(one_line(exc.format_message())) from None
        except KeyboardInterrupt:  # Ctrl-C: the shells' status for SIGINT, not click's 1
            click.echo("deeplab: interrupted", err=True)
            # A Ctrl-C that landed inside exec() of source text (dataclasses, namedtuple and
            # torch generate code that way while they import) sets CPython's "unhandled
            # KeyboardInterrupt" flag although it is handled here; under `python -m` the
            # process then kills itself with SIGINT at exit instead of returning 130. Each
            # exec() of source text clears the flag before it runs.
            exec("")
            ctx.exit(130)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing the commands must not import them: use the static one-liners.
        rows = [(name, SHORT_HELP[name]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deeplab")
def cli() -> None:
    """DeepLab v2 semantic segmentation with a fully connected CRF on the GPU."""


def guard_standard_streams() -> None:
    """Give closed standard descriptors (`>&-`, `2>&-`) /dev/null.

    Python leaves sys.stderr None then, and print(file=None) writes to stdout: the notes
    on stderr would land in the mask on stdout. A closed descriptor 0-2 would also be
    handed to the next file opened (an output), where C libraries' own messages on fd 2
    (libtiff's warnings) would end up.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # kept open for the life of the process


def main() -> None:
    guard_standard_streams()
    cli(prog_name="deeplab")
