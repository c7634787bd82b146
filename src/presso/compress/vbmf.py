"""Rank selection by Empirical Variational Bayesian Matrix Factorization (Nakajima, Sugiyama, Babacan, Tomioka,
"Global analytic solution of fully-observed variational Bayesian matrix factorization", JMLR 2013).

EVBMF has a closed form: given the singular values of a matrix and the noise variance, the components that survive
are exactly those whose singular value exceeds a threshold; the noise variance itself is estimated by minimising a
one-dimensional objective. No maintained Python package ships it (the snippets in circulation are unpackaged research
code), so it is written here from the paper, with numpy/scipy doing the numerics.
"""

from __future__ import annotations

import math

import numpy as np


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """The positive root of tau^2 - (x - (1 + alpha)) tau + alpha = 0 (the shrunk signal-to-noise ratio)."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _objective(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, x_bar: float) -> float:
    """The EVBMF free energy as a function of the noise variance (JMLR 2013, Theorem 3 / eq. 35)."""
    H = len(s)
    alpha = L / M
    x = s**2 / (M * sigma2)
    big, small = x[x > x_bar], x[x <= x_bar]
    tau_big = _tau(big, alpha)
    value = np.sum(small - np.log(small))
    value += np.sum(big - tau_big) + np.sum(np.log((tau_big + 1.0) / big)) + alpha * np.sum(np.log(tau_big / alpha + 1))
    value += residual / (M * sigma2) + (L - H) * math.log(sigma2)
    return float(value)


def evbmf_rank(matrix, sigma2: float | None = None) -> int:
    """The rank EVBMF keeps for ``matrix`` (any 2-D array or tensor), estimating the noise variance if not given."""
    Y = np.asarray(matrix.detach().cpu().double() if hasattr(matrix, "detach") else matrix, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError("evbmf_rank needs a 2-D matrix")
    return evbmf_rank_from_spectrum(np.linalg.svd(Y, compute_uv=False), *Y.shape, sigma2=sigma2)


def evbmf_rank_from_spectrum(s: np.ndarray, rows: int, cols: int, sigma2: float | None = None) -> int:
    """EVBMF's rank from the singular values ``s`` of a full ``rows`` x ``cols`` matrix (all min(rows, cols) of
    them), so a spectrum computed once serves every offset a budget search tries."""
    from scipy.optimize import minimize_scalar

    L, M = min(rows, cols), max(rows, cols)
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1][:L]
    H = len(s)
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)  # the threshold constant of the paper (solution of its eq. 33)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0  # the whole spectrum is given
    if sigma2 is None:
        # Search bounds for sigma2 (paper, Sec. 5.1): above, all energy is noise; below, the components beyond the
        # largest rank EVBMF could ever keep are pure noise.
        upper = (np.sum(s**2) + residual) / (L * M)
        if upper <= 0:
            return 0
        h_max = min(math.ceil(L / (1 + alpha)) - 1, H) - 1
        h_max = max(0, min(h_max, H - 2))
        tail = s[h_max + 1 :]
        lower = max(s[h_max + 1] ** 2 / (M * x_bar), float(np.mean(tail**2)) / M) if len(tail) else upper * 1e-6
        lower = min(lower, upper * (1 - 1e-9))
        result = minimize_scalar(_objective, args=(L, M, s, residual, x_bar), bounds=(lower, upper), method="bounded")
        sigma2 = float(result.x)
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int(np.sum(s > threshold))


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the squared singular values ``s`` (the Frobenius energy)."""
    s2 = np.sort(np.asarray(s, dtype=np.float64))[::-1] ** 2
    cum = np.cumsum(s2) / max(float(s2.sum()), 1e-30)
    return int(min(len(s2), np.searchsorted(cum, energy - 1e-12) + 1))


def apply_offset(rank: int, full: int, offset: float) -> int:
    """A calibration offset in [-1, 1]: positive moves the rank toward full rank (more accuracy), negative toward 1
    (more compression); 0 keeps the estimate. E.g. offset 0.5 keeps half of what VBMF would have removed."""
    if offset >= 0:
        r = rank + offset * (full - rank)
    else:
        r = rank * (1 + offset)
    return int(min(full, max(1, round(r))))
