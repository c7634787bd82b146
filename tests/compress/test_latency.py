"""Per-layer latency from ONNX Runtime's profile, with NCHWc-padded channels matched to their layers."""

import pytest
from torch import nn

import presso


def test_latency_cost_is_measured_per_layer():
    from presso.compress.latency import layer_latency_ms, profile_events, profile_layer_ms

    model = presso.load_model("torchvision:mobilenet_v2")
    inputs = presso.InputSpec.parse("1,3,64,64").example_inputs()
    ms = layer_latency_ms(model, inputs, runs=3)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert set(convs) <= set(ms) and all(v > 0 for v in ms.values())
    # element-wise nodes charged to the convolutions whose output they carry: EfficientNet-B0's SiLU and
    # squeeze-excitation products are a large part of its time (about 1.4x the convolutions' alone). Both sums come
    # from one profile: two profiles taken one after the other on a busy machine differ by more than that (1.27x to
    # 1.84x measured beside a busy core), one profile read twice by exactly the element-wise time
    model = presso.load_model("torchvision:efficientnet_b0")
    layers, events = profile_events(model, inputs, runs=10, threads=1)
    ms = profile_layer_ms(events, layers)
    ew = profile_layer_ms(events, layers, elementwise=True)
    assert set(ms) == set(layers) and sum(ew.values()) > 1.2 * sum(ms.values())


def _event(name, op, ins, out, dur_us):
    args = {"op_name": op, "input_type_shape": [{"float": list(s)} for s in ins],
            "output_type_shape": [{"float": list(out)}]}  # fmt: skip
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur_us, "args": args}


@pytest.mark.parametrize("block", [8, 16])
def test_profile_of_nchwc_kernels_with_padded_channels_reaches_every_layer(block):
    """ONNX Runtime's NCHWc layout reports channels rounded up to the CPU's block (8 with AVX2, 16 with AVX-512):
    on AVX-512 machines MobileNetV2's 24-channel convolutions were reported as 32-channel ones and left out."""
    from presso.compress.latency import profile_layer_ms

    def pad(c):
        return -(-c // block) * block

    layers = {
        "expand": ("conv", (96, 16, 1, 1), (16, 16)),
        "project": ("conv", (24, 96, 1, 1), (16, 16)),  # 24 -> 32 with AVX-512
        "expand2": ("conv", (144, 24, 1, 1), (16, 16)),
        "dw": ("conv", (144, 1, 3, 3), (8, 8)),
        "stem": ("conv", (32, 3, 3, 3), (32, 32)),  # reads NCHW directly: input channels as they are
        "fc": ("linear", (10, 144)),
    }
    events = []
    for _ in range(5):
        events += [
            _event("a_nchwc", "Conv", [(1, 16, 16, 16), (96, 16, 1, 1)], (1, 96, 16, 16), 20),
            _event("b_nchwc", "Conv", [(1, 96, 16, 16), (pad(24), 96, 1, 1)], (1, pad(24), 16, 16), 10),
            _event("c_nchwc", "Conv", [(1, pad(24), 16, 16), (144, pad(24), 1, 1)], (1, 144, 16, 16), 30),
            _event("d_nchwc", "Conv", [(1, 144, 16, 16), (144, 1, 3, 3)], (1, 144, 8, 8), 40),
            _event("e_nchwc", "Conv", [(1, 3, 64, 64), (32, 3, 3, 3)], (1, 32, 32, 32), 50),
            # a pre-packed weight is left out of the event; the bias stays
            _event("gemm", "Gemm", [(1, 144), (10,)], (1, 10), 5),
            _event("silu", "QuickGelu", [(1, pad(24), 16, 16)], (1, pad(24), 16, 16), 7),
        ]
    ms = profile_layer_ms(events, layers)
    assert ms == pytest.approx(
        {"expand": 0.02, "project": 0.01, "expand2": 0.03, "dw": 0.04, "stem": 0.05, "fc": 0.005}
    )
    ew = profile_layer_ms(events, layers, elementwise=True)
    assert ew["project"] == pytest.approx(0.01 + 0.007) and ew["expand"] == pytest.approx(0.02)


def test_layers_identical_once_padded_share_their_time():
    from presso.compress.latency import profile_layer_ms

    # 20 -> 64 and 24 -> 64 are both 32 -> 64 in 16-channel blocks: the profile cannot tell them apart
    layers = {"a": ("conv", (64, 20, 1, 1), (8, 8)), "b": ("conv", (64, 24, 1, 1), (8, 8)),
              "c": ("conv", (48, 64, 1, 1), (8, 8))}  # fmt: skip
    events = [_event("x", "Conv", [(1, 32, 8, 8), (64, 32, 1, 1)], (1, 64, 8, 8), 10),
              _event("y", "Conv", [(1, 32, 8, 8), (64, 32, 1, 1)], (1, 64, 8, 8), 30),
              _event("z", "Conv", [(1, 64, 8, 8), (48, 64, 1, 1)], (1, 48, 8, 8), 16)]  # fmt: skip
    assert profile_layer_ms(events, layers) == pytest.approx({"a": 0.02, "b": 0.02, "c": 0.016})
