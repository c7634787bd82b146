"""HF transformers DETR-style detectors through the detection task on ``shapes-det``: built offline from a config with
the data's class count, trained by their own set loss, scored by COCO mAP, distilled query by query (with labels and
without them), pruned where the dependency graph allows, reloaded bit-identically and exported to ONNX; hostile
configs and a missing extra get their one line.

A DETR learns slowly (hundreds of epochs on COCO): these tests check that every verb runs and moves the numbers the
right way, not the mAP a long training reaches. The bounds were measured on this file's first runs (2 CPU cores).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import socket
import sys

import numpy as np
import pytest
import torch

import presso
from presso.compress import PruneConfig
from presso.compress.target import Target
from presso.errors import ModelSourceError
from presso.models.directory import save_model_dir
from presso.models.figures import count_macs

transformers = pytest.importorskip("transformers")

DATA = "shapes-det"  # 360 training and 40 held-out 64 px images, 3 classes
# HF's own ResNet at 1/16 of ResNet-18's width, one block per stage (random init, no download)
BACKBONE = {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
            "layer_type": "basic", "out_features": ["stage4"]}  # fmt: skip
TINY = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
        "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 20,
        "backbone_config": BACKBONE}  # fmt: skip
SOURCE = "transformers:DetrForObjectDetection"
TRAIN = dict(epochs=4, batch_size=16, lr=2e-3, seed=0)


def _tiny(seed: int = 0, **extra):
    from presso.models.weights import fit_to_data

    kwargs, added = fit_to_data(SOURCE, {**TINY, **extra}, classes=3, channels=3)
    torch.manual_seed(seed)
    return presso.load_model(SOURCE, **kwargs), added


@pytest.fixture(scope="module")
def data():
    return presso.load_data(DATA)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("hf") / "detr"
    model, _ = _tiny()
    result = presso.train(model, data, presso.TrainConfig(**TRAIN), output_dir=out)
    return result, out


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access during a test that must stay offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------- the source
def test_the_source_builds_offline_with_the_data_class_count(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    model, added = _tiny()
    assert added == {"num_classes": 3}
    assert model.num_classes == 3 and model.hf.config.num_labels == 3
    card = model.presso_card
    assert card.source["source"] == SOURCE and card.source["kwargs"]["num_classes"] == 3
    assert card.source["weights"] == "random init"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), model.raw_outputs():
        logits, boxes = model(x)
    assert logits.shape == (2, 20, 3 + 1) and boxes.shape == (2, 20, 4)  # DETR's "no object" class last
    assert 0.0 <= float(boxes.min()) and float(boxes.max()) <= 1.0
    with torch.no_grad():
        dense = model(x)  # eval mode: Presso's dense detections, as YOLO's [N, 4 + C, anchors]
    assert dense.shape == (2, 4 + 3, 20)
    assert torch.allclose(dense[:, :4].transpose(1, 2), boxes * 64) and torch.allclose(
        dense[:, 4:].transpose(1, 2), logits.softmax(-1)[..., :-1]
    )
    save_model_dir(model, tmp_path / "m")
    again = presso.load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(x), dense)


def test_a_folder_with_config_and_safetensors_loads_as_hf_computes_it(tmp_path):
    cfg = transformers.DetrConfig(num_labels=3, **TINY)
    torch.manual_seed(1)
    hf = transformers.DetrForObjectDetection(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors
    model = presso.load_model(f"transformers:{tmp_path / 'hf'}")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), model.raw_outputs():
        ref = hf(pixel_values=x)
        logits, boxes = model(x)
    # the frozen BatchNorm rewritten as an nn.BatchNorm2d computes what HF's does
    assert torch.allclose(logits, ref.logits, atol=1e-5) and torch.allclose(boxes, ref.pred_boxes, atol=1e-5)
    assert model.presso_card.source["weights"]["sha256"]
    assert model.presso_card.source["config"]["architectures"] == ["DetrForObjectDetection"]
    # the model directory rebuilds from the card's config: the folder is no longer needed
    save_model_dir(model, tmp_path / "m")
    (tmp_path / "hf" / "config.json").unlink()
    with torch.no_grad():
        assert torch.equal(presso.load_model(tmp_path / "m")(x), model(x))


@pytest.mark.parametrize(
    "config,key",
    [({"auto_map": {"AutoModel": "modeling_evil.Evil"}}, "auto_map"),
     ({"trust_remote_code": True}, "trust_remote_code"),
     ({"backbone_config": {"model_type": "resnet", "auto_map": {"AutoBackbone": "x.Y"}}}, "auto_map")],
    ids=["auto_map", "trust_remote_code", "nested"],
)  # fmt: skip
def test_a_config_naming_custom_code_is_refused_with_one_line(tmp_path, config, key):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "detr", "architectures": ["DetrForObjectDetection"],
                                                    **config}))  # fmt: skip
    (folder / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(ModelSourceError) as e:
        presso.load_model(f"transformers:{folder}")
    assert f"names custom code ('{key}')" in str(e.value) and "\n" not in str(e.value)


def test_model_arguments_that_would_run_code_or_download_are_refused():
    with pytest.raises(ModelSourceError, match=r"names custom code \('trust_remote_code'\)"):
        presso.load_model(SOURCE, trust_remote_code=True)
    with pytest.raises(ModelSourceError, match="use_pretrained_backbone=true would download weights"):
        presso.load_model(SOURCE, use_pretrained_backbone=True)


def test_unknown_names_get_a_did_you_mean():
    with pytest.raises(ModelSourceError, match="Did you mean: DetrForObjectDetection"):
        presso.load_model("transformers:DetrForObjectDetectoin")
    with pytest.raises(ModelSourceError, match="no config key 'd_modle'. Did you mean: d_model"):
        presso.load_model(SOURCE, d_modle=32)


def test_without_the_package_one_line_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an import finds when it is not installed
    with pytest.raises(ModelSourceError) as e:
        presso.load_model(SOURCE)
    assert str(e.value) == f'{SOURCE} needs the optional extra: pip install "presso[hf]"'


def test_conditional_detr_builds_trains_a_step_and_predicts_by_sigmoid_scores():
    from presso.tasks.detectors import detector_for

    torch.manual_seed(0)
    model = presso.load_model("transformers:ConditionalDetrForObjectDetection", num_classes=3, **TINY)
    det = detector_for(model)
    x = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    model.train()
    loss = det.loss(model, x, targets)
    loss.backward()
    assert torch.isfinite(loss) and model.hf.class_labels_classifier.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad(), model.raw_outputs():
        logits = model(x)[0]
    assert logits.shape == (2, 20, 3)  # sigmoid family: no "no object" column
    with torch.no_grad():
        dense = model(x)
        preds = det.predict(model, x, conf=0.0, iou=1.0)
    assert torch.allclose(dense[:, 4:].transpose(1, 2), logits.sigmoid())  # per-class probabilities
    assert len(preds) == 2 and preds[0]["boxes"].shape[1] == 4 and len(preds[0]["scores"]) == 20  # a box per query
    assert int(preds[0]["labels"].max()) <= 2


# --------------------------------------------------------------------------- train, evaluate
def test_presso_train_lowers_the_set_loss_and_evaluate_reports_coco_map(trained, data):
    result, out = trained
    history = result.history
    # measured: 7.15 -> 5.78 in 4 epochs
    assert history[-1]["train_loss"] < 0.85 * history[0]["train_loss"], history
    assert result.best["task"] == "detect"
    scores = presso.evaluate(presso.load_model(out), data)
    assert scores.task == "detect"
    assert set(scores.metrics) >= {"map50_95", "map50", "per_class"}
    assert set(scores.metrics["per_class"]) == {"circle", "square", "triangle"}
    assert 0.0 <= scores.metrics["map50_95"] <= scores.metrics["map50"] <= 1.0
    assert presso.load_model(out).presso_card.task == "detect"


def test_predict_follows_hf_post_processing(trained):
    """Without NMS (iou=1.0), predictions are HF's post-processing: each query's best class but "no object", its
    box as xyxy pixels, best first."""
    from presso.tasks.detectors import detector_for

    _, out = trained
    model = presso.load_model(out)
    x = torch.rand(2, 3, 64, 64)
    preds = detector_for(model).predict(model, x, conf=0.0, iou=1.0)
    with torch.no_grad(), model.raw_outputs():
        logits, boxes = model(x)
    prob = logits.softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    order = scores[0].argsort(descending=True, stable=True)
    assert torch.allclose(preds[0]["scores"], scores[0][order]) and torch.equal(preds[0]["labels"], labels[0][order])
    cx, cy, w, h = boxes[0][order].unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * 64
    assert torch.allclose(preds[0]["boxes"], xyxy, atol=1e-4)
    high = detector_for(model).predict(model, x, conf=0.5)
    assert all(bool((p["scores"] > 0.5).all()) for p in high)


# --------------------------------------------------------------------------- compress, reload, ONNX
@pytest.fixture(scope="module")
def pruned(trained, data):
    _, out = trained
    original = presso.load_model(out)
    result = presso.compress(original, "1,3,64,64", PruneConfig(ratio=0.3), target=Target(macs=0.5, tolerance=0.05))
    return original, result


def test_prune_halves_the_macs_and_leaves_attention_out_with_reasons(pruned):
    original, result = pruned
    s = result.summary()
    assert 0.45 <= s["macs_ratio"] <= 0.55, s["macs_ratio"]
    layers = s["per_layer"]
    assert layers["hf.model.backbone.model.encoder.stages.3.layers.0.layer.0.convolution"]["after"] < 128
    assert layers["hf.model.encoder.layers.0.self_attn.q_proj"]["after"] == 32  # attention dims left as they are
    reasons = {r["name"]: r["reason"] for r in s["skipped_layers"]}
    assert "hf.class_labels_classifier" in reasons and any("self_attn" in name for name in reasons)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert result.model.eval()(x).shape == original(x).shape == (2, 4 + 3, 20)


def test_the_pruned_model_reloads_bit_identically_and_exports_to_onnx(pruned, tmp_path):
    import onnxruntime as ort

    from presso.models.onnx import export_onnx

    _, result = pruned
    model = result.model.eval()
    save_model_dir(model, tmp_path / "p")
    again = presso.load_model(tmp_path / "p")
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(again(x), ref)
    export_onnx(model, (x[:1],), tmp_path / "p.onnx", dynamic_batch=True)
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert got.shape == (2, 4 + 3, 20)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-3 * float(ref.abs().max()))


# --------------------------------------------------------------------------- distillation
def _distance(student, teacher, x) -> float:
    """What query-by-query KD minimises (at temperature 1) between the two models' raw outputs."""
    from presso.tasks.detectors import query_kd

    with torch.no_grad(), student.raw_outputs(), teacher.raw_outputs():
        (sl, sb), (tl, tb) = student.eval()(x)[:2], teacher.eval()(x)[:2]
    return float(query_kd(sl, sb, tl, tb, softmax=True, temperature=1.0))


