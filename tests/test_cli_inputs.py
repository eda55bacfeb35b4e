"""Every verb against bad inputs: the exit status, one clean error line, no traceback, advice in flags;
and the read-only verbs never write, lock or touch anything."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from export_models import MLP
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def f(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One of each bad (and good) input, made once."""
    d = tmp_path_factory.mktemp("inputs")
    good = tk.save({"w": torch.arange(64, dtype=torch.float32)}, d / "good.safetensors")
    raw = good.read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[:-7])  # a copy cut short
    (d / "cut-header.safetensors").write_bytes(raw[:40])  # cut inside its header
    flipped = bytearray(raw)
    flipped[-3] ^= 0x20
    (d / "flipped.safetensors").write_bytes(bytes(flipped))
    (d / "notes.txt").write_text("just some text, clearly not a checkpoint\n")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "emptydir").mkdir()
    (d / "other").mkdir()
    (d / "other" / "readme.md").write_text("no checkpoint here\n")
    torch.save({"w": torch.ones(2)}, d / "old.pt")
    tk.save_model(MLP(), d / "model.safetensors")
    run = d / "run"
    with tk.CheckpointManager(run, filename="e{step:03d}", monitor="val_acc") as mgr:
        for step, acc in enumerate([0.5, 0.9, 0.7]):
            mgr.save({"model": torch.nn.Linear(2, 2)}, step=step, metrics={"val_acc": acc})
    names = ["good", "truncated", "cut-header", "flipped", "empty"]
    out = {n: d / f"{n}.safetensors" for n in names}
    out |= {"text": d / "notes.txt", "emptydir": d / "emptydir", "otherdir": d / "other", "old": d / "old.pt"}
    out |= {"model": d / "model.safetensors", "run": run, "missing": d / "nope.safetensors", "dir": d}
    # an output path no one can write, even root: its parent is a file
    out["unwritable"] = d / "notes.txt" / "sub"
    return out


# (id, argv with {name} placeholders, expected exit status, words the message must have)
Case = tuple[str, list[str], int, list[str]]

