"""Model zoos for tests and benchmarks: real architectures from torchvision and timm, with small inputs.

Each entry is ``(source, input_shape, kwargs)``. Inputs are the smallest that each architecture accepts (most take
32x32), which keeps a sweep over the whole zoo fast while exercising the same graph as full-size inputs.
"""

from __future__ import annotations

from typing import Any

Entry = tuple[str, str, dict[str, Any]]

# torchvision classification models that need something other than 1,3,32,32
_TV_SPECIAL: dict[str, tuple[str, dict[str, Any]]] = {
    "alexnet": ("1,3,64,64", {}),
    "inception_v3": ("1,3,96,96", {"aux_logits": False, "init_weights": False}),
    "googlenet": ("1,3,32,32", {"aux_logits": False, "init_weights": False}),
    "maxvit_t": ("1,3,224,224", {}),
    # Swin pads every stage to whole 7x7 windows: at tiny inputs padded attention dominates the MACs, so the
    # figures would not describe the model; its native size keeps them meaningful.
    "swin_t": ("1,3,224,224", {}),
    "swin_s": ("1,3,224,224", {}),
    "swin_b": ("1,3,224,224", {}),
    "swin_v2_t": ("1,3,256,256", {}),
    "swin_v2_s": ("1,3,256,256", {}),
    "swin_v2_b": ("1,3,256,256", {}),
    "vit_b_16": ("1,3,32,32", {"image_size": 32}),
    "vit_b_32": ("1,3,64,64", {"image_size": 64}),
    "vit_l_16": ("1,3,32,32", {"image_size": 32}),
    "vit_l_32": ("1,3,64,64", {"image_size": 64}),
    "vit_h_14": ("1,3,28,28", {"image_size": 28}),
}


def torchvision_classification() -> list[Entry]:
    """Every torchvision classification model (``list_models(module=torchvision.models)``)."""
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        shape, kwargs = _TV_SPECIAL.get(name, ("1,3,32,32", {}))
        out.append((f"torchvision:{name}", shape, kwargs))
    return out


def torchvision_dense() -> list[Entry]:
    """torchvision detection and segmentation models; each takes a plain (N,3,H,W) image tensor in eval mode."""
    import torchvision

    out = []
    det = {"min_size": 64, "max_size": 64, "weights_backbone": None}
    # R-CNN heads run once per proposal and per detection, and with random weights how many survive score
    # thresholds and NMS changes when the weights do. Keeping every box (no threshold, no suppression) and fixed
    # counts makes their MACs a property of the architecture, comparable before and after pruning.
    rcnn = {
        "rpn_pre_nms_top_n_test": 100,
        "rpn_post_nms_top_n_test": 100,
        "rpn_nms_thresh": 1.0,
        "box_score_thresh": 0.0,
        "box_nms_thresh": 1.0,
        "box_detections_per_img": 10,
    }
    for name in torchvision.models.list_models(module=torchvision.models.detection):
        kwargs = dict(det, **rcnn) if "rcnn" in name else dict(det)
        if name.startswith("ssd"):
            kwargs = {"weights_backbone": None}
            shape = "1,3,320,320" if "320" in name else "1,3,300,300"
        else:
            shape = "1,3,64,64"
        out.append((f"torchvision:{name}", shape, kwargs))
    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        out.append((f"torchvision:{name}", "1,3,64,64", {"weights_backbone": None, "aux_loss": False}))
    return out