@pytest.mark.parametrize("labels", [True, False], ids=["with-labels", "label-free"])
def test_kd_brings_a_student_closer_to_its_teacher(trained, data, labels):
    _, out = trained
    teacher = presso.load_model(out)
    student, _ = _tiny(seed=1)  # another initialisation: far from the teacher's outputs
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = _distance(student, teacher, x)
    train_data = data if labels else dataclasses.replace(data, classes=None)
    cfg = presso.TrainConfig(epochs=2, batch_size=16, lr=2e-3, seed=0)
    run = presso.train(student, train_data, cfg, teacher=teacher)
    after = _distance(run.model, teacher, x)
    # measured: 0.96 -> 0.31 with labels (the set loss pulls too), 0.96 -> 0.04 label-free
    assert after < (0.5 if labels else 0.15) * before, (before, after)
    if not labels:
        assert run.best.get("map50") is None  # nothing to score against: kept by the matching


@pytest.mark.parametrize("pseudo", [False, True], ids=["query-matching", "pseudo-boxes"])
def test_label_free_kd_runs_on_the_pruned_student(pruned, data, pseudo):
    original, result = pruned
    cfg = presso.TrainConfig(epochs=1, batch_size=16, lr=1e-3, seed=0, pseudo_labels=pseudo)
    run = presso.train(copy.deepcopy(result.model), dataclasses.replace(data, classes=None), cfg, teacher=original)
    assert run.history[0]["train_loss"] > 0 and "match_loss" in run.history[0]
    x = (torch.rand(1, 3, 64, 64),)
    assert count_macs(run.model, x) == count_macs(result.model, x)


