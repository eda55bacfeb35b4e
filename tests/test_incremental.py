"""Incremental checkpoints: what did not change since the previous save is a hard link, not a write,
and every checkpoint stays an ordinary sharded checkpoint that every reader opens."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from forkserver import ForkClient
from manager_save_loop import FrozenBaseModel as LoopModel
from safetensors import safe_open
from typer.testing import CliRunner

import torchkeep as tk
from torchkeep.cli import app
from torchkeep.errors import CorruptCheckpointError, InvalidArgumentError
from torchkeep.manager import incremental
from torchkeep.manager.shardset import SHARDS_KEY, physical_sizes

HELPER = Path(__file__).parent / "helpers" / "manager_save_loop.py"
runner = CliRunner()


class Lora(torch.nn.Module):
    """A frozen base of ``layers`` square linear layers with a trainable low-rank adapter on each."""

    def __init__(self, dim: int = 256, layers: int = 4, rank: int = 2) -> None:
        super().__init__()
        self.base = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers)).requires_grad_(False)
        self.down = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(rank, dim) * 0.01) for _ in range(layers))
        self.up = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(dim, rank) * 0.01) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, d, u in zip(self.base, self.down, self.up, strict=True):
            x = torch.tanh(lin(x) + x @ d.T @ u.T)
        return x


def _train_step(model: Lora, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(8, model.base[0].in_features)).pow(2).mean().backward()
    opt.step()


def _inodes(d: Path) -> dict[str, int]:
    return {f.name: f.stat().st_ino for f in d.iterdir() if f.name.endswith(".safetensors")}


def _run_bytes(run: Path) -> int:
    seen: dict[int, int] = {}
    for d in run.iterdir():
        if d.is_dir() and not d.is_symlink():
            for f in d.iterdir():
                seen[f.stat().st_ino] = f.stat().st_size
    return sum(seen.values())


def _nbytes(tensors: object) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)  # type: ignore[attr-defined]


def test_lora_run_in_miniature_stores_the_base_once_and_writes_one_shard_per_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Lora()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    base = _nbytes(model.base.parameters())
    run = tmp_path / "run"
    written: list[int] = []
    before: set[int] = set()
    with tk.CheckpointManager(run, keep_last=5, incremental=True) as mgr:
        for step in range(20):
            _train_step(model, opt)
            info = mgr.save({"model": model, "optimizer": opt}, step=step)
            inodes = set(_inodes(run / info.file).values())
            written.append(len(inodes - before))  # shard files not in the previous checkpoint
            before = inodes
        assert [c.step for c in mgr.checkpoints()] == list(range(15, 20))
    # the first save writes the frozen base and the adapter + Adam state apart; each later save one shard
    assert written[0] == 2 and written[1:] == [1] * 19, written
    adapter_state = sum(
        (run / "ckpt_000019.shards" / n).stat().st_size
        for n in _inodes(run / "ckpt_000019.shards")
        if (run / "ckpt_000019.shards" / n).stat().st_nlink == 1
    )
    assert adapter_state < base / 10
    assert _run_bytes(run) <= 1.1 * (base + 5 * adapter_state)
    got = tk.load(run / "ckpt_000019.shards")
    for k, v in model.state_dict().items():
        assert torch.equal(got["model"][k], v), k
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # ls: the logical size counts the base in each checkpoint, the physical once
    out = runner.invoke(app, ["ls", str(run), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["physical"] == _run_bytes(run)
    assert doc["size"] > 3 * doc["physical"] and doc["checkpoints"][0]["physical"] > base
    assert all(c["physical"] < base / 10 for c in doc["checkpoints"][1:])
    human = runner.invoke(app, ["ls", str(run)])
    assert human.exit_code == 0 and "on disk" in human.output


def _hashed_per_save(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The tensor names each save hashes before writing (to decide what to link)."""
    calls: list[list[str]] = []
    original = incremental._hash

    def spy(tensors: object, names: list[str]) -> object:
        calls.append(list(names))
        return original(tensors, names)  # type: ignore[arg-type]

    monkeypatch.setattr(incremental, "_hash", spy)
    return calls


def test_lora_later_saves_hash_only_the_frozen_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Lora()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hashed = _hashed_per_save(monkeypatch)
    with tk.CheckpointManager(tmp_path / "run", incremental=True) as mgr:
        for step in range(3):
            _train_step(model, opt)
            mgr.save({"model": model, "optimizer": opt}, step=step)
    base = {f"model/base.{n}" for n, _ in model.base.named_parameters()}
    # the first save links nothing and hashes nothing first; later ones hash the base (to link it) and
    # write the adapter and its Adam state hashed as they are written
    assert len(hashed) == 2 and all(set(h) == base for h in hashed), hashed


