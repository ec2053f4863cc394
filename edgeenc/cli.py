"""The `edgeenc` command: parse, call the library, print, choose the exit code.

This module only assembles the typer app from the command modules (cli_export, cli_run, cli_ray,
cli_bench, cli_tensorrt, cli_recorder, cli_search, cli_probes), which share edgeenc/cli_common.py. Commands import their
library lazily so that the runtime commands never import torch.
"""

from __future__ import annotations

import sys

import typer

from edgeenc.cli_bench import bench, optimize
from edgeenc.cli_common import ExitStatus, err
from edgeenc.cli_export import demo, export, models
from edgeenc.cli_probes import probe_app
from edgeenc.cli_recorder import clips, export_db, listen, serve, watch
from edgeenc.cli_run import classify, embed, info
from edgeenc.cli_search import index, search
from edgeenc.cli_tensorrt import build

HELP = ("Run Earth Species Project's BEATs and EAT bioacoustic encoders (esp_aves2_*) on Jetson recorders, GPUs "
        "and plain CPUs: export a model to an ONNX bundle, then embed and classify recordings, watch a folder or "
        "listen to a live source. Start with `edgeenc demo`; `edgeenc COMMAND --help` for each command.")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)

for command in (models, export, info, embed, classify, demo, build, bench, optimize, watch, listen):
    app.command()(command)
app.command("export-db")(export_db)
app.command()(search)
app.command()(index)
app.command()(clips)
app.command()(serve)
app.add_typer(probe_app, name="probe")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(ExitStatus.INTERRUPTED)
