"""`vdit`: the command line, one module per pipeline stage. See app.py for the exit codes."""
from vdit_deploy.cli.app import main
from vdit_deploy.cli import build, calibrate, compare, export, model, pipeline, sample, serve  # noqa: F401 (registers the commands)

__all__ = ["main"]
