"""Every compression method against every model in the test zoo, like timm's tests/test_models.py.

For each model: prune 50% of channels with l2; the pruned model runs, keeps its output structure and shapes, loses at
least 25% of its MACs, and a save -> load round trip through the model directory gives identical outputs.
"""

import gc

import pytest
import torch

import presso
from presso.compress.prune.pruner import _signature
from presso.models.figures import run_model
from presso.testing.zoo import TIMM_TEST, timm_entries, torchvision_classification, torchvision_dense

ZOO = torchvision_classification() + torchvision_dense() + timm_entries(TIMM_TEST)


def _same_outputs(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_outputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_outputs(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.zoo
@pytest.mark.parametrize("source,shape,kwargs", ZOO, ids=[e[0] for e in ZOO])
def test_prune_half_of_every_zoo_model(source, shape, kwargs, tmp_path):
    model = presso.load_model(source, **kwargs).eval()
    inputs = presso.InputSpec.parse(shape).example_inputs()
    with torch.no_grad():
        reference = _signature(run_model(model, inputs))

    result = presso.compress(model, inputs, presso.PruneConfig(ratio=0.5, criterion="l2"), inplace=True)
    pruned = result.model
    with torch.no_grad():
        out = run_model(pruned, inputs)
    assert _signature(out) == reference
    assert result.after["macs"] <= 0.75 * result.before["macs"], (result.after, result.before, result.skipped)
    assert result.after["params"] < result.before["params"]

    presso.save_model_dir(pruned, tmp_path / "m", input_spec=shape)
    del model, result
    gc.collect()
    loaded = presso.load_model(str(tmp_path / "m"))
    with torch.no_grad():
        out_a = run_model(pruned, inputs)
        out_b = run_model(loaded, inputs)
    assert _same_outputs(out_a, out_b)
