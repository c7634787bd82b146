"""Kill a writing verb at a random moment (SIGKILL: no ``finally`` runs) and check what it left (issue 18/19).

``kill_case(verb, tmp, seed)`` is what ``test_outputs.py`` asserts on and what a fuzz benchmark can run over many
seeds: it starts ``python -m presso VERB ...`` on a tiny model, kills it after a seeded random delay, then checks that
the user's files beside the output are intact, that the output is absent or complete (it loads), and that rerunning
the command succeeds and leaves no Presso temporary sibling behind.

"Rerunning the command" is the same command line, plus ``--resume`` when the killed ``train`` left a checkpoint in
``OUT.partial`` and ``--overwrite`` when the killed run had already finished its output (a finished output is the
user's data now: the plain rerun is refused, by design).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

VERBS = ("compress", "train", "convert", "package")
ALL_VERBS = (*VERBS, "run")  # run takes about two minutes here: benchmarks/fuzz.py kills it, the tests do not
# the seconds within which each verb usually finishes here (CLI start included): kills land anywhere in the run
SPAN = {"compress": (0.3, 4.5), "train": (0.3, 6.0), "convert": (0.3, 6.0), "package": (0.02, 0.5), "run": (1, 45)}
SHAPE = "1,3,12,12"
DATA = "digits:size=12"


def prepare_inputs(root: str | Path) -> dict[str, Path]:
    """A trained tiny model directory and its conversion (what ``convert`` and ``package`` read), built once."""
    import presso
    from presso.convert import ConvertConfig
    from presso.data import load_data

    root = Path(root)
    model_dir, converted = root / "model", root / "converted"
    if not (model_dir / "presso.json").is_file():
        import dataclasses

        import numpy as np
        import torch

        torch.manual_seed(0)
        data = load_data(DATA)
        data = dataclasses.replace(data, train=data.train.subset(np.arange(128)))
        model = presso.load_model("presso:resnet8", num_classes=10)
        presso.train(model, data, presso.TrainConfig(epochs=1, batch_size=64, workers=0), output_dir=model_dir)
    if not (converted / "convert.json").is_file():
        loaded = presso.load_model(str(model_dir))
        presso.convert(loaded, SHAPE, ConvertConfig(eval_samples=0), output_dir=converted)
    return {"model": model_dir, "converted": converted}


def command(verb: str, out: Path, inputs: dict[str, Path]) -> list[str]:
    base = [sys.executable, "-m", "presso", verb]
    if verb == "compress":
        return [*base, "presso:resnet8", "--model-arg", "num_classes=10", "-s", SHAPE, "-r", "0.5", "-o", str(out)]
    if verb == "train":
        return [*base, "presso:resnet8", "--model-arg", "num_classes=10", "--data", DATA, "--epochs", "2",
                "--batch-size", "64", "--workers", "0", "--no-augment", "-o", str(out)]  # fmt: skip
    if verb == "convert":
        return [*base, str(inputs["model"]), "-o", str(out), "--eval-samples", "0"]
    if verb == "package":
        return [*base, str(inputs["converted"]), "-o", str(out)]
    if verb == "run":
        return [*base, "--data", DATA, "--model", str(inputs["model"]), "--target-macs", "0.5", "--train-epochs", "1",
                "--recover-epochs", "1", "--allow-miss", "-o", str(out)]  # fmt: skip
    raise ValueError(verb)


def _user_files(where: Path) -> dict[str, str]:
    """The user's own files beside the output: names and contents."""
    return {str(p.relative_to(where)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(where.rglob("*")) if p.is_file() and "user" in p.parts}  # fmt: skip


def _make_user_files(where: Path) -> None:
    (where / "user" / "images").mkdir(parents=True)
    (where / "user" / "notes.txt").write_text("my notes\n")
    (where / "user" / "images" / "cat.png").write_bytes(os.urandom(256))
    (where / "user" / "results.zip").write_bytes(os.urandom(64))


def output_state(verb: str, out: Path) -> str:
    """``absent``, ``complete`` (it loads), ``resumable`` (run: finished stages only, each whole) or ``broken: why``."""
    if not os.path.lexists(out):
        return "absent"
    if verb == "run":
        import json

        stages = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
        half = [p.name for p in stages if not (p / "stage.json").is_file()]
        if half:
            return f"broken: stage folders without stage.json: {half}"
        summary = out / "summary.json"
        if summary.is_file() and not json.loads(summary.read_text()).get("error"):
            return "complete" if output_state("package", out / "deploy" / "bundle.zip") == "complete" else "broken"
        return "resumable"
    try:
        if verb == "package":
            with zipfile.ZipFile(out) as zf:
                bad = zf.testzip()
                names = set(zf.namelist())
            return "complete" if bad is None and {"presso.json", "model.onnx"} <= names else f"broken: {bad or names}"
        if verb == "convert":
            import onnx

            from presso.convert.package import is_converted_dir

            if not is_converted_dir(out):
                return f"broken: holds {sorted(p.name for p in out.iterdir())}"
            onnx.checker.check_model(str(out / "model.onnx"))
            return "complete"
        import presso

        presso.load_model(str(out))
        return "complete"
    except Exception as e:  # noqa: BLE001 -- any failure to load is the finding
        return f"broken: {type(e).__name__}: {str(e)[:200]}"


def leftovers(where: Path, name: str | None = None) -> list[str]:
    """Presso's temporary siblings left in `where`, and any hidden sibling of the output `name` (the old formats:
    ``.NAME.XXXXXXXX`` temporaries, ``.NAME.partial`` files, ``.presso-convert-*`` folders)."""
    from presso.outdir import is_presso_sibling

    return sorted(p.name for p in where.iterdir()
                  if is_presso_sibling(p.name) or (name and p.name.startswith(f".{name}."))
                  or p.name.endswith(".partial") and p.is_file() or p.name.startswith(".presso-convert-"))  # fmt: skip


_PREPARED: list[dict[str, Path]] = []  # the inputs built by the first case of this process, reused by the next ones


def kill_case(verb: str, tmp: str | Path, seed: int, inputs: dict[str, Path] | None = None) -> dict:
    """Run `verb`, SIGKILL it after a seeded random delay, check, rerun, check. Returns the findings: the ``*_ok``,
    ``*_intact`` and ``absent_or_complete`` keys are True when all is well, ``user_files_lost``, ``half_written``,
    ``rerun_failed`` and ``leftovers`` are empty or False."""
    tmp = Path(tmp)
    if inputs is None:
        if not _PREPARED or not (_PREPARED[0]["converted"] / "convert.json").is_file():
            _PREPARED[:] = [prepare_inputs(tmp / "inputs")]
        inputs = _PREPARED[0]
    where = tmp / "work"
    where.mkdir(parents=True)
    _make_user_files(where)
    before = _user_files(where)
    out = where / ("bundle.zip" if verb == "package" else "out")
    cmd = command(verb, out, inputs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    delay = random.Random(f"{verb}-{seed}").uniform(*SPAN[verb])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=where)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
    after_kill = output_state(verb, out)
    stale = leftovers(where, out.name)  # what the kill left for the next run to clean
    intact_after_kill = _user_files(where) == before
    flags = []
    partial = out.with_name(out.name + ".partial")
    if after_kill == "complete" and verb not in ("package", "run"):  # run resumes its own folder: same command
        flags.append("--overwrite")  # (a train's state folder left beside it is then dropped as finished)
    elif verb == "train" and (partial / "last.pt").is_file():
        flags.append("--resume")
    rerun = subprocess.run(cmd + flags, capture_output=True, text=True, env=env, cwd=where, timeout=900)
    intact = intact_after_kill and _user_files(where) == before
    after_rerun = output_state(verb, out)
    return {
        "verb": verb,
        "seed": seed,
        "delay_s": round(delay, 3),
        "killed": killed,
        "first_exit": proc.returncode,
        "first_stderr": "" if killed else first_err,
        "user_files_intact": intact,
        "user_files_lost": not intact,
        "half_written": after_kill not in ("absent", "complete", "resumable"),
        "output_after_kill": after_kill,
        "absent_or_complete": after_kill in ("absent", "complete"),
        "left_by_kill": stale,
        "rerun_flags": flags,
        "rerun_ok": rerun.returncode == 0,
        "rerun_failed": rerun.returncode != 0 or after_rerun != "complete",
        "rerun_stderr": rerun.stderr[-2000:] if rerun.returncode else "",
        "output_after_rerun": after_rerun,
        "leftovers": leftovers(where, out.name) + ([partial.name] if partial.exists() else []),
    }
