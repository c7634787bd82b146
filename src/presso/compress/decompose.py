"""Low-rank decomposition of convolutions and linear layers.

- ``tucker``: Tucker-2 of a Conv2d weight ``[O, I, kh, kw]`` on its channel modes -> 1x1 (I->Ri), kh x kw core
  (Ri->Ro, the original stride/padding/dilation), 1x1 (Ro->O, the original bias); by HOSVD (``torch.linalg``).
- ``cp``: CP (PARAFAC) of rank R -> 1x1 (I->R), depthwise kh x 1, depthwise 1 x kw, 1x1 (R->O) (Lebedev et al.,
  2015). TensorLy's ``parafac``.
- ``svd``: a Linear (or 1x1 Conv2d) ``W = U S V^T`` -> two layers through rank R (``torch.linalg.svd``).

Every replacement is an ``nn.Sequential`` of standard layers -- it exports to ONNX and can be pruned afterwards --
and the recipe records each layer's method and ranks so a model directory rebuilds the same structure without
decomposing again. Layers that cannot or should not be decomposed are skipped and named with the reason.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from presso.compress.vbmf import apply_offset, energy_rank
from presso.errors import ConfigError
from presso.models.recipe import build, resolve

METHODS = ("tucker", "cp", "svd")
RANK_RULES = ("vbmf", "energy", "ratio")


@dataclass
class DecomposeConfig:
    """Low-rank decomposition.

    method: tucker | cp (k x k convolutions) | svd (linear layers and 1x1 convolutions).
    rank: how ranks are chosen where ``per_layer`` does not give them -- ``vbmf`` (EVBMF estimate, moved by
        ``vbmf_offset`` in [-1, 1]: +1 full rank, -1 rank 1), ``energy`` (keep ``energy`` of the squared singular
        values), or ``ratio`` (keep ``rank_ratio`` of the full rank).
    per_layer: layer name -> rank (svd, cp) or [out_rank, in_rank] (tucker); 0 leaves the layer as it is.
    ignore: layer names or glob patterns left as they are.
    max_cost: skip a layer whose decomposition would keep more than this share of its MACs (1.0: only require a
        saving at all).
    """

    method: str = "tucker"
    rank: str = "vbmf"
    vbmf_offset: float = 0.0
    energy: float = 0.9
    rank_ratio: float = 0.5
    per_layer: dict[str, Any] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    max_cost: float = 1.0
    cp_iterations: int = 30  # ALS sweeps; each costs about O(O*I*kh*kw*R), so large layers take seconds apiece
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"Unknown decomposition '{self.method}': use one of {', '.join(METHODS)}.")
        if self.rank not in RANK_RULES:
            raise ConfigError(f"Unknown rank rule '{self.rank}': use one of {', '.join(RANK_RULES)}.")
        if not -1.0 <= self.vbmf_offset <= 1.0:
            raise ConfigError(f"vbmf_offset {self.vbmf_offset} is outside [-1, 1].")
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy {self.energy} must be in (0, 1].")
        if not 0.0 < self.rank_ratio <= 1.0:
            raise ConfigError(f"rank_ratio {self.rank_ratio} must be in (0, 1].")
        if not 0.0 < self.max_cost <= 1.0:
            raise ConfigError(f"max_cost {self.max_cost} must be in (0, 1].")
        for name, r in self.per_layer.items():
            ok = isinstance(r, int) and r >= 0
            ok = ok or (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, int) and v >= 0 for v in r))
            if not ok:
                raise ConfigError(f"Rank for '{name}' must be a non-negative int, or [out_rank, in_rank] for tucker.")
        self.ignore = list(self.ignore)

    def to_json(self) -> dict[str, Any]:
        return {"method_type": "decompose", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecomposeConfig:
        return cls(**{k: v for k, v in data.items() if k != "method_type"})


@dataclass
class DecomposeOutcome:
    layers: dict[str, dict[str, Any]]  # name -> {"method", "ranks", "cost"}
    skipped: list[dict[str, str]]


# --------------------------------------------------------------------------- choosing layers and ranks
def eligible(module: nn.Module, method: str) -> str | None:
    """None when ``method`` applies to ``module``, else the reason it does not."""
    if isinstance(module, nn.Linear):
        return None if method == "svd" else "linear layer: use svd"
    if not isinstance(module, nn.Conv2d) or type(module) is not nn.Conv2d:
        return "not a Conv2d or Linear"
    if module.groups != 1:
        return "grouped or depthwise convolution (already factorised)"
    if module.padding_mode != "zeros":
        return f"padding mode '{module.padding_mode}'"
    one_by_one = module.kernel_size == (1, 1)
    if method == "svd" and not one_by_one:
        return f"{module.kernel_size[0]}x{module.kernel_size[1]} convolution: use tucker or cp"
    if method in ("tucker", "cp") and one_by_one:
        return "1x1 convolution: use svd"
    if isinstance(module.padding, str):
        return f"padding='{module.padding}' (give explicit padding)"
    return None


def full_ranks(module: nn.Module, method: str) -> tuple[int, ...]:
    if isinstance(module, nn.Linear):
        return (min(module.in_features, module.out_features),)
    o, i, kh, kw = module.weight.shape
    if method == "svd":
        return (min(o, i),)
    if method == "tucker":
        return (o, i)
    return (min(o * i, o * kh * kw, i * kh * kw),)  # a generous bound for CP


@dataclass
class LayerPlan:
    """What rank choice needs to know about one layer, computed once: the spectra of its weight's unfoldings
    (output-channel mode, and input-channel mode for convolutions), its MACs, and its input/output sizes."""

    name: str
    module: nn.Module
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    macs: int
    _spectra: list[tuple[Any, int, int]] | None = None

    @property
    def spectra(self) -> list[tuple[Any, int, int]]:
        if self._spectra is None:
            w = self.module.weight.detach().float().cpu()
            mats = [w.reshape(w.shape[0], -1)]
            if w.ndim == 4 and w.shape[2:] != (1, 1):
                mats.append(w.transpose(0, 1).reshape(w.shape[1], -1))
            self._spectra = [(torch.linalg.svdvals(m).double().numpy(), *m.shape) for m in mats]
        return self._spectra


def choose_ranks(plan: LayerPlan, cfg: DecomposeConfig, offset: float | None = None) -> tuple[int, ...]:
    """Ranks for one layer by the config's rule (``offset`` overrides ``vbmf_offset``, for budget searches)."""
    from presso.compress.vbmf import evbmf_rank_from_spectrum

    offset = cfg.vbmf_offset if offset is None else offset
    ranks = []
    for s, rows, cols in plan.spectra:
        cap = min(rows, cols)
        if cfg.rank == "vbmf":
            r = apply_offset(max(1, evbmf_rank_from_spectrum(s, rows, cols)), cap, offset)
        elif cfg.rank == "energy":
            r = energy_rank(s, cfg.energy)
        else:
            r = math.ceil(cfg.rank_ratio * cap)
        ranks.append(max(1, min(r, cap)))
    if cfg.method == "tucker":
        return (ranks[0], ranks[1])
    if cfg.method == "cp":
        return (max(ranks),)  # CP rank from the larger channel-mode estimate, as Kim et al. (2016) do with VBMF
    return (ranks[0],)