CASES: list[Case] = [
    # inspect
    ("inspect-missing", ["inspect", "{missing}"], 2, ["no such checkpoint file"]),
    ("inspect-emptydir", ["inspect", "{emptydir}"], 2, ["pass the checkpoint file"]),
    ("inspect-text", ["inspect", "{text}"], 2, ["not a checkpoint"]),
    ("inspect-empty", ["inspect", "{empty}"], 2, ["empty"]),
    ("inspect-truncated", ["inspect", "{truncated}"], 2, ["corrupt"]),
    ("inspect-depth-0", ["inspect", "{good}", "--depth", "0"], 2, ["--depth", "torchkeep inspect -h"]),
    # verify: damage is exit 1, anything it cannot check is exit 2
    ("verify-missing", ["verify", "{missing}"], 2, ["no such checkpoint file"]),
    ("verify-emptydir", ["verify", "{emptydir}"], 2, ["pass the checkpoint file"]),
    ("verify-text", ["verify", "{text}"], 2, ["not a checkpoint"]),
    ("verify-empty", ["verify", "{empty}"], 2, ["empty"]),
    ("verify-legacy", ["verify", "{old}"], 2, ["no checksums"]),
    ("verify-truncated", ["verify", "{truncated}"], 1, ["DAMAGED", "truncated"]),
    ("verify-cut-header", ["verify", "{cut-header}"], 1, ["DAMAGED"]),
    ("verify-flipped", ["verify", "{flipped}"], 1, ["DAMAGED", "'w'"]),
    # scan
    ("scan-missing", ["scan", "{missing}"], 2, ["no such checkpoint file"]),
    ("scan-emptydir", ["scan", "{emptydir}"], 2, ["an empty directory", "pass them"]),
    ("scan-otherdir", ["scan", "{otherdir}"], 2, ["a directory", "pass them"]),
    ("scan-text", ["scan", "{text}"], 2, ["unreadable"]),
    ("scan-empty", ["scan", "{empty}"], 2, ["not a pickle"]),
    # get
    ("get-missing", ["get", "{missing}", "w"], 2, ["no such checkpoint file"]),
    ("get-text", ["get", "{text}", "w"], 2, ["not a checkpoint"]),
    ("get-truncated", ["get", "{truncated}", "w"], 2, ["corrupt"]),
    ("get-no-key", ["get", "{good}", "v"], 2, ["no 'v'", "did you mean: w", "torchkeep inspect"]),
    ("get-out-suffix", ["get", "{good}", "w", "-o", "{dir}/w.txt"], 2, ["--out", ".npy"]),
    ("get-unwritable", ["get", "{good}", "w", "-o", "{unwritable}/w.npy"], 2, ["notes.txt"]),
    # ls
    ("ls-missing", ["ls", "{missing}"], 2, ["no such"]),
    ("ls-file", ["ls", "{good}"], 2, ["not a run directory", "torchkeep inspect"]),
    ("ls-emptydir", ["ls", "{emptydir}"], 2, ["an empty directory", "not a CheckpointManager run"]),
    ("ls-otherdir", ["ls", "{otherdir}"], 2, ["not a CheckpointManager run"]),
    ("ls-mode", ["ls", "{run}", "--monitor", "val_acc", "--mode", "up"], 2, ["--mode", "max", "min"]),
    # prune
    ("prune-no-rule", ["prune", "{run}"], 2, ["--keep-last"]),
    ("prune-best-no-monitor", ["prune", "{run}", "--keep-best", "2"], 2, ["--keep-best needs --monitor"]),
    ("prune-negative", ["prune", "{run}", "--keep-last", "-1"], 2, ["--keep-last"]),
    ("prune-mode", ["prune", "{run}", "--keep-last", "1", "--mode", "up"], 2, ["--mode"]),
    ("prune-missing", ["prune", "{missing}", "--keep-last", "1"], 2, ["no such"]),
    ("prune-file", ["prune", "{good}", "--keep-last", "1"], 2, ["not a run directory"]),
    ("prune-emptydir", ["prune", "{emptydir}", "--keep-last", "1"], 2, ["not a CheckpointManager run"]),
    # plot
    ("plot-missing", ["plot", "{missing}", "--metric", "val_acc", "-o", "{dir}/c.png"], 2, ["no such"]),
    ("plot-file", ["plot", "{good}", "--metric", "val_acc", "-o", "{dir}/c.png"], 2, ["not a run directory"]),
    ("plot-emptydir", ["plot", "{emptydir}", "--metric", "val_acc"], 2, ["not a CheckpointManager run"]),
    ("plot-txt", ["plot", "{run}", "--metric", "val_acc", "-o", "{dir}/curve.txt"], 2, [".txt", ".png"]),
    ("plot-no-metric", ["plot", "{run}", "--metric", "loss", "-o", "{dir}/c.png"], 2, ["val_acc"]),
    ("plot-unwritable", ["plot", "{run}", "--metric", "val_acc", "-o", "{unwritable}/c.png"], 2, ["notes.txt"]),
    # convert
    ("convert-missing", ["convert", "{missing}", "{dir}/o.safetensors"], 2, ["no such checkpoint file"]),
    ("convert-emptydir", ["convert", "{emptydir}", "{dir}/o.safetensors"], 2, ["pass the checkpoint file"]),
    ("convert-text", ["convert", "{text}", "{dir}/o.safetensors"], 2, ["not a checkpoint"]),
    ("convert-truncated", ["convert", "{truncated}", "{dir}/o.safetensors"], 2, ["corrupt"]),
    ("convert-to", ["convert", "{good}", "{dir}/o.safetensors", "--to", "nope"], 2, ["--to", "torchkeep"]),
    (
        "convert-shard-size",
        ["convert", "{good}", "{dir}/o.safetensors", "--max-shard-size", "abc"],
        2,
        ["--max-shard-size", "5GB"],
    ),
    ("convert-unwritable", ["convert", "{good}", "{unwritable}/o.safetensors"], 2, ["notes.txt"]),
    # diff
    ("diff-missing", ["diff", "{missing}", "{good}"], 2, ["no such checkpoint file"]),
    ("diff-text", ["diff", "{good}", "{text}"], 2, ["not a checkpoint"]),
    ("diff-emptydir", ["diff", "{emptydir}", "{good}"], 2, ["pass the checkpoint file"]),
    ("diff-atol", ["diff", "{good}", "{good}", "--atol", "abc"], 2, ["--atol"]),
    # export
    ("export-missing", ["export", "{missing}", "-s", "1x8", "-o", "{dir}/m.pt"], 2, ["no such checkpoint file"]),
    ("export-text", ["export", "{text}", "-s", "1x8", "-o", "{dir}/m.pt"], 2, ["not a checkpoint"]),
    ("export-torch-save", ["export", "{old}", "-s", "1x8", "-o", "{dir}/m.pt"], 2, ["records no model class"]),
    ("export-state-tree", ["export", "{good}", "-s", "1x8", "-o", "{dir}/m.pt"], 2, ["not a model"]),
    ("export-shape", ["export", "{model}", "-s", "abc", "-o", "{dir}/m.pt"], 2, ["is not a shape"]),
    ("export-dtype", ["export", "{model}", "-s", "1x8", "--dtype", "floaty", "-o", "{dir}/m.pt"], 2, ["dtype"]),
    ("export-method", ["export", "{model}", "-s", "1x8", "--method", "x", "-o", "{dir}/m.pt"], 2, ["--method"]),
    ("export-wrong-shape", ["export", "{model}", "-s", "1x5", "-o", "{dir}/m.pt"], 2, ["--input-shape"]),
    ("export-no-output", ["export", "{model}", "-s", "1x8"], 2, ["-o"]),
    # quantize
    ("quantize-missing", ["quantize", "{missing}"], 2, ["no such checkpoint file"]),
    ("quantize-text", ["quantize", "{text}"], 2, ["not a checkpoint"]),
    ("quantize-torch-save", ["quantize", "{old}"], 2, ["records no model class"]),
    ("quantize-dtype", ["quantize", "{model}", "--dtype", "int3"], 2, ["--dtype", "qint8"]),
    ("quantize-modules", ["quantize", "{model}", "--modules", "conv"], 2, ["--modules", "linear"]),
    ("quantize-o-no-shape", ["quantize", "{model}", "-o", "{dir}/q.pt"], 2, ["--input-shape"]),
    ("quantize-o-onnx", ["quantize", "{model}", "-s", "1x8", "-o", "{dir}/q.onnx"], 2, [".pt"]),
]