def test_full_fine_tuning_hashes_nothing_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hashed = _hashed_per_save(monkeypatch)
    run = tmp_path / "run"
    with tk.CheckpointManager(run, incremental=True) as mgr:
        for step in range(4):
            opt.zero_grad()
            model(torch.randn(4, 32)).sum().backward()
            opt.step()
            info = mgr.save({"model": model, "optimizer": opt, "step": step}, step=step)
    # every tensor changes every save: save 2 hashes the optimizer state it had no guess for (it
    # changed), then nothing is hashed before writing; nothing is linked, and each checkpoint loads
    assert [len(h) for h in hashed[1:]] == [0, 0], hashed
    assert not set(_inodes(run / "ckpt_000002.shards").values()) & set(_inodes(run / info.file).values())
    fresh = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    tk.restore(run / info.file, {"model": fresh})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


def test_a_tensor_that_stops_changing_is_linked_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 64).requires_grad_(False)
    head = torch.nn.Linear(64, 4)
    run = tmp_path / "run"
    with tk.CheckpointManager(run, incremental=True) as mgr:
        infos = []
        for step in range(4):
            if step < 2:
                with torch.no_grad():
                    head.weight.add_(1.0)  # trained for two saves, then frozen
            infos.append(mgr.save({"base": base, "head": head}, step=step))
    shared = [
        len(set(_inodes(run / a.file).values()) & set(_inodes(run / b.file).values()))
        for a, b in itertools.pairwise(infos)
    ]
    # save 2 links the base; save 3 too, and writes the head's weight again (guessed changed: it finds it
    # unchanged) apart from its bias (found unchanged by save 2, so hashed, equal: moved to a shard of
    # its own); save 4 links all three shards
    assert shared == [1, 1, 3], shared
    assert len(_inodes(run / infos[-1].file)) == 3
    assert tk.verify(run / infos[-1].file)["ok"]


def test_every_reader_opens_an_incremental_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Lora(dim=64, layers=2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    run = tmp_path / "run"
    with tk.CheckpointManager(run, incremental=True) as mgr:
        for step in range(2):
            _train_step(model, opt)
            mgr.save({"model": model, "optimizer": opt, "epoch": step}, step=step)
    ck = run / "ckpt_000001.shards"
    assert os.readlink(run / "last.shards") == ck.name
    assert tk.verify(ck)["ok"] and tk.verify(ck)["shards"] == 2
    assert tk.load(run / "last.shards")["epoch"] == 1
    fresh = Lora(dim=64, layers=2)
    report = tk.load_into(fresh, ck, key="model")
    assert not report.missing and all(
        torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True)
    )
    restored = Lora(dim=64, layers=2)
    tk.restore(ck, {"model": restored})
    assert torch.equal(restored.up[0], model.up[0])
    assert tk.inspect(ck)
    d = tk.diff(run / "ckpt_000000.shards", ck)
    assert d is not None
    out = tk.convert(ck, tmp_path / "one.safetensors")
    assert torch.equal(tk.load(out)["model"]["up.0"], model.up[0].detach())
    # any safetensors reader: the index's weight_map and each shard, no torchkeep code
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(str(ck / shard), "pt") as f:
            assert name in f.keys()
    assert set(index["metadata"][SHARDS_KEY]) == set(index["weight_map"].values())


