"""CheckpointManager: retention, restart, manifest rebuild, fallback, locking, kills and full disks."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from forkserver import ForkClient
from manager_save_loop import Model

import torchkeep as tk
from torchkeep.errors import (
    CheckpointLockedError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    MissingFilenameFieldError,
    TorchkeepError,
)
from torchkeep.manager import CheckpointSkippedWarning
from torchkeep.manager.retention import AnyOf, BestN, EveryN, LatestN

HELPER = Path(__file__).parent / "helpers" / "manager_save_loop.py"
ACCS = [0.1, 0.5, 0.3, 0.9, 0.2, 0.8, float("nan"), 0.4, 0.6, 0.7, 0.85, 0.05]


def model_at(step: int, n: int = 8) -> torch.nn.Linear:
    torch.manual_seed(step)
    return torch.nn.Linear(n, 2)


def ckpt_files(run: Path) -> set[str]:
    return {n for n in os.listdir(run) if n.endswith(".safetensors") and not os.path.islink(os.path.join(run, n))}


def expected_kept(n: int, keep_last: int, keep_best: int, keep_every: int) -> set[int]:
    recs: list[SimpleNamespace] = []
    for s in range(n):
        recs.append(SimpleNamespace(step=s, metrics={"acc": ACCS[s]}, created=float(s)))
        policy = AnyOf(LatestN(1), LatestN(keep_last), BestN(keep_best, "acc", "max"), EveryN(keep_every))
        recs = [r for i, r in enumerate(recs) if i in policy.keep(recs)]
    return {r.step for r in recs}


def test_save_list_best_latest_and_retention(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tk.CheckpointManager(run, keep_last=2, keep_best=2, monitor="acc", keep_every=5) as mgr:
        assert mgr.latest() is None and mgr.best() is None and mgr.checkpoints() == []
        for s in range(len(ACCS)):
            info = mgr.save({"model": model_at(s), "epoch": s}, step=s, metrics={"acc": ACCS[s]})
            assert info.step == s and info.path == run / info.file and info.size == info.path.stat().st_size
            assert len(info.digest) == 64 and info.created > 0
        steps = {c.step for c in mgr.checkpoints()}
        assert steps == expected_kept(len(ACCS), 2, 2, 5) == {0, 3, 5, 10, 11}
        assert ckpt_files(run) == {c.file for c in mgr.checkpoints()}
        assert mgr.latest().step == 11 and mgr.best().step == 3
        assert mgr.latest().metrics == {"acc": 0.05}
    doc = json.loads((run / "manifest.json").read_text())
    assert (
        doc["version"] == 1 and doc["latest"] == "ckpt_000011.safetensors" and doc["best"] == "ckpt_000003.safetensors"
    )
    assert [e["step"] for e in doc["entries"]] == [0, 3, 5, 10, 11]


def test_naming_context_collisions_and_missing_fields(tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path, filename="{model}_e{epoch}_acc{val/acc:.2f}") as mgr:
        ctx = {"model": "vgg16", "epoch": 100}
        a = mgr.save({"w": torch.ones(2)}, step=100, metrics={"val/acc": 0.8512}, context=ctx)
        b = mgr.save({"w": torch.ones(2)}, step=100, metrics={"val/acc": torch.tensor(0.851)}, context=ctx)
        assert (a.file, b.file) == ("vgg16_e100_acc0.85.safetensors", "vgg16_e100_acc0.85-v1.safetensors")
        with pytest.raises(MissingFilenameFieldError, match="epoch"):
            mgr.save({"w": torch.ones(2)}, step=1, context={"model": "m"})
        assert len(mgr.checkpoints()) == 2
        assert mgr.save({"w": torch.ones(1)}, metrics={"val/acc": 1}, context=ctx).step == 101  # default step


def test_restart_keeps_latest_best_and_retention(tmp_path: Path) -> None:
    kw = {"keep_last": 2, "keep_best": 2, "monitor": "acc", "keep_every": 5}
    with tk.CheckpointManager(tmp_path, **kw) as mgr:
        for s in range(6):
            mgr.save({"m": model_at(s)}, step=s, metrics={"acc": ACCS[s]})
        before = [(c.file, c.step, c.digest) for c in mgr.checkpoints()]
        latest, best = mgr.latest(), mgr.best()
    with tk.CheckpointManager(tmp_path, **kw) as mgr:
        assert [(c.file, c.step, c.digest) for c in mgr.checkpoints()] == before
        assert mgr.latest() == latest and mgr.best() == best
        for s in range(6, len(ACCS)):
            mgr.save({"m": model_at(s)}, step=s, metrics={"acc": ACCS[s]})
        assert {c.step for c in mgr.checkpoints()} == expected_kept(len(ACCS), 2, 2, 5)
        m = model_at(99)
        assert mgr.restore({"m": m}, step="best").step == 3
        assert torch.equal(m.weight, model_at(3).weight)


@pytest.mark.parametrize("damage", ["delete", "garbage", "wrong_version"])
def test_manifest_rebuilt(tmp_path: Path, damage: str) -> None:
    with tk.CheckpointManager(tmp_path, keep_last=3, monitor="acc") as mgr:
        for s in range(5):
            mgr.save({"m": model_at(s)}, step=s, metrics={"acc": ACCS[s]})
        before = mgr.checkpoints()
    man = tmp_path / "manifest.json"
    if damage == "delete":
        man.unlink()
    elif damage == "garbage":
        man.write_bytes(b'{"version": 1, "entr')
    else:
        man.write_text('{"version": 99, "entries": []}')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mgr = tk.CheckpointManager(tmp_path, keep_last=3, monitor="acc")
    assert (damage != "delete") == any("rebuilding" in str(x.message) for x in w)
    with mgr:
        assert mgr.checkpoints() == before
        assert mgr.best().step == 3 and mgr.latest().step == 4
        assert json.loads(man.read_text())["latest"] == "ckpt_000004.safetensors"


def test_crash_between_commit_and_manifest_adopts_file(tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path, keep_last=2) as mgr:
        mgr.save({"m": model_at(0)}, step=0)
        old = (tmp_path / "manifest.json").read_bytes()
        mgr.save({"m": model_at(1)}, step=1)
    (tmp_path / "manifest.json").write_bytes(old)  # as if killed before the manifest write
    with tk.CheckpointManager(tmp_path, keep_last=2) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [0, 1]
        mgr.save({"m": model_at(2)}, step=2)
        assert [c.step for c in mgr.checkpoints()] == [1, 2]


def test_foreign_files_never_deleted(tmp_path: Path) -> None:
    tk.save({"x": torch.ones(2)}, tmp_path / "ckpt_000001.safetensors")  # our naming, not our file
    tk.save({"x": torch.ones(2)}, tmp_path / "pretrained.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".notes.txt.tmp-abcdef").write_text("someone else's temp")
    with tk.CheckpointManager(tmp_path, keep_last=1) as mgr:
        assert mgr.checkpoints() == []
        for s in range(4):
            info = mgr.save({"m": model_at(s)}, step=s)
        assert info.file == "ckpt_000003.safetensors"
        assert [c.file for c in mgr.checkpoints()] == ["ckpt_000003.safetensors"]
    with tk.CheckpointManager(tmp_path) as mgr:  # manifest rebuilt: foreign files still not adopted
        (tmp_path / "manifest.json").unlink()
    with tk.CheckpointManager(tmp_path, keep_last=1) as mgr:
        assert [c.file for c in mgr.checkpoints()] == ["ckpt_000003.safetensors"]
        mgr.save({"m": model_at(9)}, step=9)
    names = set(os.listdir(tmp_path))
    assert {"ckpt_000001.safetensors", "pretrained.safetensors", "notes.txt", ".notes.txt.tmp-abcdef"} <= names
    assert tk.load(tmp_path / "ckpt_000001.safetensors")["x"].tolist() == [1.0, 1.0]


def test_leftover_temps_cleaned(tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save({"m": model_at(0)}, step=0)
    ours = [".ckpt_000001.safetensors.tmp-0123456789ab", ".manifest.json.tmp-abcdef012345"]
    theirs = [".other.safetensors.tmp-0123456789ab", ".ckpt_000001.pt.tmp-0123456789ab"]
    for n in ours + theirs:
        (tmp_path / n).write_bytes(b"partial")
    with tk.CheckpointManager(tmp_path):
        pass
    names = set(os.listdir(tmp_path))
    assert not names & set(ours) and set(theirs) <= names


def corrupt(path: Path, how: str) -> None:
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - 40)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_restore_falls_back_past_corrupt_newest(tmp_path: Path, how: str) -> None:
    with tk.CheckpointManager(tmp_path, keep_last=3) as mgr:
        assert mgr.restore({"m": model_at(0)}) is None  # fresh run
        for s in range(3):
            mgr.save({"m": model_at(s), "step": s}, step=s)
        corrupt(mgr.latest().path, how)
        m = model_at(99)
        with pytest.warns(CheckpointSkippedWarning, match=r"ckpt_000002\.safetensors.*falling back to ckpt_000001"):
            info = mgr.restore({"m": m})
        assert info.step == 1 and torch.equal(m.weight, model_at(1).weight)
        m = model_at(99)
        with pytest.raises(CorruptCheckpointError) as err:
            mgr.restore({"m": m}, strict=True)
        if how == "flip":  # read straight into the target, refused before restore returns: it says so
            assert "partly overwritten; restore another checkpoint" in str(err.value)
        else:  # a truncated file is refused before any target is touched
            assert torch.equal(m.weight, model_at(99).weight)
        with pytest.raises(CorruptCheckpointError):
            mgr.restore({"m": m}, step=2)
        assert mgr.restore({"m": m}, step=0).step == 0
        assert torch.equal(m.weight, model_at(0).weight)  # the fallback overwrites the target fully
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore({"m": m}, step=7)
        for c in mgr.checkpoints()[:2]:
            corrupt(c.path, "flip")
        with pytest.warns(CheckpointSkippedWarning), pytest.raises(CorruptCheckpointError, match="none of its"):
            mgr.restore({"m": m})


def test_insufficient_space_checked_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with tk.CheckpointManager(tmp_path, keep_last=5) as mgr:
        mgr.save({"w": torch.zeros(1000)}, step=0)
        before = set(os.listdir(tmp_path)), (tmp_path / "manifest.json").read_bytes()
        fake = SimpleNamespace(f_bavail=2, f_frsize=4096)
        monkeypatch.setattr(os, "statvfs", lambda p: fake)
        with pytest.raises(InsufficientSpaceError) as ei:
            mgr.save({"w": torch.zeros(100_000)}, step=1)
        e = ei.value
        assert isinstance(e, OSError) and e.errno == errno.ENOSPC
        assert e.available == 8192 and e.needed >= 400_000 and str(tmp_path) in str(e) and str(e.needed) in str(e)
        assert (set(os.listdir(tmp_path)), (tmp_path / "manifest.json").read_bytes()) == before
        monkeypatch.undo()
        assert mgr.save({"w": torch.zeros(10)}, step=1).step == 1


FULL_DISK = textwrap.dedent(
    """
    import hashlib, json, os, resource, signal, sys
    import torch, torchkeep as tk
    run = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
    mgr = tk.CheckpointManager(run, keep_last=2)
    for s in range(3):
        mgr.save({"w": torch.full((1000,), float(s))}, step=s)
    man = open(os.path.join(run, "manifest.json"), "rb").read()
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    out = {"manifest": hashlib.sha256(man).hexdigest()}
    try:
        mgr.save({"w": torch.zeros(250_000)}, step=3)
        out["error"] = None
    except OSError as e:
        out.update(error=type(e).__name__, errno=e.errno, msg=str(e), isoserror=isinstance(e, OSError))
    out["after"] = [c.step for c in mgr.checkpoints()]
    mgr.save({"w": torch.full((10,), 4.0)}, step=4)  # small saves still work
    out["final"] = [c.step for c in mgr.checkpoints()]
    print(json.dumps(out))
    """
)


def test_full_disk_write_fails_cleanly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(run)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"] == "InsufficientSpaceError" and out["errno"] in (errno.EFBIG, errno.ENOSPC)
    needed = int(re.search(r"about (\d+) bytes", out["msg"])[1])
    assert str(run) in out["msg"] and needed >= 1_000_000 and ("EFBIG" in out["msg"] or "ENOSPC" in out["msg"])
    assert out["after"] == [1, 2] and out["final"] == [2, 4]
    assert not [n for n in os.listdir(run) if ".tmp-" in n]
    with tk.CheckpointManager(run) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [2, 4]
        for c in mgr.checkpoints():
            with tk.open(c.path) as ck:
                ck.verify_all()


def test_lock_contention_and_stale_lock(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text("999999999\n")  # left by a dead process: no flock held on it
    mgr = tk.CheckpointManager(tmp_path)
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(CheckpointLockedError) as ei:
        tk.CheckpointManager(tmp_path)
    assert ei.value.pid == os.getpid() and str(os.getpid()) in str(ei.value)
    # another process too
    code = f"import torchkeep as tk\ntry:\n tk.CheckpointManager({str(tmp_path)!r})\nexcept tk.errors.CheckpointLockedError as e:\n print(e.pid)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == str(os.getpid()), r.stderr
    mgr.close()
    mgr.close()
    with pytest.raises(RuntimeError, match="closed"):
        mgr.save({"w": torch.ones(1)}, step=0)
    with tk.CheckpointManager(tmp_path) as again:
        again.save({"w": torch.ones(1)}, step=0)


def test_reader_during_retention_deletes(tmp_path: Path) -> None:
    mgr = tk.CheckpointManager(tmp_path, keep_last=1)
    mgr.save({"m": model_at(0)}, step=0)
    stop = threading.Event()
    outcomes = {"ok": 0, "clean_error": 0}
    bad: list[BaseException] = []

    def reader() -> None:
        m = torch.nn.Linear(8, 2)
        while not stop.is_set():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if random.random() < 0.5:
                        mgr.restore({"m": m})
                    else:  # a reader that only sees the manifest on disk
                        doc = json.loads((tmp_path / "manifest.json").read_text())
                        tk.restore(tmp_path / doc["latest"], {"m": m})
                outcomes["ok"] += 1
            except TorchkeepError:
                outcomes["clean_error"] += 1
            except BaseException as e:  # anything else is a crash on half a file
                bad.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for s in range(1, 40):
            mgr.save({"m": model_at(s)}, step=s)
    finally:
        stop.set()
        for t in threads:
            t.join()
        mgr.close()
    assert not bad, bad
    assert outcomes["ok"] > 0


def test_sigkill_loop(tmp_path: Path) -> None:
    """Kill a saving process at random moments; every reopen restores the newest complete checkpoint."""
    run = tmp_path / "run"
    numel = 50_000  # 200 KB
    rng = random.Random(1234)
    with ForkClient(HELPER, run, numel) as server:
        last_step = -1
        kills = progressed = 0
        t0 = time.monotonic()
        while kills < 30 or (progressed < 10 and time.monotonic() - t0 < 20):
            pid = int(server.ask("fork").split()[1])
            time.sleep(rng.uniform(0.0, 0.12))
            os.kill(pid, signal.SIGKILL)
            assert server.ask(f"reap {pid}") in ("signal 9", "exit 0"), "child failed"
            kills += 1
            with tk.CheckpointManager(run, keep_last=3) as mgr:
                assert not [n for n in os.listdir(run) if ".tmp-" in n]
                files = {n for n in os.listdir(run) if n.endswith(".safetensors") and n != "last.safetensors"}
                steps = [c.step for c in mgr.checkpoints()]
                assert {c.file for c in mgr.checkpoints()} == files and steps == sorted(steps)
                if files:  # the stable path names the newest committed checkpoint, even after a kill
                    assert os.readlink(run / "last.safetensors") == mgr.checkpoints()[-1].file
                model = Model(numel)
                info = mgr.restore({"model": model}, strict=True)
                if info is None:
                    assert last_step == -1 and not files
                    continue
                assert info.step == max(steps) >= last_step and model.step_of() == info.step
                progressed += info.step > last_step
                last_step = info.step
        print(f"{kills} kills, {progressed} with progress, last step {last_step}")
        assert progressed >= 5, f"only {progressed} of {kills} kills made progress"


# -- typed argument errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"mode": "maximum"}, "mode"),
        ({"keep_best": 2}, "monitor"),
        ({"keep_last": -1}, "keep_last"),
        ({"keep_best": 1.5, "monitor": "acc"}, "keep_best"),
        ({"keep_every": True}, "keep_every"),
        ({"keep_within": "1 day"}, "keep_within"),
        ({"keep_within": -5.0}, "keep_within"),
    ],
)
def test_bad_manager_options_are_typed_value_errors(tmp_path: Path, kwargs: dict, argument: str) -> None:
    with pytest.raises(tk.errors.InvalidArgumentError) as info:
        tk.CheckpointManager(tmp_path, **kwargs)
    err = info.value
    assert isinstance(err, ValueError) and err.argument == argument and str(err).startswith(f"{argument}=")
    assert not (tmp_path / ".lock").exists()  # refused before the run directory was touched


def test_bad_save_and_restore_steps_are_typed_errors(tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(tk.errors.ArgumentTypeError, match="step must be an int") as info:
            mgr.save({"w": torch.ones(1)}, step="3")  # type: ignore[arg-type]
        assert isinstance(info.value, TypeError)
        mgr.save({"w": torch.ones(1)}, step=0)
        with pytest.raises(tk.errors.InvalidArgumentError, match="needs a monitored metric") as info:
            mgr.restore({"w": torch.zeros(1)}, step="best")
        assert isinstance(info.value, ValueError) and info.value.argument == "step"
        with pytest.raises(tk.errors.InvalidArgumentError, match=r"step='newest': pass None or \"latest\""):
            mgr.restore({"w": torch.zeros(1)}, step="newest")


def test_a_closed_manager_raises_a_typed_runtime_error(tmp_path: Path) -> None:
    mgr = tk.CheckpointManager(tmp_path)
    mgr.close()
    for call in (lambda: mgr.save({"w": torch.ones(1)}, step=0), lambda: mgr.prune()):
        with pytest.raises(tk.errors.ManagerClosedError) as info:
            call()
        err = info.value
        assert isinstance(err, RuntimeError) and isinstance(err, TorchkeepError)
        assert err.directory == str(mgr.directory) and "closed" in str(err) and "tk.CheckpointManager(" in str(err)
