import os
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
