"""Pruning coverage: which real models can be pruned 50% (L2) -- Presso vs the plain Torch-Pruning recipe.

Runs every torchvision classification model and the timm sample (presso.testing.zoo.TIMM_SAMPLE) through

* presso:  ``presso.compress(model, inputs, PruneConfig(ratio=0.5, criterion="l2"))`` then save -> load;
* plain:   Torch-Pruning's standard recipe -- ``MetaPruner(model, inputs, GroupMagnitudeImportance(p=2),
           pruning_ratio=0.5, ignored_layers=[the final classifier])`` and ``pruner.step()``,

each model in its own forked child process (a crash, hang or memory blow-up of one model cannot take the
sweep down) with a time limit and a memory limit. A model *passes* when the pruned model runs, keeps its output
shape, and lost at least 25% of its MACs; for Presso the saved model directory must also reload with identical
outputs.

    python benchmarks/coverage.py                 # everything, results to benchmarks/results/coverage.jsonl
    python benchmarks/coverage.py --zoo torchvision --limit 10
    python benchmarks/coverage.py --only timm:swin_tiny_patch4_window7_224

Inputs are each model's smallest workable size (presso.testing.zoo), which exercises the same graphs as full-size
inputs at a fraction of the time.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- one model, in a child process
def _one(source: str, shape: str, kwargs: dict, method: str) -> dict:
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import presso
    from presso.compress.prune.pruner import _signature
    from presso.models.figures import count_macs, run_model

    torch.set_num_threads(1)
    row: dict = {"source": source, "method": method, "shape": shape}
    t0 = time.perf_counter()
    model = presso.load_model(source, **kwargs)
    inputs = presso.InputSpec.parse(shape).example_inputs()
    with torch.no_grad():
        reference = run_model(model, inputs)
    macs0 = count_macs(model, inputs)
    row["load_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    if method == "presso":
        result = presso.compress(model, inputs, presso.PruneConfig(ratio=0.5, criterion="l2"), inplace=True)
        pruned = result.model
        row["skipped"] = len(result.skipped)
        row["groups"] = f"{result.extra['groups_pruned']}/{result.extra['groups_total']}"
    else:
        import torch_pruning as tp

        ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
        ignored += [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000]
        pruner = tp.pruner.MetaPruner(
            model,
            inputs[0] if len(inputs) == 1 else inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5,
            ignored_layers=ignored,
        )
        pruner.step()
        pruned = model
    row["prune_s"] = round(time.perf_counter() - t0, 2)
    with torch.no_grad():
        out = run_model(pruned, inputs)
    if _signature(out) != _signature(reference):
        raise AssertionError("output shapes changed")
    row["macs_ratio"] = round(count_macs(pruned, inputs) / max(macs0, 1), 4)
    if row["macs_ratio"] > 0.75:
        raise AssertionError(f"only {100 * (1 - row['macs_ratio']):.1f}% of MACs removed (< 25%)")
    if method == "presso":
        with tempfile.TemporaryDirectory() as d:
            presso.save_model_dir(pruned, Path(d) / "m", input_spec=shape)
            loaded = presso.load_model(str(Path(d) / "m"))
            with torch.no_grad():
                a, b = run_model(pruned, inputs), run_model(loaded, inputs)
            if not all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b), strict=True)):
                raise AssertionError("reloaded model gives different outputs")
    row["ok"] = True
    return row


def _tensors(out):
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _child(conn, source, shape, kwargs, method, mem_gib) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (mem_gib << 30, mem_gib << 30))
    row = {"source": source, "method": method, "shape": shape}
    try:
        row = _one(source, shape, kwargs, method)
    except BaseException as e:  # everything is a result row here, including MemoryError
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        row.update(ok=False, error=f"{type(e).__name__}: {msg}")
    conn.send(row)
    conn.close()


# ----------------------------------------------------------------------------- the sweep
def _zoo(which: str):
    from presso.testing.zoo import TIMM_SAMPLE, timm_entries, torchvision_classification

    entries = []
    if which in ("all", "torchvision"):
        entries += [("torchvision", *e) for e in torchvision_classification()]
    if which in ("all", "timm"):
        entries += [("timm", *e) for e in timm_entries(TIMM_SAMPLE)]
    return entries


def _run_child(source, shape, kwargs, method, timeout, mem_gib) -> dict:
    """One model in a forked child of this (already warm) process: a crash, hang or memory blow-up of one model
    cannot take the sweep down, and no child pays for importing torch/timm again."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(send, source, shape, kwargs, method, mem_gib))
    proc.start()
    send.close()
    row = None
    if recv.poll(timeout):
        try:
            row = recv.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
        row = row or {"ok": False, "error": f"timeout after {timeout}s"}
    row = row or {"ok": False, "error": f"crashed (exit code {proc.exitcode})"}
    row.update(source=source, method=method, seconds=round(time.perf_counter() - t0, 1))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="all", choices=["all", "torchvision", "timm"])
    p.add_argument("--only", nargs="*", help="run only these sources")
    p.add_argument("--limit", type=int, default=0, help="first N models per run (0: all)")
    p.add_argument("--methods", default="presso,plain")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model and method")
    p.add_argument("--mem-gib", type=int, default=12, help="address-space limit per child")
    p.add_argument("--jobs", type=int, default=1, help="models measured in parallel")
    p.add_argument("--out", default=str(HERE / "results" / "coverage.jsonl"))
    args = p.parse_args()
    # warm the parent: children are forked from it (the heavy imports are paid once, not per model)
    import timm  # noqa: F401
    import torch
    import torch_pruning  # noqa: F401
    import torchvision  # noqa: F401

    import presso.compress  # noqa: F401

    torch.set_num_threads(1)

    entries = _zoo(args.zoo)
    if args.only:
        entries = [e for e in entries if e[1] in args.only]
    if args.limit:
        entries = entries[: args.limit]
    methods = args.methods.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(zoo, src, shape, kw, m) for zoo, src, shape, kw in entries for m in methods]
    print(f"{len(entries)} models x {methods} -> {out}", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    rows = []
    with open(out, "w") as f, ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            (zoo, pool.submit(_run_child, src, shape, kw, m, args.timeout, args.mem_gib))
            for zoo, src, shape, kw, m in jobs
        ]
        for zoo, fut in futures:
            row = {"zoo": zoo, **fut.result()}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            status = "ok  " if row["ok"] else "FAIL"
            extra = f"macs x{row.get('macs_ratio')}" if row["ok"] else row.get("error", "")
            print(f"{status} {row['method']:6s} {row['seconds']:6.1f}s {row['source']:45s} {extra}", flush=True)
    summarize(rows)


def summarize(rows: list[dict]) -> None:
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["zoo"]][r["method"]].append(r)
    print("\n| zoo | method | pass / total | median s/model (all) | median s pruning | max s/model |")
    print("|---|---|---|---|---|---|")
    for zoo, methods in by.items():
        for method, rs in methods.items():
            ok = sum(r["ok"] for r in rs)
            secs = sorted(r["seconds"] for r in rs)
            prune = sorted(r["prune_s"] for r in rs if "prune_s" in r) or [float("nan")]
            print(
                f"| {zoo} | {method} | {ok} / {len(rs)} | {secs[len(secs) // 2]:.1f} | {prune[len(prune) // 2]:.1f} "
                f"| {secs[-1]:.1f} |"
            )
    print("\nfailures:")
    for r in rows:
        if not r["ok"]:
            print(f"- {r['method']:6s} {r['source']}: {r.get('error', '')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--summarize":
        summarize([json.loads(line) for line in open(sys.argv[2])])
    else:
        main()
