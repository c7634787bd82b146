"""`presso train` / `presso eval` from the command line: JSON keys, Ctrl-C and --resume, and torchrun (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from presso.cli import app

from ._helpers import runner

TRAIN = ["train", "presso:resnet8", "--data", "digits:size=12", "--model-arg", "num_classes=10", "--batch-size", "64"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PRESSO_TEST_THREADS": "1"}


def test_train_and_eval_json(tmp_path):
    out = tmp_path / "m"
    res = runner.invoke(app, [*TRAIN, "--epochs", "2", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["epochs"] == 2 and data["output_dir"] == str(out) and data["seconds"] > 0
    assert 0.3 < data["val_top1"] <= 1.0
    res = runner.invoke(app, ["eval", str(out), "--data", "digits:size=12", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["val_top1"] == data["val_top1"] and ev["val_n"] == 180


def test_train_errors_are_one_line(tmp_path):
    res = runner.invoke(app, ["train", "presso:resnet8", "--data", "nowhere/at/all", "-o", str(tmp_path / "y")])
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, [*TRAIN[:4], "--model-arg", "num_classes=3", "-o", str(tmp_path / "z")])
    assert res.exit_code == 2 and "num_classes=10" in res.output


def test_ctrl_c_keeps_the_run_and_resume_finishes_it(tmp_path):
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "presso", *TRAIN[:2], "--data", "digits:size=8", *TRAIN[4:], "--epochs", "12"]
    cmd += ["-o", str(out), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    checkpoint = tmp_path / "m.partial" / "last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and checkpoint.exists() and not out.exists()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["epochs"] == 12
    assert (out / "presso.json").is_file() and not checkpoint.parent.exists()


@pytest.mark.timeout(600)
def test_torchrun_two_gloo_processes_train_like_one(tmp_path):
    single = runner.invoke(app, [*TRAIN, "--epochs", "3", "-o", str(tmp_path / "one"), "--json"])
    assert single.exit_code == 0, single.output
    one = json.loads(single.stdout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "presso", *TRAIN, "--epochs", "3", "-o", str(tmp_path / "two"), "--json"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=540)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # one process reports
    two = json.loads(lines[0])
    assert abs(two["val_top1"] - one["val_top1"]) < 0.15 and two["val_top1"] > 0.5
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["one", "two"]  # one output per run, no partial state left
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["metrics.csv", "presso.json", "weights.safetensors"]


def test_a_zoo_model_is_built_for_the_data(tmp_path):
    out = tmp_path / "r18"
    res = runner.invoke(app, ["train", "torchvision:resnet18", "--data", "digits:size=8", "--epochs", "1",
                              "--batch-size", "128", "-o", str(out), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "building torchvision:resnet18 for 'digits:size=8': num_classes=10 (from the data" in res.output
    assert json.loads(res.stdout)["val_top1"] > 0.1
    card = json.loads((out / "presso.json").read_text())
    assert card["source"] == {"source": "torchvision:resnet18", "kwargs": {"num_classes": 10}, "weights": "random init"}
    assert card["input_spec"] == "1,3,8,8" and card["labels"] == [str(i) for i in range(10)]


def test_weights_and_a_new_head_on_the_command_line(tmp_path):
    from safetensors.torch import save_file

    import presso

    three = presso.load_model("presso:resnet8", num_classes=3, widths=[8, 8, 8])
    save_file(three.state_dict(), str(tmp_path / "w.safetensors"))
    args = ["train", "presso:resnet8", "--model-arg", "num_classes=3", "--model-arg", "widths=[8,8,8]", "--weights",
            str(tmp_path / "w.safetensors"), "--data", "digits:size=8", "--epochs", "1"]  # fmt: skip
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "no")])
    assert res.exit_code == 2 and "3 classes" in res.output and "--new-head" in res.output
    res = runner.invoke(app, [*args, "--new-head", "-o", str(tmp_path / "m"), "--json"])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "m" / "presso.json").read_text())
    assert card["recipe"] == [{"type": "new_head", "layer": "fc", "classes": 10}]
    assert card["source"]["weights"]["path"] == str((tmp_path / "w.safetensors").resolve())
    assert presso.load_model(str(tmp_path / "m")).fc.out_features == 10
