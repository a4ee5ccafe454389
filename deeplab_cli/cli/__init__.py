"""The `deeplab` command: a click group whose subcommands load only when they run.

Each subcommand lives in its own module of this package and imports nothing heavy at
module level, so `deeplab --help` and `deeplab --version` stay instant.
"""

from __future__ import annotations

import importlib

import click

from deeplab_cli import __version__

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
        from deeplab_cli.errors import DeeplabError

        try:
            return super().invoke(ctx)
        except DeeplabError as exc:
            raise click.ClickException(str(exc)) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing the commands must not import them: use the static one-liners.
        rows = [(name, SHORT_HELP[name]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deeplab")
def cli() -> None:
    """DeepLab v2 semantic segmentation with a fully connected CRF on the GPU."""


def main() -> None:
    cli(prog_name="deeplab")
