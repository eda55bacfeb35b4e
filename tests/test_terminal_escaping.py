"""Strings from a file never reach a terminal raw; ``--json`` output stays exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.cli.text import clean, escape, escape_lines

# what a hostile file puts in names and values: clear screen, retitle, bell, CR overwrite,
# one-byte CSI, a bidirectional override, a line separator, and rich markup
EVIL = "w\x1b[2J\x1b]0;pwned\x07\rOK\x9b31m\u202e\u2028[bold red]x\x00"
RAW = ("\x1b", "\x07", "\r", "\x9b", "\u202e", "\u2028", "\x00")


def _no_raw(text: str) -> None:
    bad = [repr(c) for c in RAW if c in text]
    assert not bad, f"raw {bad} in output: {text!r}"


@pytest.fixture
def evil_file(tmp_path: Path) -> Path:
    state = {"model": {EVIL: torch.ones(2, 2), "ok": torch.zeros(3)}, "cfg": {EVIL: EVIL}}
    return tk.save(state, tmp_path / "evil.safetensors", metadata={EVIL: EVIL, "note": EVIL})


def test_clean_shows_every_control_as_an_escape() -> None:
    out = clean(EVIL)
    _no_raw(out)
    assert "\\x1b[2J" in out and "\\r" in out and "\\x9b" in out and "\\u202e" in out and "\\x00" in out
    assert clean("model/encoder.layers.0.weight") == "model/encoder.layers.0.weight"
    assert clean("café ü 日本") == "café ü 日本"
    assert escape("[bold]") == "\\[bold]"
    assert escape_lines("a\x1b\nb") == "a\\x1b\nb"


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{f}"],
        ["inspect", "{f}", "--depth", "5"],
        ["verify", "{f}"],
        ["get", "{f}", "model/" + EVIL],
        ["get", "{f}", "cfg/" + EVIL],
        ["diff", "{f}", "{g}"],
    ],
)
def test_human_output_escapes_what_the_file_holds(evil_file: Path, tmp_path: Path, args: list[str]) -> None:
    other = tk.save({"model": {EVIL: torch.zeros(2, 2)}}, tmp_path / "other.safetensors")
    argv = [a.format(f=evil_file, g=other) for a in args]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code in (0, 1), result.output
    _no_raw(result.output)
    if argv[0] != "verify":  # verify names no tensor when all is well
        assert "\\x1b" in result.output  # shown, not dropped


def test_the_json_output_stays_exact(evil_file: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", "--json", str(evil_file)])
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert doc["metadata"][EVIL] == EVIL
    result = CliRunner().invoke(app, ["get", "--json", str(evil_file), "cfg/" + EVIL])
    assert json.loads(result.output)["value"] == EVIL


def test_an_error_naming_a_hostile_key_is_escaped(evil_file: Path) -> None:
    result = CliRunner().invoke(app, ["get", str(evil_file), "model/" + EVIL + "nope"])
    assert result.exit_code == 2
    _no_raw(result.output)


def test_ls_and_prune_escape_metric_names_and_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run) as mgr:
        mgr.save({"w": torch.ones(1)}, step=0, metrics={EVIL: 1.0})
        mgr.save({"w": torch.ones(1)}, step=1, metrics={EVIL: 2.0})
    for argv in (["ls", str(run)], ["ls", str(run), "--monitor", EVIL], ["prune", str(run), "--keep-last", "1"]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        _no_raw(result.output)
