"""Training settings: one dataclass, the same words in the API, the CLI and the saved card."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from presso.errors import ConfigError, check_fields

OPTIMIZERS = ("adamw", "sgd")
AMP = ("auto", "on", "off")
# Settings that may differ between a run and its resumption without changing the result.
RESUMABLE_CHANGES = frozenset({"workers", "device"})


@dataclass
class TrainConfig:
    """Supervised training and distillation.

    With a teacher, the loss is ``(1 - kd_alpha) * CE + kd_alpha * match`` when the data has labels and the outputs
    are class scores, and the label-free ``match`` alone otherwise (see ``presso.train.distill``).
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float | None = None  # adamw 2e-3, sgd 0.1 (for batch 128; scaled linearly with batch size; / 10 for QAT)
    weight_decay: float | None = None  # adamw 0.05, sgd 5e-4
    momentum: float = 0.9
    warmup: float = 0.05  # fraction of all steps spent warming the learning rate up linearly
    label_smoothing: float = 0.1
    augment: bool = True
    amp: str = "auto"  # bf16 autocast on CUDA; off on CPU
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.1
    image_size: tuple[int, int] | None = None
    workers: int | None = None  # decoding processes for image files (default: min(4, CPUs))
    grad_clip: float | None = 5.0
    # distillation (used when a teacher is given)
    kd_alpha: float = 0.7
    temperature: float = 4.0
    feature_match: bool = False
    feature_weight: float = 1.0
    # a new classifier for the data's classes (``presso.models.weights.replace_head``), e.g. for pretrained weights
    new_head: bool = False
    # the task (presso.tasks): "classify", "detect"; None infers it from the model's card, the data and the model
    task: str | None = None
    # detection without labels: learn from the teacher's boxes after NMS (pseudo-labels) instead of matching its
    # dense head outputs
    pseudo_labels: bool = False
    # quantization-aware training (presso.models.qat): fake quantization as ONNX Runtime runs INT8, BatchNorm
    # folded, distilled from the FP32 model itself unless a teacher is given; a tenth of the learning rate
    qat: bool = False
    # QAT weights in ONNX Runtime's reduced range (-64..64), which x86 CPUs without VNNI need (their uint8 x int8
    # kernels saturate int16 sums with full-range weights); None: as this CPU needs. Set it for the deployment CPU
    qat_reduce_range: bool | None = None
    version: int = 1

    def __post_init__(self) -> None:
        from presso.data.images import MAX_IMAGE_SIDE

        if self.image_size is not None:
            size = self.image_size
            self.image_size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)  # type: ignore
            if len(self.image_size) != 2 or not all(1 <= v <= MAX_IMAGE_SIDE for v in self.image_size):
                raise ConfigError(f"TrainConfig: image_size must be (H, W) in [1, {MAX_IMAGE_SIDE}], not {size}.")
        # every number finite (NaN passes no comparison, but inf passes many) and in a sane range, named
        check_fields(self, epochs=(1, None), batch_size=(1, None), seed=(0, 2**63 - 1), lr=(0, None, "(]"),
                     weight_decay=(0, None), momentum=(0, 1), warmup=(0, 1, "[)"), label_smoothing=(0, 1, "[)"),
                     val_fraction=(0, 1, "()"), workers=(0, 1024), grad_clip=(0, None, "(]"), kd_alpha=(0, 1),
                     temperature=(0, None, "(]"), feature_weight=(0, None))  # fmt: skip
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.weight_decay is None or self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0.0 <= self.warmup < 1.0, "warmup is a fraction of the steps, in [0, 1)"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (self.amp in AMP, f"amp must be one of {AMP}"),
            (0.0 < self.val_fraction < 1.0, "val_fraction must be in (0, 1)"),
            (0.0 <= self.kd_alpha <= 1.0, "kd_alpha must be in [0, 1]"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"TrainConfig: {message}.")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        base = 2e-3 if self.optimizer == "adamw" else 0.1
        return base * self.batch_size / 128 / (10 if self.qat else 1)

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.optimizer == "adamw" else 5e-4

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        a, b = self.to_json(), other.to_json()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in RESUMABLE_CHANGES}
