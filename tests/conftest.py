import os
import secrets
import socket
import threading
import time
import warnings

import pytest

os.environ.setdefault("PRESSO_HOME", "/tmp/presso-test-home")


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# The tests `make test-fast` leaves out (with the zoo and timing tests): each takes more than ~10 s of one core
# (end-to-end runs, searches, training runs, calibrated INT8 accuracy). Named here, not marked in each file, so the
# fast tier is one list to read and keep up to date; `make test` still runs all of them.
# tests/test_pipeline.py: its end-to-end runs are listed below, its rule tests are fast; the detection modules train a
# tiny YOLO once (1-2 min) before their tests
SLOW_MODULES: set[str] = {"test_detect.py", "test_detect_bundle.py"}
SLOW_TESTS = {
    "test_killed_search_resumes_with_every_trial_accounted_for",
    "test_two_workers_share_one_postgres_study_without_duplicates",
    "test_no_candidate_predicted_over_budget_is_trained",
    "test_impossible_budget_stops_early_with_the_smallest_latency",
    "test_int8_keeps_accuracy_within_one_point",
    "test_target_with_data_chooses_among_allocations_by_adapted_output",
    "test_cli_decompose_writes_ranks_that_feed_back",
    "test_ctrl_c_keeps_the_run_and_resume_finishes_it",
    "test_target_with_decomposition_and_with_both",
    "test_torchrun_two_gloo_processes_train_like_one",
    "test_cli_target_macs_reports_the_choice",
    "test_latency_cost_is_measured_per_layer",
    "test_target_macs_half_lands_within_3_percent",
    "test_convert_cli_json_keys",
    "test_every_candidate_builds_runs_exports_and_prunes",
    "test_time_per_mac_allocations_cut_slow_groups_harder",
    "test_package_and_predict_match_pytorch_without_torch",
    "test_ctrl_c_in_the_first_seconds_stops_compress",  # tests/security/test_inputs.py: 5 runs interrupted, ~10 s
    "test_a_killed_verb_leaves_old_or_new_and_reruns_clean",  # tests/security/test_outputs.py: a CLI run killed, rerun
    # detection: the end-to-end run, two processes under torchrun, and the trained tiny YOLO's modules
    "test_a_detection_run_bounds_map_points_and_shows_boxes",
    "test_torchrun_trains_a_detector_on_two_processes_and_scores_every_held_out_image",
    # tests/test_pipeline.py: each is (or reuses) an end-to-end presso run, 1-4 min
    "test_when_compression_cannot_beat_quantization_the_quantized_original_is_delivered",
    "test_summary_json_headline_and_paths",
    "test_model_flow_trains_compresses_recovers_and_packages",
    "test_rerun_skips_finished_stages_and_a_changed_setting_reruns_from_there",
    "test_when_compression_wins_the_compressed_model_is_delivered",
    "test_search_flow_without_a_model",
    "test_impossible_budget_ends_early_and_keeps_finished_stages",
    "test_report_renders_in_headless_chromium",
    "test_readme_search_examples_run",  # tests/test_readme.py: the README's four budget searches, small (1-4 min)
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES or getattr(item, "originalname", item.name) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    import torch

    # CI machines have 2 cores; one intra-op thread per test process is fastest and deterministic.
    torch.set_num_threads(int(os.environ.get("PRESSO_TEST_THREADS", "1")))


USER_CODE = """
import torch
from torch import nn

class MyNet(nn.Module):
    def __init__(self, width=8, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

def build(width=8, num_classes=3):
    return MyNet(width, num_classes)

def not_a_model():
    return 42
"""


@pytest.fixture
def user_file(tmp_path):
    f = tmp_path / "my_models.py"
    f.write_text(USER_CODE)
    return f


# --------------------------------------------------------------------- benchmarks and agents (tests/bench, tests/cli)
@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private PRESSO_HOME: device registry and latency database live here."""
    path = tmp_path / "presso-home"
    monkeypatch.setenv("PRESSO_HOME", str(path))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def agent(tmp_path):
    """A real agent (uvicorn + FastAPI) on 127.0.0.1, in a thread of the test process."""
    import uvicorn

    from presso.bench.agent import create_app

    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "agent.token"
    token_file.write_text(token + "\n")
    port = _free_port()
    config = uvicorn.Config(
        create_app(token, name="test-agent", max_upload_mb=2), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the agent did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "token": token, "token_file": token_file}
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def tiny_onnx():
    """Builds a small real model exported through the project's ONNX path; returns the file."""
    return _tiny_onnx


def _tiny_onnx(path, width: int = 8, size: int = 16):
    import torch
    from torch import nn

    from presso.models.onnx import export_onnx

    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    )
    return export_onnx(model.eval(), (torch.randn(1, 3, size, size),), path)


@pytest.fixture
def make_agent(tmp_path):
    """Starts real agents (uvicorn + FastAPI, in threads of the test process) with ``create_app``'s options; returns
    url, token, token_file and the app of each. All are stopped (and their measurement children killed) at the end."""
    import uvicorn

    from presso.bench.agent import create_app

    servers = []

    def start(**options):
        token = secrets.token_urlsafe(24)
        token_file = tmp_path / f"agent-{len(servers)}.token"
        token_file.write_text(token + "\n")
        port = _free_port()
        app = create_app(token, **{"name": "test-agent", **options})
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.time() + 20
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("the agent did not start")
            time.sleep(0.05)
        return {"url": f"http://127.0.0.1:{port}", "token": token, "token_file": token_file, "app": app}

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