def cost(module: nn.Module, method: str, ranks: tuple[int, ...], in_hw: tuple[int, int], out_hw: tuple[int, int]):
    """MACs of the decomposition divided by the layer's MACs (per sample; tokens cancel for linear layers)."""
    if isinstance(module, nn.Linear):
        (r,) = ranks
        return r * (module.in_features + module.out_features) / (module.in_features * module.out_features)
    o, i, kh, kw = module.weight.shape
    hi, wi = in_hw
    ho, wo = out_hw
    base = o * i * kh * kw * ho * wo
    if method == "svd":
        (r,) = ranks
        return (i * r + r * o) * ho * wo / base
    if method == "tucker":
        ro, ri = ranks
        return (i * ri * hi * wi + ri * ro * kh * kw * ho * wo + ro * o * ho * wo) / base
    (r,) = ranks
    return (i * r * hi * wi + r * kh * ho * wi + r * kw * ho * wo + r * o * ho * wo) / base


@torch.no_grad()
def factorize(module: nn.Module, method: str, ranks: tuple[int, ...], *, iterations: int = 30, seed: int = 0):
    """The replacement with weights from the decomposition of ``module``'s weight."""
    seq = build(module, method, ranks)
    # float64 for the small exact cases (tests at full rank), float32 where layers are large enough to cost time
    w = module.weight.detach()
    w = w.double() if w.numel() <= 1 << 16 else w.float()
    bias = module.bias.detach() if module.bias is not None else None
    if method == "svd":
        mat = w.reshape(w.shape[0], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = ranks[0]
        root = s[:r].sqrt()
        first, second = seq[0], seq[1]
        first.weight.copy_((root[:, None] * vh[:r]).reshape(first.weight.shape))
        second.weight.copy_((u[:, :r] * root[None]).reshape(second.weight.shape))
    elif method == "tucker":
        # Tucker-2 by HOSVD: one SVD per channel mode, core = projection of W on both bases. Written with
        # torch.linalg rather than TensorLy's partial_tucker because HOOI's refinement sweeps cost ~10x the time
        # (10.5 s vs ~1 s on a 512x512x3x3 layer) for a marginally lower error, and decomposition runs on every
        # layer of large models; at full rank HOSVD is exact.
        ro, ri = ranks
        u_out = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0][:, :ro]
        u_in = torch.linalg.svd(w.transpose(0, 1).reshape(w.shape[1], -1), full_matrices=False)[0][:, :ri]
        core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)
        seq[0].weight.copy_(u_in.t()[:, :, None, None])
        seq[1].weight.copy_(core)
        seq[2].weight.copy_(u_out[:, :, None, None])
    else:
        import tensorly as tl
        from tensorly.decomposition import parafac

        (r,) = ranks
        with tl.backend_context("pytorch"):
            with warnings.catch_warnings():  # TensorLy pads an SVD start whose rank exceeds a mode's size, noisily
                warnings.simplefilter("ignore")
                cp = parafac(
                    w, rank=r, init="svd", n_iter_max=iterations, tol=1e-8, normalize_factors=True, random_state=seed
                )
        weights, (a, b, c, d) = cp.weights, cp.factors  # a: O x r, b: I x r, c: kh x r, d: kw x r
        seq[0].weight.copy_(b.t()[:, :, None, None])
        seq[1].weight.copy_(c.t()[:, None, :, None])
        seq[2].weight.copy_(d.t()[:, None, None, :])
        seq[3].weight.copy_((a * weights[None])[:, :, None, None])
    if bias is not None:
        seq[-1].bias.copy_(bias)
    return seq


