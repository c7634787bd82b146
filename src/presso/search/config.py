"""What a search is asked for: ``SearchConfig`` (data, device, budget, space, trials, proxy training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from presso.errors import ConfigError, check_fields

SEARCH_VERSION = 3  # 2: widths down to 8 channels; 3: fused blocks, expansion 1 (an older study cannot be resumed)


@dataclass
class SearchConfig:
    """latency_ms: the budget on ``device`` (ONNX Runtime, FP32, batch 1, ``threads``). max_params: a parameter
    budget as well (e.g. a microcontroller's flash); a candidate over it is skipped before any training, as one
    predicted over the latency budget is.

    trials: finished trials (trained + skipped) the study should hold; time_budget_min stops a worker earlier.
    proxy_epochs / proxy_fraction: proxy training per candidate (epochs, share of the training split);
        proxy_val: images held out of the training split that score it (the validation split judges the winner
        only). final_epochs: the winner's full training.
    measure_top: feasible candidates measured on the device at the end (best proxy top-1 first).
    """

    latency_ms: float
    device: str = "local"
    trials: int = 30
    time_budget_min: float | None = None
    space: str = "mobilenet"
    proxy_epochs: int = 2
    proxy_fraction: float = 0.25
    proxy_val: int = 2000
    final_epochs: int = 15
    measure_top: int = 3
    batch_size: int = 128
    threads: int | None = None
    seed: int = 0
    warm_start: bool = True
    final: bool = True
    heartbeat_s: int = 10  # a worker silent for 4 heartbeats is dead: its trial is failed and retried
    max_params: int | None = None
    version: int = SEARCH_VERSION

    def __post_init__(self) -> None:
        # every number finite and in range, named, before a study is opened (a NaN budget is met by no candidate)
        check_fields(self, latency_ms=(0, None, "(]"), max_params=(1, None), time_budget_min=(0, None, "(]"),
                     trials=(1, None), proxy_epochs=(1, None), proxy_fraction=(0, 1, "(]"), proxy_val=(1, None),
                     final_epochs=(1, None), measure_top=(1, None), batch_size=(1, None), threads=(1, None),
                     seed=(0, 2**63 - 1), heartbeat_s=(1, None))  # fmt: skip
        if not self.latency_ms > 0:
            raise ConfigError(f"The latency budget must be positive, not {self.latency_ms} ms.")
        if self.trials < 1 or self.proxy_epochs < 1 or self.final_epochs < 1:
            raise ConfigError("trials, proxy_epochs and final_epochs must be at least 1.")
        if not 0 < self.proxy_fraction <= 1:
            raise ConfigError(f"proxy_fraction is a share in (0, 1], not {self.proxy_fraction}.")

    def study_settings(self) -> dict[str, Any]:
        """What makes two searches the same study (a worker with other settings must not join it)."""
        keys = ("latency_ms", "device", "space", "proxy_epochs", "proxy_fraction", "proxy_val", "batch_size", "seed",
                "version")  # fmt: skip
        settings = {k: getattr(self, k) for k in keys}
        if self.max_params is not None:  # only when set: a study started before the option existed stays joinable
            settings["max_params"] = self.max_params
        return settings
