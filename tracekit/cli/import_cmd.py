"""`tracekit import FORMAT ...`: turn other tools' routing records into a tracekit run directory."""
from __future__ import annotations

import typer

from . import app

import_app = typer.Typer(help="Import routing recorded elsewhere into a run directory of tracekit's schema.", no_args_is_help=True)
app.add_typer(import_app, name="import")