# --------------------------------------------------------------------------- the verb
def plan_layers(model: nn.Module, inputs: tuple, cfg: DecomposeConfig):
    """The layers ``cfg`` may decompose (with their plans), and those it skips with the reason."""
    sizes = _layer_sizes(model, inputs)
    modules = dict(model.named_modules())
    unknown = [n for n in cfg.per_layer if n not in modules]
    if unknown:
        from presso.errors import closest

        raise ConfigError(f"Per-layer ranks name unknown layers: {unknown[:3]}.{closest(unknown[0], modules)}")
    plans: list[LayerPlan] = []
    skipped: list[dict[str, str]] = []
    for name, module in modules.items():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or any(fnmatch.fnmatchcase(name, p) for p in cfg.ignore):
            continue
        reason = eligible(module, cfg.method)
        if reason is not None:
            if name in cfg.per_layer:
                raise ConfigError(f"Per-layer ranks name '{name}', which {cfg.method} cannot decompose: {reason}.")
            if not reason.startswith("not a"):
                skipped.append({"name": name, "reason": reason})
            continue
        if name not in sizes:
            skipped.append({"name": name, "reason": "not reached by the example inputs"})
            continue
        in_hw, out_hw, macs = sizes[name]
        plans.append(LayerPlan(name, module, in_hw, out_hw, macs))
    return plans, skipped


def ranks_for(plan: LayerPlan, cfg: DecomposeConfig, offset: float | None = None) -> tuple[int, ...] | None:
    """The ranks to use for a layer (None: leave it)."""
    given = cfg.per_layer.get(plan.name)
    if given == 0:
        return None
    if given is None:
        return choose_ranks(plan, cfg, offset)
    ranks = tuple(given) if isinstance(given, (list, tuple)) else (int(given),)
    if len(ranks) != len(full_ranks(plan.module, cfg.method)):
        raise ConfigError(f"'{plan.name}': {cfg.method} takes {len(full_ranks(plan.module, cfg.method))} rank(s).")
    return ranks


def decompose_model(model: nn.Module, inputs: tuple, cfg: DecomposeConfig, progress=None) -> DecomposeOutcome:
    plans, skipped = plan_layers(model, inputs, cfg)
    layers: dict[str, dict[str, Any]] = {}
    for k, plan in enumerate(plans):
        if progress:
            progress(k, len(plans))
        ranks = ranks_for(plan, cfg)
        if ranks is None:
            continue
        share = cost(plan.module, cfg.method, ranks, plan.in_hw, plan.out_hw)
        if share >= cfg.max_cost:
            skipped.append({"name": plan.name, "reason": f"rank {list(ranks)} would keep {share:.0%} of its MACs"})
            continue
        replacement = factorize(plan.module, cfg.method, ranks, iterations=cfg.cp_iterations, seed=cfg.seed)
        parent, attr, _ = resolve(model, plan.name)
        setattr(parent, attr, replacement)
        layers[plan.name] = {"method": cfg.method, "ranks": list(ranks), "cost": round(share, 4)}
    if progress:
        progress(len(plans), len(plans))
    return DecomposeOutcome(layers, skipped)


def _layer_sizes(model: nn.Module, inputs: tuple) -> dict[str, tuple[tuple[int, int], tuple[int, int], int]]:
    """Input/output H x W ((1, 1) for linear layers) and MACs of every Conv2d / Linear the example inputs reach."""
    sizes: dict[str, tuple[tuple[int, int], tuple[int, int], int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):

            def hook(mod, args, out, name=name):
                if not isinstance(out, torch.Tensor):
                    return
                if isinstance(mod, nn.Conv2d) and args:
                    o, i_g, kh, kw = mod.weight.shape
                    hw_in, hw_out = tuple(args[0].shape[-2:]), tuple(out.shape[-2:])
                    macs = o * i_g * kh * kw * hw_out[0] * hw_out[1] * (out.shape[0] if out.ndim == 4 else 1)
                    sizes[name] = (hw_in, hw_out, int(macs))
                elif isinstance(mod, nn.Linear):
                    tokens = out.numel() // max(1, mod.out_features)
                    sizes[name] = ((1, 1), (1, 1), int(tokens * mod.in_features * mod.out_features))

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return sizes
