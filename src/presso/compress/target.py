"""What a compressed model must keep: a share of MACs or parameters, or a latency on a device (``Target``)."""

from __future__ import annotations

from dataclasses import dataclass

from presso.errors import BudgetError, ConfigError, check_range


@dataclass
class Target:
    """What the compressed model keeps: a share of MACs or of parameters (one of them), within ``tolerance``."""

    macs: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    device: str | None = None
    tolerance: float = 0.03
    threads: int | None = None  # intra-op threads a latency is measured with here (None: ONNX Runtime's default)
    # device: where a latency target is measured ("local": this machine). With a MACs target it makes the
    # recommended ratios latency-aware: of allocations weighted by measured time per MAC, the fastest there wins.

    def __post_init__(self) -> None:
        given = [k for k in ("macs", "params", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("Give exactly one target: --target-macs, --target-params or --target-latency-ms.")
        # NaN and infinities first: a NaN budget passes every comparison below and is met by no model, so the search
        # would run to exhaustion before saying anything
        for key in given:
            check_range(getattr(self, key), f"Target {key}")
        check_range(self.tolerance, "Target tolerance", 0, 1, low_open=True, high_open=True)
        if self.device not in (None, "local"):
            raise ConfigError(
                f"Device '{self.device}': latency is measured on this machine (--device local) in this version; "
                "remote devices come with the benchmarker's agent."
            )
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"--threads must be a positive number of threads, not {self.threads}.")
        if self.latency_ms is not None:
            if self.latency_ms <= 0:
                raise BudgetError(f"A latency budget must be positive, not {self.latency_ms} ms.")
            return
        share = self.macs if self.macs is not None else self.params
        if not 0.0 < share < 1.0:
            raise BudgetError(f"A target share must be in (0, 1), e.g. 0.5 keeps half; got {share}.")

    @property
    def key(self) -> str:
        return "latency_ms" if self.latency_ms is not None else ("macs" if self.macs is not None else "params")

    @property
    def share(self) -> float:
        if self.latency_ms is not None:
            raise AttributeError("a latency target's share depends on the measured original")
        return float(self.macs if self.macs is not None else self.params)  # type: ignore[arg-type]

    def met(self, achieved: float) -> bool:
        return abs(achieved / self.share - 1.0) <= self.tolerance