def test_a_flipped_bit_in_a_shared_shard_is_reported_for_every_checkpoint_that_links_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Lora(dim=64, layers=2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    run = tmp_path / "run"
    with tk.CheckpointManager(run, incremental=True) as mgr:
        for step in range(3):
            _train_step(model, opt)
            mgr.save({"model": model, "optimizer": opt}, step=step)
    shared = max((run / "ckpt_000000.shards").glob("model-*.safetensors"), key=lambda p: p.stat().st_nlink)
    assert shared.stat().st_nlink == 3
    data = bytearray(shared.read_bytes())
    data[-3] ^= 0x10
    shared.write_bytes(data)  # in place: every link sees it
    for step in range(3):
        assert not tk.verify(run / f"ckpt_{step:06d}.shards")["ok"]
    out = runner.invoke(app, ["verify", str(run), "--json"])
    assert out.exit_code == 1, out.output
    rows = json.loads(out.output)["checkpoints"]
    assert [r["ok"] for r in rows] == [False] * 3
    assert all(shared.name in r["error"] for r in rows)
    assert [r["shared"] for r in rows] == [0, 1, 1]  # the shared shard was read once
    human = runner.invoke(app, ["verify", str(run)])
    assert human.exit_code == 1 and human.output.count("DAMAGED") == 3
    ls = runner.invoke(app, ["ls", str(run), "--verify", "--json"])
    assert ls.exit_code == 1 and all(r["verify"].startswith("DAMAGED") for r in json.loads(ls.output)["checkpoints"])
    with tk.CheckpointManager(run, incremental=True) as mgr, pytest.raises(CorruptCheckpointError):
        mgr.restore({"model": Lora(dim=64, layers=2)}, strict=True)


def test_verify_run_is_ok_on_an_intact_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = torch.nn.Linear(32, 32).requires_grad_(False)
    head = torch.nn.Linear(32, 2)
    with tk.CheckpointManager(run, incremental=True) as mgr:
        for step in range(3):
            with torch.no_grad():
                head.weight.add_(1)
            mgr.save({"base": base, "head": head}, step=step)
    out = runner.invoke(app, ["verify", str(run)])
    assert out.exit_code == 0, out.output
    assert "3 checkpoints, all intact" in out.output and "shared with an older checkpoint" in out.output


def test_retention_never_deletes_data_still_linked(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = torch.nn.Linear(64, 64).requires_grad_(False)
    head = torch.nn.Linear(64, 4)
    with tk.CheckpointManager(run, keep_last=1, incremental=True) as mgr:
        first = mgr.save({"base": base, "head": head}, step=0)
        base_ino = max((run / first.file).glob("model-*"), key=lambda p: p.stat().st_size).stat().st_ino
        for step in range(1, 6):
            with torch.no_grad():
                head.weight.add_(1)
            mgr.save({"base": base, "head": head}, step=step)
    left = [d for d in run.iterdir() if d.suffix == ".shards" and not d.is_symlink()]
    assert [d.name for d in left] == ["ckpt_000005.shards"]
    assert base_ino in _inodes(left[0]).values()  # the base written by the first save, still there
    got = tk.load(left[0])
    assert torch.equal(got["base"]["weight"], base.weight) and torch.equal(got["head"]["weight"], head.weight)
    assert all(f.stat().st_nlink == 1 for f in left[0].iterdir())


def test_without_links_shards_are_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(*a: object, **k: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(incremental.os, "link", no_links)
    run = tmp_path / "run"
    base = torch.nn.Linear(64, 64).requires_grad_(False)
    head = torch.nn.Linear(64, 4)
    with tk.CheckpointManager(run, incremental=True) as mgr:
        for step in range(2):
            mgr.save({"base": base, "head": head}, step=step)
    assert all(f.stat().st_nlink == 1 for d in run.glob("*.shards") for f in d.iterdir())
    assert tk.verify(run / "ckpt_000001.shards")["ok"]


def test_a_replaced_previous_shard_is_written_again_not_linked(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = torch.nn.Linear(64, 64).requires_grad_(False)
    head = torch.nn.Linear(64, 4)  # trainable but not trained: the second save finds it unchanged
    with tk.CheckpointManager(run, incremental=True) as mgr:
        mgr.save({"base": base, "head": head}, step=0)
        first = mgr.save({"base": base, "head": head}, step=1)
        shard = next(p for p in (run / first.file).iterdir() if p.name.startswith("model-00001"))
        data = bytearray(shard.read_bytes())
        data[20] ^= 1  # its header: no longer the file the index recorded
        shard.unlink()
        shard.write_bytes(data)
        second = mgr.save({"base": base, "head": head}, step=2)
    assert shard.stat().st_ino not in _inodes(run / second.file).values()  # written again
    assert len(set(_inodes(run / first.file).values()) & set(_inodes(run / second.file).values())) == 1  # the head
    assert tk.verify(run / second.file)["ok"]


def test_plain_state_dicts_converge_after_one_regrouping_save(tmp_path: Path) -> None:
    """Without modules (no requires_grad to read), the second save splits changed from unchanged tensors;
    from the third on, the unchanged ones are linked."""
    run = tmp_path / "run"
    frozen = {f"layer{i}.weight": torch.randn(128, 128) for i in range(4)}
    head = {"head.weight": torch.zeros(8, 128)}
    new = []
    before: set[int] = set()
    with tk.CheckpointManager(run, incremental=True) as mgr:
        for step in range(4):
            head["head.weight"] += 1
            info = mgr.save({"model": {**frozen, **head}}, step=step)
            inodes = set(_inodes(run / info.file).values())
            new.append(len(inodes - before))
            before = inodes
    assert new == [1, 2, 1, 1], new


def test_a_crash_leaves_temp_dirs_that_the_next_open_removes_and_committed_dirs_are_adopted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = torch.nn.Linear(16, 16).requires_grad_(False)
    with tk.CheckpointManager(run, incremental=True) as mgr:
        mgr.save({"base": base}, step=0)
        mgr.save({"base": base}, step=1)
    (run / ".ckpt_000002.shards.tmp-0123456789ab").mkdir()
    (run / ".ckpt_000002.shards.tmp-0123456789ab" / "model-00001-of-00001.safetensors").write_bytes(b"x")
    doc = json.loads((run / "manifest.json").read_text())
    doc["entries"] = doc["entries"][:1]  # a kill after the rename, before the manifest
    (run / "manifest.json").write_text(json.dumps(doc))
    with tk.CheckpointManager(run, incremental=True) as mgr:
        assert [c.file for c in mgr.checkpoints()] == ["ckpt_000000.shards", "ckpt_000001.shards"]
        assert mgr.checkpoints()[1].digest and not [n for n in os.listdir(run) if ".tmp-" in n]


def test_object_storage_falls_back_to_full_files_and_distributed_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    with pytest.warns(UserWarning, match="incremental=True needs a local run"):
        mgr = tk.CheckpointManager(f"memory://tk-incr-{os.getpid()}-{time.monotonic_ns()}", incremental=True)
    with mgr:
        assert mgr.save({"w": torch.ones(2)}, step=0).file == "ckpt_000000.safetensors"
    with pytest.raises(InvalidArgumentError, match="incremental"):
        tk.CheckpointManager(tmp_path / "d", incremental=True, distributed=True)


def test_physical_sizes_count_a_shared_file_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "s").write_bytes(b"x" * 100)
    os.link(tmp_path / "a" / "s", tmp_path / "b" / "s")
    (tmp_path / "b" / "t").write_bytes(b"y" * 7)
    assert physical_sizes(tmp_path, ["a", "b"]) == [100, 7]


def test_async_incremental_saves(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = torch.nn.Linear(64, 64).requires_grad_(False)
    head = torch.nn.Linear(64, 4)
    with tk.CheckpointManager(run, incremental=True, async_save=True) as mgr:
        for step in range(3):
            with torch.no_grad():
                head.weight.add_(1)
            mgr.save({"base": base, "head": head}, step=step)
    inodes = [set(_inodes(run / f"ckpt_{s:06d}.shards").values()) for s in range(3)]
    assert len(inodes[0] & inodes[1] & inodes[2]) == 1  # the base, written once
    assert torch.equal(tk.load(run / "last.shards")["head"]["weight"], head.weight)


@pytest.mark.slow
def test_sigkill_loop_leaves_every_committed_incremental_checkpoint_verifiable(tmp_path: Path) -> None:
    """Kill a process saving incremental checkpoints at random moments; after each kill every committed
    checkpoint verifies and the newest restores exactly."""
    run = tmp_path / "run"
    numel = 200_000  # an 800 KB frozen base, a 100 KB head
    rng = random.Random(4321)
    with ForkClient(HELPER, run, numel, "incremental") as server:
        last_step = -1
        kills = progressed = 0
        t0 = time.monotonic()
        while kills < 25 or (progressed < 8 and time.monotonic() - t0 < 30):
            pid = int(server.ask("fork").split()[1])
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(pid, signal.SIGKILL)
            assert server.ask(f"reap {pid}") in ("signal 9", "exit 0"), "child failed"
            kills += 1
            with tk.CheckpointManager(run, keep_last=3, incremental=True) as mgr:
                assert not [n for n in os.listdir(run) if ".tmp-" in n or ".old-" in n]
                dirs = {n for n in os.listdir(run) if n.endswith(".shards") and n != "last.shards"}
                assert {c.file for c in mgr.checkpoints()} == dirs
                for c in mgr.checkpoints():
                    assert tk.verify(c.path)["ok"], c.file
                if dirs:
                    assert os.readlink(run / "last.shards") == mgr.checkpoints()[-1].file
                model = LoopModel(numel)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    info = mgr.restore({"model": model}, strict=True)
                if info is None:
                    assert last_step == -1 and not dirs
                    continue
                assert info.step == max(c.step for c in mgr.checkpoints()) >= last_step
                assert model.step_of() == info.step
                progressed += info.step > last_step
                last_step = info.step
        print(f"{kills} kills, {progressed} with progress, last step {last_step}")
        assert progressed >= 5, f"only {progressed} of {kills} kills made progress"


def test_a_state_without_tensors_saves_and_loads(tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path / "run", incremental=True) as mgr:
        for step in range(2):
            info = mgr.save({"epoch": step, "cfg": {"lr": 0.1}}, step=step)
    assert tk.load(info.path) == {"epoch": 1, "cfg": {"lr": 0.1}}
    assert tk.verify(info.path)["ok"]
    out = runner.invoke(app, ["verify", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
