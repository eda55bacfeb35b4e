"""CheckpointManager on object storage: fsspec ``memory://`` and a real S3-compatible server on 127.0.0.1.

The S3 server is moto's server mode, started by the tests in its own process and stopped after.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from forkserver import ForkClient
from manager_save_loop import Model
from s3server import S3Server
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.errors import CheckpointLockedError
from torchkeep.manager import manifest
from torchkeep.manager.manager import CheckpointSkippedWarning
from torchkeep.storage import open_run
from torchkeep.tree import flatten
from torchkeep.writer import Body, prepared

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

HELPER = Path(__file__).parent / "helpers" / "manager_save_loop.py"


def model_at(step: int) -> torch.nn.Linear:
    torch.manual_seed(step)
    return torch.nn.Linear(16, 4)


def objects(url: str, **options: object) -> set[str]:
    """Object names directly under ``url``, listed fresh (no cache)."""
    fs, root = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    try:
        return {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return set()


@pytest.fixture
def mem_run() -> Iterator[str]:
    url = f"memory://torchkeep-test-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


# -- memory:// (fsspec's in-memory file system: non-atomic writes, like a plain object store) ------


def test_memory_run_retention_best_restart_restore(mem_run: str) -> None:
    accs = [0.5, 0.9, 0.6, 0.7, 0.65]
    with tk.CheckpointManager(mem_run, keep_last=2, keep_best=1, monitor="acc") as mgr:
        for step, acc in enumerate(accs):
            info = mgr.save({"m": model_at(step)}, step=step, metrics={"acc": acc})
            assert info.path == f"{mem_run}/ckpt_{step:06d}.safetensors"
        assert [c.step for c in mgr.checkpoints()] == [1, 3, 4]
        assert mgr.best().step == 1 and mgr.latest().step == 4
        assert objects(mem_run) == {c.file for c in mgr.checkpoints()} | {"manifest.json", ".lock"}
    assert ".lock" not in objects(mem_run)
    doc = json.loads(fsspec.filesystem("memory").cat_file(f"{mem_run}/manifest.json"))
    assert doc["latest"] == "ckpt_000004.safetensors" and doc["best"] == "ckpt_000001.safetensors"
    with tk.CheckpointManager(mem_run, keep_last=2, keep_best=1, monitor="acc") as mgr:
        assert [c.step for c in mgr.checkpoints()] == [1, 3, 4]
        fresh = torch.nn.Linear(16, 4)
        assert mgr.restore({"m": fresh}, step="best").step == 1
        assert torch.equal(fresh.weight, model_at(1).weight) and torch.equal(fresh.bias, model_at(1).bias)
        assert mgr.restore({"m": fresh}).step == 4
        assert torch.equal(fresh.weight, model_at(4).weight)


def test_objects_no_manifest_names_are_never_visible(mem_run: str) -> None:
    """A killed save leaves an object without a manifest entry: never listed, restored or kept."""
    with tk.CheckpointManager(mem_run) as mgr:
        mgr.save({"m": model_at(0)}, step=0)
    store = open_run(mem_run)
    # what a save killed between its upload and the manifest write leaves: a whole object with our record
    orphan = "ckpt_000001.safetensors"
    info = manifest.CheckpointInfo(orphan, store.path_of(orphan), 1, {}, 0, time.time(), "")
    tensors, meta = prepared(flatten({"m": model_at(1)}), {manifest.META_KEY: manifest.record_of(info)})
    store.put(orphan, Body(tensors, meta), durable=True)
    # what a killed upload leaves on a store without atomic uploads: a cut-off object
    fs = fsspec.filesystem("memory")
    whole = fs.cat_file(f"{mem_run}/ckpt_000000.safetensors")
    fs.pipe_file(f"{mem_run}/ckpt_000002.safetensors", whole[:40])
    fs.pipe_file(f"{mem_run}/notes.txt", b"mine")  # not the manager's
    with tk.CheckpointManager(mem_run) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [0]
        fresh = torch.nn.Linear(16, 4)
        assert mgr.restore({"m": fresh}, strict=True).step == 0
        assert torch.equal(fresh.weight, model_at(0).weight)
        # the orphan carried the manager's record: removed; the rest is not the manager's to delete
        assert objects(mem_run) == {"ckpt_000000.safetensors", "ckpt_000002.safetensors", "notes.txt"} | {
            "manifest.json",
            ".lock",
        }
        # the next save does not overwrite the object it did not write
        assert mgr.save({"m": model_at(2)}, step=2).file == "ckpt_000002-v1.safetensors"
    assert fs.cat_file(f"{mem_run}/notes.txt") == b"mine"


def test_failed_manifest_write_commits_nothing(mem_run: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = tk.CheckpointManager(mem_run, keep_last=1)
    mgr.save({"m": model_at(0)}, step=0)
    real = type(mgr._store).write

    def broken(self: object, name: str, data: bytes, *, durable: bool) -> None:
        if name == manifest.MANIFEST:
            raise OSError(5, "Input/output error")
        real(self, name, data, durable=durable)

    monkeypatch.setattr(type(mgr._store), "write", broken)
    with pytest.raises(OSError, match="Input/output"):
        mgr.save({"m": model_at(1)}, step=1)
    monkeypatch.undo()
    assert [c.step for c in mgr.checkpoints()] == [0]
    assert objects(mem_run) == {"ckpt_000000.safetensors", "manifest.json", ".lock"}
    mgr.close()
    with tk.CheckpointManager(mem_run) as mgr:
        assert mgr.latest().step == 0


def test_corrupt_object_falls_back(mem_run: str) -> None:
    with tk.CheckpointManager(mem_run) as mgr:
        mgr.save({"m": model_at(0)}, step=0)
        mgr.save({"m": model_at(1)}, step=1)
    fs = fsspec.filesystem("memory")
    path = f"{mem_run}/ckpt_000001.safetensors"
    data = bytearray(fs.cat_file(path))
    data[-3] ^= 0x10
    fs.pipe_file(path, bytes(data))
    with tk.CheckpointManager(mem_run) as mgr:
        fresh = torch.nn.Linear(16, 4)
        with pytest.warns(CheckpointSkippedWarning, match="ckpt_000001.*falling back to ckpt_000000"):
            assert mgr.restore({"m": fresh}).step == 0
        assert torch.equal(fresh.weight, model_at(0).weight)
        with pytest.raises(tk.errors.ChecksumMismatchError):
            mgr.restore({"m": fresh}, strict=True)


def test_remote_lock(mem_run: str) -> None:
    fs = fsspec.filesystem("memory")
    with tk.CheckpointManager(mem_run):
        with pytest.raises(CheckpointLockedError) as e:
            tk.CheckpointManager(mem_run)
        assert e.value.pid == os.getpid() and e.value.host is not None and ".lock" in str(e.value)
    # a lock left by a process of this host that is gone is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs.pipe_file(f"{mem_run}/.lock", json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "x"}).encode())
    with pytest.warns(UserWarning, match=f"taking over the lock of process {dead.pid}"):
        tk.CheckpointManager(mem_run).close()
    # one held on another host cannot be checked: refused, with the way out
    fs.pipe_file(f"{mem_run}/.lock", json.dumps({"host": "node-7", "pid": 1234, "token": "y"}).encode())
    with pytest.raises(CheckpointLockedError, match=r"process 1234 on host node-7.*delete .*/\.lock"):
        tk.CheckpointManager(mem_run)


def test_async_save_to_object_store(mem_run: str) -> None:
    model = model_at(0)
    with tk.CheckpointManager(mem_run, async_save=True) as mgr:
        mgr.save({"m": model}, step=0)
        snapshot = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)  # after save() returned: must not reach the checkpoint
        mgr.wait()
        fresh = torch.nn.Linear(16, 4)
        mgr.restore({"m": fresh})
        assert torch.equal(fresh.weight, snapshot)


def test_storage_options_on_a_local_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_options is for fsspec URLs"):
        tk.CheckpointManager(tmp_path, storage_options={"anon": True})


def test_file_url_is_the_local_run(tmp_path: Path) -> None:
    with tk.CheckpointManager(f"file://{tmp_path}") as mgr:
        assert mgr.directory == tmp_path and mgr.save({"m": model_at(0)}).path == tmp_path / "ckpt_000000.safetensors"


def test_cli_ls_and_prune_on_a_url(mem_run: str) -> None:
    with tk.CheckpointManager(mem_run) as mgr:
        for step in range(3):
            mgr.save({"m": model_at(step)}, step=step, metrics={"loss": 1.0 / (step + 1)})
    out = CliRunner().invoke(app, ["ls", mem_run, "--verify", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)["checkpoints"]
    assert [r["step"] for r in rows] == [0, 1, 2] and {r["verify"] for r in rows} == {"ok"}
    out = CliRunner().invoke(app, ["prune", mem_run, "--keep-last", "1", "--yes"])
    assert out.exit_code == 0 and "deleted 2 checkpoint(s)" in out.output
    assert objects(mem_run) == {"ckpt_000002.safetensors", "manifest.json"}
    out = CliRunner().invoke(app, ["ls", f"{mem_run}-missing"])
    assert out.exit_code == 2 and "no such checkpoint" in out.output


# -- a real S3-compatible server on 127.0.0.1 ----------------------------------------------------


def test_s3_save_retention_restore(s3: S3Server) -> None:
    run = s3.bucket("retention") + "/exp1"
    with tk.CheckpointManager(run, keep_last=2, storage_options=s3.options) as mgr:
        for step in range(4):
            mgr.save({"m": model_at(step), "epoch": step}, step=step)
        assert [c.step for c in mgr.checkpoints()] == [2, 3]
        assert mgr.latest().path == f"{run}/ckpt_000003.safetensors" and mgr.latest().size > 0
    assert objects(run, **s3.options) == {"ckpt_000002.safetensors", "ckpt_000003.safetensors", "manifest.json"}
    with tk.CheckpointManager(run, keep_last=2, storage_options=s3.options) as mgr:
        fresh = torch.nn.Linear(16, 4)
        assert mgr.restore({"m": fresh}).step == 3
        assert torch.equal(fresh.weight, model_at(3).weight) and torch.equal(fresh.bias, model_at(3).bias)


def test_s3_cli_reads_the_standard_aws_settings(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    run = s3.bucket("cli") + "/exp"
    with tk.CheckpointManager(run, storage_options=s3.options) as mgr:
        mgr.save({"m": model_at(0)}, step=0, metrics={"acc": 0.5})
    for k, v in s3.env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    out = CliRunner().invoke(app, ["ls", run, "--verify"])
    assert out.exit_code == 0, out.output
    assert "ckpt_000000.safetensors" in out.output and "acc=0.5" in out.output and "ok" in out.output


@pytest.mark.slow
def test_s3_killed_upload_leaves_no_visible_checkpoint(s3: S3Server) -> None:
    """SIGKILL a process saving 8 MB checkpoints (multipart uploads) to S3 at random moments."""
    run = s3.bucket("kills") + "/run"
    numel = 2_000_000  # 8 MB: two 5 MiB parts
    env = {
        **s3.env,
        "FSSPEC_S3_DEFAULT_BLOCK_SIZE": str(5 << 20),
        "PYTHONPATH": os.pathsep.join([str(HELPER.parent), os.environ.get("PYTHONPATH", "")]),
    }
    rng = random.Random(7)
    client = s3.client()

    def uploads() -> list[object]:
        return client.list_multipart_uploads(Bucket="kills").get("Uploads", [])

    with ForkClient(HELPER, run, numel, env=env) as server:
        last_step, progressed, mid_upload, kills = -1, 0, 0, 0
        deadline = time.monotonic() + 90  # a loaded machine saves slower: kill on until both were seen
        while kills < 6 or ((progressed < 2 or not mid_upload) and time.monotonic() < deadline):
            kills += 1
            pid = int(server.ask("fork").split()[1])
            time.sleep(rng.uniform(0.5, 2.5))
            os.kill(pid, signal.SIGKILL)
            assert server.ask(f"reap {pid}") in ("signal 9", "exit 0"), "child failed"
            mid_upload += bool(uploads())  # killed during a multipart upload: parts sent, never completed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the dead child's lock is taken over, with a warning
                mgr = tk.CheckpointManager(run, keep_last=3, storage_options=s3.options)
            assert not uploads(), "the unfinished upload was not aborted"
            with mgr:
                steps = [c.step for c in mgr.checkpoints()]
                listed = {c.file for c in mgr.checkpoints()}
                # only committed checkpoints are in the bucket (the killed one's leftover is gone)
                assert objects(run, **s3.options) - {"manifest.json", ".lock"} == listed
                model = Model(numel)
                info = mgr.restore({"model": model}, strict=True)
                if info is None:
                    continue
                assert info.step == max(steps) >= last_step and model.step_of() == info.step
                progressed += info.step > last_step
                last_step = info.step
        assert progressed >= 2, f"only {progressed} of {kills} kills made progress"
        assert mid_upload >= 1, f"none of {kills} kills landed during an upload"


def test_two_openers_racing_for_the_lock_cannot_both_hold_it(mem_run: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchkeep.storage.remote import RemoteRun

    a, b = RemoteRun(mem_run, {}), RemoteRun(mem_run, {})
    a.lock()
    # b looked before a created the lock, so it saw none: the exclusive create still refuses it
    real_read = RemoteRun.read
    monkeypatch.setattr(
        RemoteRun, "read", lambda self, name: None if self is b and name == ".lock" else real_read(self, name)
    )
    with pytest.raises(CheckpointLockedError):
        b.lock()
    monkeypatch.undo()
    assert json.loads(fsspec.filesystem("memory").cat_file(f"{mem_run}/.lock"))["token"] == a._token
    a.write("manifest.json", b"{}", durable=True)  # still a's lock
    # a lock overwritten behind a's back (e.g. deleted by hand and taken): a stops writing its manifest
    fsspec.filesystem("memory").pipe_file(
        f"{mem_run}/.lock", json.dumps({"host": "node-2", "pid": 7, "token": "z"}).encode()
    )
    with pytest.raises(CheckpointLockedError, match="node-2"):
        a.write("manifest.json", b"{}", durable=True)
