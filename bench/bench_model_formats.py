"""Compare three ways to ship a whole model: full-model pickle, state dict, torchkeep ``save_model``.

Run it::

    .venv/bin/python bench/bench_model_formats.py                      # ~100 MB model, 5 repeats
    .venv/bin/python bench/bench_model_formats.py --scale 0.001 --repeat 1   # smoke run
    .venv/bin/python bench/bench_model_formats.py --json bench/out/model-formats.json

The three styles:

- **full-model pickle**: ``torch.save(model, f)``; ``torch.load(path, weights_only=False)``.
- **state dict**: ``torch.save(model.state_dict(), f)``; ``Model(**config)`` (the config written
  in the loading code) + ``model.load_state_dict(torch.load(path, weights_only=True))``.
- **torchkeep save_model**: ``tk.save_model(model, path)``; ``tk.load_model(path)`` (the class is
  registered with ``@tk.register_model(name)``; the file holds the name, the config and the weights).

The model is this script's own class, ``BenchTransformer`` (a small pre-norm transformer:
embeddings, ``8`` blocks of attention + MLP, an output head; ~100 MB of float32 at ``--scale 1``,
``--scale`` multiplies the parameter count). Its source is written to a temporary directory as a
module (``tkbench_model``), so that a full-model pickle records a real import path; the parent
imports it from there to build and save the model.

Method, per repeat (interleaved: repeat 1 of every style, then repeat 2, ...; tables show medians):

- SAVE: ``os.sync()`` (untimed), then the timed save to a fresh file. Every row is durable:
  ``torch.save`` does not fsync, so its rows are ``torch.save`` into an open file + flush +
  ``os.fsync`` (added by this benchmark); ``tk.save_model`` fsyncs by itself (its default).
- LOAD: a fresh ``python`` subprocess per load, from a hot page cache (the file was just written).
  Inside it, times are taken separately for ``import torch``, the import of the model module
  (which imports torchkeep to register the class: the "cold import of the model class"), and
  the load proper: from just before the load call to a model in eval mode, ready for inference.
  The subprocess total is the parent's wall clock around the whole subprocess (interpreter start,
  imports, load, one forward pass to check the outputs, exit). Peak RSS is the load's own:
  ``VmHWM`` is reset through ``/proc/self/clear_refs`` after the imports, just before the load,
  and reported above the RSS at that point. The outputs of the loaded model on a fixed input
  are compared with the saving process's (``torch.equal``).
- An extra row, ``save_model, meta path pre-warmed``, loads the same save_model file after an untimed
  meta-device construction + ``to_empty`` of a tiny module: it separates the one-time torch imports
  (torch._dynamo, sympy) that the first meta-device build of a fresh process pays from the load itself.
- PROPERTIES (one untimed subprocess each, per style, two at a time):
  *moved module*: the same class source importable only as ``tkbench_model_moved`` (a renamed /
  moved module; the registry name is unchanged); *changed class*: the original module path, but
  the class gained a constructor argument with a default (``out_scale=1.0``, stored in
  ``__init__`` and used in ``forward``), a typical new-code-version change; *unpickling*:
  during the load of the changed-class run, ``pickle.Unpickler`` and torch's weights-only
  unpickler are counted, and the globals that pickle imports (the ``pickle.find_class`` audit
  event) are recorded.

Ratios (``x state dict``) are the state-dict median over the row's median for times (above 1:
faster) and the row's value over the state dict's for sizes. Files go to a temporary directory
on the repository's disk (``--dir`` to choose), removed at the end. Tables on stdout (Markdown),
progress on stderr. This module imports only the standard library at the top, so a child
process's import times are its own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODULE = "tkbench_model"
MOVED_MODULE = "tkbench_model_moved"
CHANGED_DIR = "changed"  # holds a changed ``tkbench_model`` (same module path, new class version)
CLASS = "BenchTransformer"
REGISTRY_NAME = "tkbench-transformer"
STYLES = ["full-model pickle", "state dict", "torchkeep save_model"]
KEYS = {"full-model pickle": "pickle", "state dict": "state_dict", "torchkeep save_model": "save_model"}
# Diagnostic row: the same save_model file, loaded after an untimed meta-device construction + ``to_empty``
# of a tiny module (Linear, Embedding, LayerNorm). In a fresh process the first weight init on the meta
# device imports torch._dynamo (``normal_``/``uniform_`` on meta go through ``torch._refs``, wrapped in
# ``torch._compile``), and the first ``to_empty`` imports sympy (meta ``empty_like`` ->
# ``torch.fx.experimental.symbolic_shapes``); this row shows the load without those one-time imports.
WARM = "save_model, meta path pre-warmed"
MiB = 1 << 20
_T0 = time.perf_counter()

MODEL_SOURCE = '''"""The model of bench/bench_model_formats.py (written out by the benchmark; do not edit)."""

import torch
import torch.nn.functional as F
from torch import nn

try:
    import torchkeep as _tk

    _register = getattr(_tk, "register_model", None)
except ImportError:  # pragma: no cover
    _register = None


def _maybe_register(cls):
    return _register("@REGISTRY_NAME@")(cls) if _register is not None else cls


class Block(nn.Module):
    def __init__(self, d_model, n_heads, mlp_ratio, norm_eps):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model, eps=norm_eps)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


@_maybe_register
class BenchTransformer(nn.Module):
    def __init__(self, vocab=512, d_model=512, n_layers=8, n_heads=8, mlp_ratio=4, max_len=256, norm_eps=1e-5@EXTRA_ARG@):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, norm_eps) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=norm_eps)
        self.head = nn.Linear(d_model, vocab)
@EXTRA_INIT@
    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))@EXTRA_OUT@
'''


def model_source(changed: bool) -> str:
    src = MODEL_SOURCE.replace("@REGISTRY_NAME@", REGISTRY_NAME)
    if changed:
        return (
            src.replace("@EXTRA_ARG@", ", out_scale=1.0")
            .replace("@EXTRA_INIT@", "        self.out_scale = out_scale  # new in this version\n")
            .replace("@EXTRA_OUT@", " * self.out_scale")
        )
    return src.replace("@EXTRA_ARG@", "").replace("@EXTRA_INIT@", "").replace("@EXTRA_OUT@", "")


def model_config(scale: float) -> dict[str, Any]:
    """Constructor arguments: ~100 MB of float32 at scale 1 (the width grows with sqrt(scale))."""
    d = max(16, round(512 * math.sqrt(scale) / 16) * 16)
    return {
        "vocab": max(32, round(512 * math.sqrt(scale))),
        "d_model": d,
        "n_layers": 8,
        "n_heads": max(1, d // 64),
        "mlp_ratio": 4,
        "max_len": 256,
        "norm_eps": 1e-5,
    }


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def fmt_bytes(n: float) -> str:
    return f"{n / MiB:.2f} MiB" if n >= 0.1 * MiB else f"{n / 1024:.1f} KiB"


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x >= 0.1 else f"{x:.4f}" if x >= 0.001 else f"{x:.1e}"


def proc_status_kib(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# --------------------------------------------------------------------------------------------
# child: one load in a fresh process; prints one JSON line


def _install_pickle_probe(counts: dict[str, Any]) -> None:
    """Count unpicklers created and globals imported by pickle from now on (untimed runs only)."""
    import pickle

    import torch._weights_only_unpickler as wou

    class CountingUnpickler(pickle.Unpickler):
        def __init__(self, *a: Any, **k: Any) -> None:
            counts["pickle_unpicklers"] += 1
            super().__init__(*a, **k)

    class CountingWeightsOnly(wou.Unpickler):  # type: ignore[misc,name-defined]
        def __init__(self, *a: Any, **k: Any) -> None:
            counts["weights_only_unpicklers"] += 1
            super().__init__(*a, **k)

    pickle.Unpickler = CountingUnpickler  # type: ignore[misc]
    wou.Unpickler = CountingWeightsOnly  # type: ignore[misc]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "pickle.find_class" and counts["armed"]:
            counts["globals"].append(f"{args[0]}.{args[1]}")

    sys.addaudithook(hook)


def child(spec: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    sys.path.insert(0, spec["moddir"])
    mod = importlib.import_module(spec["modname"])
    cls = getattr(mod, CLASS)
    t2 = time.perf_counter()
    import torchkeep as tk  # already imported by the model module

    counts: dict[str, Any] = {"pickle_unpicklers": 0, "weights_only_unpicklers": 0, "globals": [], "armed": False}
    if spec["probe"]:
        _install_pickle_probe(counts)
    style, path = spec["style"], spec["path"]
    if spec.get("warm"):
        with torch.device("meta"):
            tiny = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Embedding(2, 2), torch.nn.LayerNorm(2))
        tiny.to_empty(device="cpu")
    base = proc_status_kib("VmRSS")
    try:  # reset VmHWM to the current RSS, so the peak is this load's own (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    out: dict[str, Any] = {"import_torch_s": t1 - t0, "import_model_s": t2 - t1, "hwm_reset": hwm_reset}
    counts["armed"] = True
    t3 = time.perf_counter()
    try:
        if style == "pickle":
            model = torch.load(path, weights_only=False)
        elif style == "state_dict":
            model = cls(**spec["config"])
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            model = tk.load_model(path)
        model.eval()
        t4 = time.perf_counter()
        out.update(load_ok=True, load_s=t4 - t3)
    except Exception as e:
        out.update(load_ok=False, load_error=f"{type(e).__name__}: {e}"[:300])
    counts["armed"] = False
    out["peak_above_base_kib"] = proc_status_kib("VmHWM") - base
    out["unpickling"] = {k: v for k, v in counts.items() if k != "armed"}
    if out["load_ok"]:
        ref = torch.load(spec["ref"], weights_only=True)
        try:
            with torch.no_grad():
                y = model(ref["x"])
            out["identical"] = bool(torch.equal(y, ref["y"]))
            if not out["identical"]:
                out["max_abs_diff"] = float((y - ref["y"]).abs().max())
        except Exception as e:
            out.update(identical=False, forward_error=f"{type(e).__name__}: {e}"[:300])
    print(json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------
# parent


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=spec["moddir"])
    total = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}) for {spec['style']}: {proc.stderr[-3000:]}")
    res = json.loads(lines[-1])
    res["total_s"] = total
    return res


def save(style: str, model: Any, path: Path) -> None:
    import torch

    if style == "save_model":
        import torchkeep as tk

        tk.save_model(model, path)
        return
    obj = model if style == "pickle" else model.state_dict()
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def default_parent() -> Path:
    tmp = Path(tempfile.gettempdir()).resolve()
    try:
        if os.stat(tmp).st_dev == os.stat(REPO).st_dev:
            return tmp
    except OSError:
        pass
    return REPO / "bench" / "out"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def verdict_moved(r: dict[str, Any]) -> str:
    if not r.get("load_ok"):
        return "fails: " + r.get("load_error", "?").split(":")[0]
    return "works" if r.get("identical") else "loads, outputs differ"


def verdict_changed(r: dict[str, Any]) -> str:
    if not r.get("load_ok"):
        return "load fails: " + r.get("load_error", "?").split(":")[0]
    if "forward_error" in r:
        return "loads; forward fails: " + r["forward_error"].split(":")[0]
    return "works" if r.get("identical") else "loads, outputs differ"


def verdict_pickle(r: dict[str, Any]) -> str:
    u = r.get("unpickling", {})
    n_glob = len(set(u.get("globals", [])))
    if u.get("pickle_unpicklers"):
        return f"yes: full pickle ({n_glob} globals imported, arbitrary code possible)"
    if u.get("weights_only_unpicklers"):
        return "yes: torch weights-only unpickler (allowlisted globals)"
    return "no"


def markdown_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the parameter count (1: ~100 MB)")
    ap.add_argument("--repeat", type=int, default=5, help="timed saves and loads per style (median shown)")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory for the files")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return 0

    import torch

    import torchkeep as tk

    have_tk = hasattr(tk, "save_model") and hasattr(tk, "load_model") and hasattr(tk, "register_model")
    styles = [s for s in STYLES if have_tk or KEYS[s] != "save_model"]
    if not have_tk:
        log("torchkeep has no save_model/load_model/register_model: the save_model row is skipped")

    parent = args.dir or default_parent()
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tk-model-formats-", dir=parent))
    try:
        (work / f"{MODULE}.py").write_text(model_source(changed=False))
        (work / f"{MOVED_MODULE}.py").write_text(model_source(changed=False))
        (work / CHANGED_DIR).mkdir()
        (work / CHANGED_DIR / f"{MODULE}.py").write_text(model_source(changed=True))
        moved_dir = work / "moved"
        moved_dir.mkdir()
        shutil.move(str(work / f"{MOVED_MODULE}.py"), moved_dir / f"{MOVED_MODULE}.py")
        sys.path.insert(0, str(work))
        mod = importlib.import_module(MODULE)
        cfg = model_config(args.scale)
        torch.manual_seed(0)
        model = getattr(mod, CLASS)(**cfg).eval()
        n_params = sum(p.numel() for p in model.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        x = torch.randint(cfg["vocab"], (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = model(x)
        ref = work / "ref.pt"
        torch.save({"x": x, "y": y}, ref)
        log(f"model: {n_params:,} parameters, {fmt_bytes(param_bytes)} float32; files in {work}")

        res: dict[str, dict[str, Any]] = {
            KEYS[s]: {"save_s": [], "size": None, "loads": [], "moved": None, "changed": None} for s in styles
        }
        for r in range(args.repeat):
            for s in styles:
                k = KEYS[s]
                path = work / f"{k}-{r}.bin"
                os.sync()
                t0 = time.perf_counter()
                save(k, model, path)
                res[k]["save_s"].append(time.perf_counter() - t0)
                res[k]["size"] = file_size(path)
                spec = {"style": k, "path": str(path), "moddir": str(work), "modname": MODULE}
                spec.update(config=cfg, ref=str(ref), probe=False)
                out = run_child(spec)
                if not out.get("load_ok") or not out.get("identical"):
                    raise RuntimeError(f"{s}: the plain load did not give the saved model back: {out}")
                res[k]["loads"].append(out)
                log(f"repeat {r + 1}/{args.repeat} {s}: save {res[k]['save_s'][-1]:.3f} s, load {out['load_s']:.3f} s")
                if k == "save_model":
                    out = run_child({**spec, "warm": True})
                    res.setdefault(WARM, {"save_s": [], "size": res[k]["size"], "loads": []})["loads"].append(out)
                    log(f"repeat {r + 1}/{args.repeat} {WARM}: load {out['load_s']:.3f} s")
                if r < args.repeat - 1:
                    path.unlink()
        jobs = {}  # untimed property runs, two at a time
        with ThreadPoolExecutor(2) as pool:
            for s in styles:
                k = KEYS[s]
                base = {"style": k, "path": str(work / f"{k}-{args.repeat - 1}.bin"), "config": cfg, "ref": str(ref)}
                moved = {**base, "moddir": str(moved_dir), "modname": MOVED_MODULE, "probe": False}
                changed = {**base, "moddir": str(work / CHANGED_DIR), "modname": MODULE, "probe": True}
                jobs[k, "moved"] = pool.submit(run_child, moved)
                jobs[k, "changed"] = pool.submit(run_child, changed)
        for (k, what), job in jobs.items():
            res[k][what] = job.result()
        for s in styles:
            k = KEYS[s]
            log(
                f"{s}: moved module -> {verdict_moved(res[k]['moved'])}; changed class -> {verdict_changed(res[k]['changed'])}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # ---------------------------------------------------------------------------------- report
    sd = res["state_dict"]
    sd_size, sd_load, sd_total = (
        sd["size"],
        med([o["load_s"] for o in sd["loads"]]),
        med([o["total_s"] for o in sd["loads"]]),
    )
    rows = []
    for s in [*styles, *([WARM] if WARM in res else [])]:
        k = KEYS.get(s, s)
        loads = res[k]["loads"]
        load_s = med([o["load_s"] for o in loads])
        total_s = med([o["total_s"] for o in loads])
        peak = med([o["peak_above_base_kib"] * 1024 for o in loads])
        rows.append(
            [
                s,
                fmt_bytes(res[k]["size"]),
                f"{res[k]['size'] / sd_size:.4f}",
                fmt_s(med(res[k]["save_s"])) if res[k]["save_s"] else "-",
                fmt_s(med([o["import_model_s"] for o in loads])),
                fmt_s(load_s),
                f"{sd_load / load_s:.2f}",
                fmt_s(total_s),
                f"{sd_total / total_s:.2f}",
                fmt_bytes(peak),
                f"{peak / res[k]['size']:.2f}",
            ]
        )
    headers = [
        "style",
        "file",
        "size x state dict",
        "save s (fsync'd)",
        "import model class s",
        "load s",
        "load x state dict",
        "subprocess total s",
        "total x state dict",
        "peak RSS of load",
        "peak x file",
    ]
    prows = [
        [
            s,
            verdict_moved(res[KEYS[s]]["moved"]),
            verdict_changed(res[KEYS[s]]["changed"]),
            verdict_pickle(res[KEYS[s]]["changed"]),
        ]
        for s in styles
    ]
    pheaders = ["style", "class in a moved module", "class changed (new init arg)", "load unpickles"]

    print(f"# Model files: full-model pickle vs state dict vs torchkeep save_model (scale {args.scale:g})")
    print()
    print(
        f"torchkeep {tk.__version__} | torch {torch.__version__} | Python {platform.python_version()} | "
        f"{os.cpu_count()} CPUs | {platform.machine()}"
    )
    print(
        f"model: {CLASS} {json.dumps(cfg)}, {n_params:,} parameters ({fmt_bytes(param_bytes)} float32); "
        f"median of {args.repeat} interleaved repeats; loads in a fresh subprocess from a hot page cache"
    )
    print(
        "x state dict: state-dict median / row median for times (above 1: faster), row / state dict for sizes. "
        "load s: from the load call to a model in eval mode, after the imports; import model class s: the "
        "model module's import (incl. torchkeep), after import torch; peak RSS: above the RSS just before the load."
    )
    print()
    print(markdown_table(headers, rows, right=set(range(1, len(headers)))))
    print()
    print(markdown_table(pheaders, prows, right=set()))
    if WARM in res:
        print()
        print(
            f"{WARM}: the same file, loaded after an untimed construction + `to_empty` of a tiny meta-device module "
            "(Linear, Embedding, LayerNorm): the one-time imports that torch's meta-device init and `empty_like` "
            "trigger in a fresh process (torch._dynamo, sympy) are not in this row's load."
        )
    if not have_tk:
        print()
        print("torchkeep save_model row missing: tk.save_model / tk.load_model / tk.register_model not available.")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "scale": args.scale,
            "repeat": args.repeat,
            "config": cfg,
            "n_params": n_params,
            "torch": torch.__version__,
            "torchkeep": tk.__version__,
            "cpus": os.cpu_count(),
            "results": res,
        }
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
