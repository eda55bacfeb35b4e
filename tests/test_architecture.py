"""The layers hold: no private names across modules, and the header-only CLI never imports torch.

The import contracts themselves (floor never imports a verb, torch-free core, no cycles) are
checked by ``lint-imports`` in ``make lint`` (contracts in ``pyproject.toml``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import torchkeep as tk

SRC = Path(tk.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def test_no_module_imports_another_modules_private_names() -> None:
    mods = _modules()
    offences = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchkeep"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offences.append(f"{name}: from {node.module} import {alias.name}")
    assert offences == []


def test_modules_stay_small() -> None:
    """A module has one job: none grows past ~600 lines. The exception tree is the one exception:
    it is a flat list of small classes, one per error, which every module imports."""
    sizes = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in _modules().items()}
    limits = {"torchkeep.errors": 700}
    assert {n: c for n, c in sizes.items() if c > limits.get(n, 620)} == {}


_PROBE = """
import json, sys
from torchkeep.cli import app
try:
    app(args=sys.argv[2:], prog_name="torchkeep")
    code = 0
except SystemExit as e:
    code = e.code or 0
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "torch": "torch" in sys.modules, "numpy": "numpy" in sys.modules}, f)
"""


def _run_cli(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"probe-{len(list(tmp_path.glob('probe-*')))}.json"
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.exists(), proc.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("torchfree")
    model = torch.nn.Linear(4, 2)
    tk_file = tk.save({"model": model, "epoch": 3}, d / "ckpt.safetensors")
    st_file = d / "plain.safetensors"
    save_file({"w": torch.ones(3)}, str(st_file))
    shards = tk.convert(tk_file, d / "sharded" / "model.safetensors", max_shard_size=16)
    with tk.CheckpointManager(d / "run", keep_last=2) as mgr:
        mgr.save({"model": model}, step=1, metrics={"loss": 0.5})
    return {"tk": tk_file, "st": st_file, "index": shards, "run": d / "run"}


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["inspect", "{tk}"],
        ["inspect", "{st}", "--json"],
        ["inspect", "{index}"],
        ["verify", "{tk}"],
        ["verify", "{st}", "--json"],
        ["verify", "{index}"],
        ["scan", "{tk}"],
        ["scan", "{st}"],
        ["ls", "{run}"],
        ["ls", "{run}", "--verify"],
    ],
    ids=lambda a: " ".join(a).replace("{", "").replace("}", ""),
)
def test_header_only_commands_never_import_torch(files: dict[str, Path], tmp_path: Path, args: list[str]) -> None:
    result = _run_cli(tmp_path, *(a.format(**files) for a in args))
    assert result["code"] == 0
    assert result["torch"] is False
    assert result["numpy"] is False


def test_the_probe_sees_torch_when_a_command_needs_it(files: dict[str, Path], tmp_path: Path) -> None:
    """The probe can fail: a conversion does import torch."""
    result = _run_cli(tmp_path, "convert", str(files["tk"]), str(tmp_path / "out.pt"))
    assert result["code"] == 0
    assert result["torch"] is True
