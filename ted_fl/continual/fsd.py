"""Frechet Semantic Distance (GKD spec 2.6) from summed statistics, so no site sends a vector.

A site keeps its codes z (n x D) and sends only (n, sum z, sum z z^T); these add across sites and
batches. From them: mu = s1 / n and the unbiased covariance S = (s2 - n mu mu^T) / (n - 1), in
float64. With n <= D the sample covariance is singular, so S is shrunk towards (tr S / D) I with
the OAS intensity (Chen et al. 2010), which needs only S and n:
    rho = min(1, ((1 - 2/D) tr(S^2) + tr(S)^2) / ((n + 1 - 2/D) (tr(S^2) - tr(S)^2 / D))).
FSD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})  (the Frechet distance of FID), with
Tr (S1 S2)^{1/2} = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})) (symmetric, eigenvalues clipped at 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ted_fl.errors import TedFlError


@dataclass
class GaussStats:
    """(n, sum z, sum z z^T) of a set of D-dim vectors, in float64."""

    n: float
    s1: np.ndarray  # (D,)
    s2: np.ndarray  # (D, D)

    @classmethod
    def of(cls, z: np.ndarray) -> GaussStats:
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2:
            raise TedFlError(f"FSD needs (n, D) vectors, got shape {z.shape}")
        return cls(float(z.shape[0]), z.sum(axis=0), z.T @ z)

    @classmethod
    def zeros(cls, dim: int) -> GaussStats:
        return cls(0.0, np.zeros(dim), np.zeros((dim, dim)))

    def __add__(self, other: GaussStats) -> GaussStats:
        return GaussStats(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2)

    @property
    def dim(self) -> int:
        return int(self.s1.shape[0])

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise TedFlError("FSD of an empty set of codes")
        return self.s1 / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance; OAS-shrunk when n <= D (see the module docstring)."""
        if self.n < 2:
            raise TedFlError(f"FSD needs at least 2 codes per set, got {self.n:g}")
        mu = self.mean()
        s = (self.s2 - self.n * np.outer(mu, mu)) / (self.n - 1.0)
        s = (s + s.T) / 2.0
        return oas_shrink(s, self.n) if self.n <= self.dim else s

    # ---- travel: 1-D arrays only (never image-shaped): n, s1 and the upper triangle of s2
    def to_arrays(self) -> dict[str, np.ndarray]:
        iu = np.triu_indices(self.dim)
        return {"n": np.array([self.n]), "s1": self.s1.copy(), "s2_triu": self.s2[iu].copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> GaussStats:
        s1 = np.asarray(arrays["s1"], dtype=np.float64)
        d = s1.shape[0]
        s2 = np.zeros((d, d))
        s2[np.triu_indices(d)] = np.asarray(arrays["s2_triu"], dtype=np.float64)
        s2 = s2 + np.triu(s2, 1).T
        return cls(float(np.asarray(arrays["n"]).reshape(-1)[0]), s1, s2)


def packed_lengths(dim: int) -> set[int]:
    """Lengths of the arrays `to_arrays` produces for D = dim (what a privacy audit may allow)."""
    return {1, dim, dim * (dim + 1) // 2}


def oas_shrink(s: np.ndarray, n: float) -> np.ndarray:
    """(1 - rho) S + rho (tr S / D) I with the OAS rho."""
    d = s.shape[0]
    tr = np.trace(s)
    tr2 = float(np.sum(s * s))
    den = (n + 1.0 - 2.0 / d) * (tr2 - tr**2 / d)
    rho = 1.0 if den <= 0 else min(1.0, ((1.0 - 2.0 / d) * tr2 + tr**2) / den)
    return (1.0 - rho) * s + rho * (tr / d) * np.eye(d)


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def fsd(a: GaussStats, b: GaussStats) -> float:
    """FSD between the Gaussians fitted to two sets of codes given by their sums."""
    if a.dim != b.dim:
        raise TedFlError(f"FSD of codes of different lengths ({a.dim} vs {b.dim})")
    return frechet(a.mean(), a.cov(), b.mean(), b.cov())
