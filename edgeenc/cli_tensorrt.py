"""`edgeenc build`: TensorRT engine from a bundle (filled in by the TensorRT work)."""

from __future__ import annotations

from pathlib import Path

import typer


def build(bundle: Path = typer.Argument(..., help="a bundle folder written by `edgeenc export`")) -> None:
    """Build a TensorRT engine into BUNDLE/engines/."""
    typer.secho("error: edgeenc build is not implemented yet", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)