VERBS = {"inspect", "verify", "scan", "get", "ls", "convert", "diff", "export", "quantize", "prune", "plot"}
# a Python keyword given as advice (``pass trust_pickle=True``, ``keep_best=2``), outside code in parentheses
_PY_ADVICE = re.compile(r"\b(pass|use|set|give) [a-z_]+=|(?<![\w.])[a-z]+_[a-z_]+=")


def _prose(message: str) -> str:
    """The message without parenthesised code such as ``tk.load(path, trust_pickle=True)``."""
    while (shorter := re.sub(r"\([^()]*\)", "", message)) != message:
        message = shorter
    return message


def test_the_table_covers_every_verb() -> None:
    assert {argv[0] for _, argv, _, _ in CASES} == VERBS


def _argv(template: list[str], f: dict[str, Path]) -> list[str]:
    return [re.sub(r"\{([a-z-]+)\}", lambda m: str(f[m.group(1)]), a) for a in template]


def assert_clean_failure(result: object, code: int, words: list[str]) -> None:
    """Exit ``code``; no traceback; a status-2 error is one ``error:`` line on stderr and nothing on stdout."""
    r = result  # typer's Result
    text = r.output  # type: ignore[attr-defined]
    assert r.exit_code == code, text  # type: ignore[attr-defined]
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # type: ignore[attr-defined]
    assert "Traceback" not in text and "╭" not in text, text
    if code == 2:
        lines = r.stderr.strip().splitlines()  # type: ignore[attr-defined]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr  # type: ignore[attr-defined]
        assert r.stdout == ""  # type: ignore[attr-defined]
        message = lines[0]
    else:
        message = " ".join(text.split())
    assert not _PY_ADVICE.search(_prose(message)), message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(("argv", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(f: dict[str, Path], argv: list[str], code: int, words: list[str]) -> None:
    if argv[0] == "plot" and not HAS_MPL:
        pytest.skip("plot needs matplotlib")
    assert_clean_failure(runner.invoke(app, _argv(argv, f)), code, words)


def test_convert_refusal_names_the_flag(f: dict[str, Path], tmp_path: Path) -> None:
    import argparse

    old = tmp_path / "ns.pt"
    torch.save({"hp": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, old)
    result = runner.invoke(app, ["convert", str(old), str(tmp_path / "o.safetensors")])
    assert_clean_failure(result, 2, ["--trust-pickle"])


def test_unknown_command_and_option_are_one_line() -> None:
    assert_clean_failure(runner.invoke(app, ["inspekt", "x"]), 2, ["inspekt"])
    assert_clean_failure(runner.invoke(app, ["verify", "x", "--bogus"]), 2, ["--bogus", "torchkeep verify -h"])


def test_a_bare_verb_still_shows_its_help() -> None:
    result = runner.invoke(app, ["verify"])
    assert "Usage:" in result.output and "error:" not in result.output


# -- --json errors -----------------------------------------------------------------------------


def test_verify_json_of_a_missing_file_is_json(f: dict[str, Path]) -> None:
    result = runner.invoke(app, ["verify", "--json", str(f["missing"])])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["path"] == str(f["missing"]) and "no such checkpoint file" in doc["error"]
    assert set(doc) >= {"ok", "error", "path", "format", "key"}
    assert len(result.stderr.strip().splitlines()) == 1  # and the one line for people


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "--json", "{missing}"],
        ["ls", "{good}", "--json"],
        ["diff", "{missing}", "{good}", "--json"],
        ["convert", "{text}", "{dir}/o.safetensors", "--json"],
        ["inspect", "{good}", "--json", "--depth", "0"],
    ],
    ids=["inspect", "ls", "diff", "convert", "usage"],
)
def test_json_errors_have_one_shape(f: dict[str, Path], argv: list[str]) -> None:
    result = runner.invoke(app, _argv(argv, f))
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error"] and "path" in doc
    assert "Traceback" not in result.output


