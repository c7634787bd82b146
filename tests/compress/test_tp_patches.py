"""The Torch-Pruning patches are tied to the version they were written for: the required version is the one
pyproject.toml pins, and any other installed version is refused with a clear error saying what to install."""

import re
from pathlib import Path

import pytest

import presso
from presso.compress import PruneConfig
from presso.compress.prune import tp_patches
from presso.errors import ConfigError
from presso.testing import TinyCNN

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_required_version_is_the_pin_in_pyproject():
    pins = re.findall(r'"torch-pruning==([^"]+)"', PYPROJECT.read_text())
    assert pins == [tp_patches.REQUIRED_VERSION]


def test_the_installed_version_is_the_required_one():
    assert tp_patches.installed_version() == tp_patches.REQUIRED_VERSION


def test_another_torch_pruning_version_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tp_patches, "installed_version", lambda: "1.7.0")
    with pytest.raises(ConfigError) as e:
        presso.compress(TinyCNN().eval(), "2,3,32,32", PruneConfig(ratio=0.5))
    message = str(e.value)
    assert "Torch-Pruning 1.7.0 is installed" in message
    assert f"pip install torch-pruning=={tp_patches.REQUIRED_VERSION}" in message


def test_the_patches_are_removed_after_use():
    from torch_pruning.dependency import index_mapping
    from torch_pruning.dependency.group import Group

    originals = index_mapping.update_index_mapping, index_mapping._FlattenIndexMapping, Group.add_dep
    with tp_patches.patched(max_indices=10) as state:
        assert index_mapping.update_index_mapping is not originals[0]
        assert state.blocked == {} and state.mapping_dirty
    assert (index_mapping.update_index_mapping, index_mapping._FlattenIndexMapping, Group.add_dep) == originals
