"""Every command's --help, compared with tests/data/cli_help.json: the CLI's structure (one module per
stage) can change without its text changing. A change to an option is a change to that file too:
regenerate it with VDIT_UPDATE_HELP=1 and review the diff with the change."""
import json
import os
from pathlib import Path

from click.testing import CliRunner

from vdit_deploy.cli import main

RECORDED = Path(__file__).parent / "data" / "cli_help.json"


def all_help() -> dict[str, str]:
    runner, out = CliRunner(), {}

    def walk(command, path):
        out[" ".join(["vdit", *path])] = runner.invoke(main, [*path, "--help"], terminal_width=100).output
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(main, [])
    return out


def test_help_texts_are_the_recorded_ones():
    now = all_help()
    if os.environ.get("VDIT_UPDATE_HELP"):
        RECORDED.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(RECORDED.read_text())
    assert sorted(now) == sorted(recorded), "commands added or removed: regenerate with VDIT_UPDATE_HELP=1"
    changed = [name for name in now if now[name] != recorded[name]]
    assert not changed, f"--help of {', '.join(changed)} changed: regenerate with VDIT_UPDATE_HELP=1 if meant"