# A curated sample across timm's families (CNNs, mobile nets, NAS nets, RepVGG-style, ViT/DeiT, Swin, MLP-Mixer,
# hybrids). The coverage benchmark runs all of them; the test suite runs TIMM_TEST, a lighter subset.
TIMM_SAMPLE: list[str] = """
resnet18 resnet50d resnext26ts seresnext26d_32x4d res2net50_26w_4s resnest14d skresnet18 resnetv2_50 wide_resnet50_2
mobilenetv2_050 mobilenetv2_100 mobilenetv3_small_050 mobilenetv3_large_100 mobilenetv4_conv_small
efficientnet_b0 efficientnet_lite0 tf_efficientnet_b0 efficientnetv2_rw_t tinynet_e
regnetx_002 regnety_002 regnetz_b16 regnetv_040 convnext_atto convnext_pico convnextv2_atto
ghostnet_050 ghostnetv2_100 repvgg_a0 repvit_m0_9 repghostnet_050
densenet121 vit_tiny_patch16_224 deit_tiny_patch16_224 deit_tiny_distilled_patch16_224 deit3_small_patch16_224
swin_tiny_patch4_window7_224 swinv2_cr_tiny_ns_224 mixer_s16_224 resmlp_12_224 gmlp_ti16_224
mobilevit_xxs mobilevitv2_050 efficientformer_l1 efficientformerv2_s0 levit_128s poolformer_s12 poolformerv2_s12
cspresnet50 cspdarknet53 darknet17 dla34 dpn68 hrnet_w18_small inception_v3 inception_v4 xception41 xception65
mnasnet_050 fbnetc_100 spnasnet_100 lcnet_050 hardcorenas_a rexnet_100 nf_resnet26 dm_nfnet_f0 nfnet_l0
selecsls42b ese_vovnet19b_dw crossvit_tiny_240 pit_ti_224 coat_lite_tiny twins_svt_small cait_xxs24_224
tnt_s_patch16_224 convmixer_768_32 edgenext_xx_small fastvit_t8 efficientvit_b0 efficientvit_m0 mobileone_s0
vgg11 vgg11_bn tresnet_m nest_tiny sequencer2d_s xcit_nano_12_p16_224 eva02_tiny_patch14_224 maxvit_tiny_tf_224
coatnet_0_rw_224 gcvit_xxtiny hgnet_tiny hgnetv2_b0 inception_next_tiny focalnet_tiny_srf davit_tiny convit_tiny
visformer_tiny volo_d1_224 pvt_v2_b0 mvitv2_tiny tiny_vit_5m_224 mambaout_femto starnet_s1 rdnet_tiny
ghostnet_100 lambda_resnet26t botnet26t_256 halonet26t cs3darknet_s gernet_s fastvit_sa12 vit_small_patch16_224
vit_base_patch16_224 beit_base_patch16_224 flexivit_small mobilenetv1_100 semnasnet_050 mixnet_s efficientnet_es
resnet10t resnet14t resnet26 resnet34d seresnet18 ecaresnet26t resnetrs50 legacy_seresnet18 bat_resnext26ts
haloregnetz_b sebotnet33ts_256 regnety_004 regnetx_004 dla46_c densenetblur121d hrnet_w18 res2next50 nasnetalarge
pnasnet5large gluon_resnet18_v1b ese_vovnet39b vovnet39a eca_nfnet_l0 convnext_nano convnext_femto_ols
convformer_s18 caformer_s18 samvit_base_patch16 vit_relpos_small_patch16_224 vit_srelpos_small_patch16_224
pit_xs_distilled_224 levit_conv_128s efficientvit_b1 mobilevitv2_075 repvgg_b0 resnet50_gn fbnetv3_b lcnet_100
tf_mobilenetv3_small_minimal_100 hardcorenas_b mobileone_s1 ghostnetv2_130 tinynet_a crossvit_9_240 coat_tiny
xcit_tiny_12_p16_224 swin_s3_tiny_224 sequencer2d_m gcvit_xtiny nest_small cait_xxs36_224 tnt_b_patch16_224
twins_pcpvt_small maxxvit_rmlp_nano_rw_256 coatnet_nano_rw_224
""".split()

# The subset the test suite runs: at least one of every family above, small enough for CI.
TIMM_TEST: list[str] = """
resnet18 resnet50d resnext26ts seresnext26d_32x4d res2net50_26w_4s resnest14d seresnet18 resnetv2_50
mobilenetv2_050 mobilenetv3_small_050 mobilenetv3_large_100 mobilenetv4_conv_small efficientnet_b0 efficientnet_lite0
tf_efficientnet_b0 efficientnetv2_rw_t tinynet_e regnetx_002 regnety_002 regnetz_b16 convnext_atto convnextv2_atto
ghostnet_050 ghostnetv2_100 repvgg_a0 repvit_m0_9 repghostnet_050 densenet121 vit_tiny_patch16_224
deit_tiny_patch16_224 deit_tiny_distilled_patch16_224 swin_tiny_patch4_window7_224 mixer_s16_224 resmlp_12_224
gmlp_ti16_224 mobilevit_xxs mobilevitv2_050 efficientformer_l1 levit_128s poolformer_s12 cspresnet50 darknet17 dla34
dpn68 hrnet_w18_small inception_v3 xception41 mnasnet_050 fbnetc_100 spnasnet_100 lcnet_050 hardcorenas_a rexnet_100
resnet26 selecsls42b ese_vovnet19b_dw pit_ti_224 edgenext_xx_small fastvit_t8 efficientvit_b0 mobileone_s0
vgg11_bn xcit_nano_12_p16_224 convit_tiny pvt_v2_b0 mambaout_femto starnet_s1 hgnetv2_b0 resnet10t ecaresnet26t
gernet_s cs3darknet_s
""".split()


# timm models whose smallest workable input is not 64x64 (or their native size when that is fixed)
_TIMM_SPECIAL: dict[str, tuple[str | None, dict[str, Any]]] = {
    "inception_v3": ("1,3,128,128", {}),
    "inception_v4": ("1,3,128,128", {}),
    "halonet26t": (None, {}),  # None: the native size from the model's config
    "bat_resnext26ts": (None, {}),
    "haloregnetz_b": (None, {}),
    "samvit_base_patch16": ("1,3,256,256", {"img_size": 256}),
}


def timm_entries(names: list[str]) -> list[Entry]:
    """timm models at a small input: 64x64 where the architecture accepts any size, else its native size."""
    import timm

    out = []
    for name in names:
        cfg = timm.get_pretrained_cfg(name, allow_unregistered=True)
        size = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
        native = f"1,{size[0]},{size[1]},{size[2]}"
        fixed = bool(cfg is not None and cfg.fixed_input_size)
        shape, kwargs = _TIMM_SPECIAL.get(name, (native if fixed else "1,3,64,64", {}))
        out.append((f"timm:{name}", shape or native, kwargs))
    return out