def test_the_query_kd_is_zero_for_the_teacher_itself_and_grows_with_distance():
    from presso.tasks.detectors import query_kd

    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 20, 4, generator=g), torch.rand(2, 20, 4, generator=g) * 0.5 + 0.25
    same = query_kd(logits, boxes, logits, boxes, softmax=True, temperature=4.0)
    assert abs(float(same)) < 1e-5
    near = query_kd(logits + 0.1 * torch.randn(2, 20, 4, generator=g), boxes + 0.01, logits, boxes, softmax=True,
                    temperature=4.0)  # fmt: skip
    far = query_kd(-logits, boxes.flip(-1) * 0.5, logits, boxes, softmax=True, temperature=4.0)
    assert 0 < float(near) < float(far)


def test_count_macs_matches_the_reloaded_pruned_model(pruned, tmp_path):
    _, result = pruned
    save_model_dir(result.model, tmp_path / "p")
    x = (torch.rand(1, 3, 64, 64),)
    assert count_macs(presso.load_model(tmp_path / "p"), x) == count_macs(result.model, x)


# --------------------------------------------------------------------------- convert, package, predict
def test_convert_package_and_predict_give_the_boxes_pytorch_gives(trained, tmp_path):
    """The exported DETR is the dense [N, 4 + C, Q] output every Presso detector exports: convert scores it by mAP
    like PyTorch, and the torch-free bundle decodes the same boxes."""
    from presso.convert import ConvertConfig
    from presso.convert.predict import Predictor
    from presso.tasks.detectors import detector_for

    _, out = trained
    model = presso.load_model(out)
    result = presso.convert(model, "1,3,64,64", ConvertConfig(), output_dir=tmp_path / "onnx", calib=DATA)
    acc = result.accuracy
    assert acc["metric"] == "map50_95" and acc["n"] == 40
    scored = presso.evaluate(model, DATA).metrics
    assert acc["fp32_map50_95"] == pytest.approx(scored["map50_95"], abs=0.01)
    bundle = presso.package(tmp_path / "onnx", tmp_path, name="detr.zip").path
    pred = Predictor(bundle)
    assert pred.task == "detect" and pred.num_classes == 3
    x = np.ascontiguousarray(presso.load_data(DATA).val.images[:4].transpose(0, 3, 1, 2))  # uint8 [4, 3, 64, 64]
    found = pred.boxes(x, conf=0.05)
    with torch.no_grad():
        reference = detector_for(model).predict(model, torch.from_numpy(x).float() / 255, conf=0.05, iou=0.7)
    assert sum(len(f["boxes"]) for f in found) > 0
    for f, t in zip(found, reference, strict=True):
        assert np.array_equal(f["labels"], t["labels"].numpy())
        np.testing.assert_allclose(f["boxes"], t["boxes"].numpy(), atol=1e-2)
        np.testing.assert_allclose(f["scores"], t["scores"].numpy(), atol=1e-4)