def test_scan_json_marks_unreadable(f: dict[str, Path]) -> None:
    result = runner.invoke(app, ["scan", "--json", str(f["text"]), str(f["emptydir"])])
    assert result.exit_code == 2
    rows = json.loads(result.stdout)
    assert [r["verdict"] for r in rows] == ["unreadable", "unreadable"] and all(r["error"] for r in rows)


@pytest.mark.parametrize("verb", ["inspect", "verify", "scan", "ls", "diff", "convert", "export", "quantize"])
def test_help_documents_the_json_error_shape(verb: str) -> None:
    text = " ".join(runner.invoke(app, [verb, "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert '"ok": false' in text and '"error"' in text, text


def test_help_has_no_type_noise() -> None:
    for verb in [*sorted(VERBS), "demo", None]:
        text = runner.invoke(app, [verb, "--help"] if verb else ["--help"]).stdout
        assert "<bool>" not in text and "BOOLEAN" not in text, verb


# -- -v ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after", "at-end"])
def test_verbose_shows_the_traceback(f: dict[str, Path], where: str) -> None:
    plain = runner.invoke(app, ["inspect", str(f["text"])])
    assert "Traceback" not in plain.output
    args = {
        "before": ["-v", "inspect", str(f["text"])],
        "after": ["inspect", "-v", str(f["text"])],
        "at-end": ["inspect", str(f["text"]), "--verbose"],
    }[where]
    loud = runner.invoke(app, args)
    assert loud.exit_code == 2
    assert "Traceback (most recent call last)" in loud.stderr and "CorruptCheckpointError" in loud.stderr


def test_v_after_a_double_dash_is_an_argument(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", "--", "-v"])
    assert result.exit_code == 2 and "Traceback" not in result.output and "-v" in result.stderr


def test_an_unexpected_error_is_one_line_and_names_v(f: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("torchkeep.cli.inspect.inspect", boom)
    result = runner.invoke(app, ["inspect", str(f["good"])])
    assert_clean_failure(result, 2, ["unexpected ZeroDivisionError", "a bug", "torchkeep -v"])
    loud = runner.invoke(app, ["--verbose", "inspect", str(f["good"])])
    assert loud.exit_code == 2 and "Traceback" in loud.stderr and "ZeroDivisionError: a bug" in loud.stderr


# -- read-only verbs never write ----------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its size, mtime and mode: any create, write, delete or lock shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, st.st_mode)
    return out


def _fresh_run(tmp_path: Path, n: int = 4) -> Path:
    run = tmp_path / "run"
    with tk.CheckpointManager(run, filename="e{step:03d}", monitor="val_acc") as mgr:
        for step in range(n):
            mgr.save({"w": torch.full((3,), float(step))}, step=step, metrics={"val_acc": [0.5, 0.9, 0.7, 0.6][step]})
    return run


READ_ONLY: list[tuple[str, list[str]]] = [
    ("inspect", ["inspect", "{run}/e001.safetensors"]),
    ("verify", ["verify", "{run}/e001.safetensors"]),
    ("scan", ["scan", "{run}/e001.safetensors"]),
    ("get", ["get", "{run}/e001.safetensors", "w"]),
    ("ls", ["ls", "{run}", "--verify", "--monitor", "val_acc"]),
    ("diff", ["diff", "{run}/e001.safetensors", "{run}/e002.safetensors"]),
    ("prune-dry", ["prune", "{run}", "--keep-last", "1", "--keep-best", "1", "--monitor", "val_acc"]),
    ("prune-dry-empty", ["prune", "{empty}", "--keep-last", "1"]),
    ("ls-empty", ["ls", "{empty}"]),
    ("ls-file", ["ls", "{run}/e001.safetensors"]),
    ("prune-file", ["prune", "{run}/e001.safetensors", "--keep-last", "1"]),
]


@pytest.mark.parametrize("argv", [a for _, a in READ_ONLY], ids=[i for i, _ in READ_ONLY])
def test_read_only_verbs_change_nothing(tmp_path: Path, argv: list[str]) -> None:
    run = _fresh_run(tmp_path)
    (run / ".lock").unlink(missing_ok=True)  # as a run looks after its job ended (or never locked)
    (tmp_path / "empty").mkdir()
    before = _tree(tmp_path)
    result = runner.invoke(
        app, [a.replace("{run}", str(run)).replace("{empty}", str(tmp_path / "empty")) for a in argv]
    )
    assert result.exit_code in (0, 1, 2) and "Traceback" not in result.output, result.output
    assert _tree(tmp_path) == before


def test_plot_writes_only_its_image(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = _fresh_run(tmp_path)
    before = _tree(run)
    out = tmp_path / "curve.png"
    assert runner.invoke(app, ["plot", str(run), "--metric", "val_acc", "-o", str(out)]).exit_code == 0
    assert _tree(run) == before and out.is_file()


def test_prune_dry_run_needs_no_lock_and_matches_the_real_prune(tmp_path: Path) -> None:
    run = _fresh_run(tmp_path)
    rules = ["--keep-last", "1", "--keep-best", "1", "--monitor", "val_acc"]
    with tk.CheckpointManager(run):  # a training job holds the run: the dry run still reads it
        dry = runner.invoke(app, ["prune", str(run), *rules])
    assert dry.exit_code == 0, dry.output
    planned = sorted(re.findall(r"would delete (e\d+\.safetensors)", dry.output))
    assert planned == ["e000.safetensors", "e002.safetensors"]
    done = runner.invoke(app, ["prune", str(run), *rules, "--yes"])
    assert done.exit_code == 0, done.output
    assert sorted(re.findall(r"deleted (e\d+\.safetensors)", done.output)) == planned
    assert sorted(p.name for p in run.glob("e*.safetensors")) == ["e001.safetensors", "e003.safetensors"]


def test_ls_and_prune_see_files_deleted_by_hand_as_gone(tmp_path: Path) -> None:
    run = _fresh_run(tmp_path)
    (run / "e000.safetensors").unlink()
    rows = json.loads(runner.invoke(app, ["ls", str(run), "--json"]).stdout)["checkpoints"]
    assert [r["file"] for r in rows] == ["e001.safetensors", "e002.safetensors", "e003.safetensors"]
    dry = runner.invoke(app, ["prune", str(run), "--keep-last", "1"])
    assert "e000" not in dry.output and "would delete 2 checkpoint(s)" in dry.output


def test_verbs_that_write_still_do(f: dict[str, Path], tmp_path: Path) -> None:
    # the one-line error handling does not swallow success
    out = tmp_path / "o.safetensors"
    assert runner.invoke(app, ["convert", str(f["good"]), str(out)]).exit_code == 0 and out.is_file()
