"""Synthetic global descriptors with the spatial structure of real ones, for index tests and
benchmarks: neighbours in space are neighbours in descriptor space.

The generator (:class:`DescriptorField`): component ``j`` of the descriptor of a photo taken
at UTM position ``x`` (metres) is

    a_j * cos(w_j . x + b_j) + noise * rms(a) * e_j,

a random Fourier feature of position, i.e. a sample of a smooth random field whose
correlation falls off as a Gaussian of the distance (``w_j ~ N(0, I / s_j^2)``). The length
scales ``s_j`` cycle through ``scales_m`` (default 30 m and 300 m: street-level detail and
neighbourhood-level appearance), the amplitudes ``a_j = 1 / sqrt(1 + 16 j / D)`` decay like a
PCA spectrum, ``b_j`` is uniform in [0, 2 pi), and ``e_j`` is per-photo standard normal noise
(a photo's own viewpoint, light, clutter). The row is then L2-normalized, float32. The field
(``w, b, a``) depends only on ``(dim, seed, scales_m)``, so database and queries drawn from
one field are comparable; the noise comes from the caller's generator. Rows can be made in
blocks (:meth:`DescriptorField.blocks`), so a 10,752-D database is never held whole.

Positions come from a real layout scaled up (:func:`layout_positions`): each position of a
``utm_ground_truth`` file (Tokyo 24/7, Pitts30k, Nordland) once, then drawn again while more
are wanted, each with a few metres of jitter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["DescriptorField", "layout_positions"]


class DescriptorField:
    """A smooth random field of position, sampled as descriptors (module doc)."""

    def __init__(self, dim: int, seed: int = 0, scales_m: tuple[float, ...] = (30.0, 300.0)):
        rng = np.random.default_rng([seed, dim])
        scales = np.asarray(scales_m, dtype=np.float64)[np.arange(dim) % len(scales_m)]
        self.dim = int(dim)
        self.w = rng.normal(0.0, 1.0, (2, dim)) / scales
        self.b = rng.uniform(0.0, 2 * np.pi, dim)
        self.a = 1.0 / np.sqrt(1.0 + 16.0 * np.arange(dim) / dim)
        self.rms = float(np.sqrt(np.mean(self.a**2)))

    def blocks(
        self, xy: np.ndarray, noise: float, rng: np.random.Generator, block: int = 8192
    ) -> Iterator[np.ndarray]:
        """L2-normalized float32 descriptors of the positions ``xy`` (N, 2), ``block`` rows
        at a time."""
        xy = np.asarray(xy, dtype=np.float64)
        for s in range(0, len(xy), block):
            out = np.cos(xy[s : s + block] @ self.w + self.b)
            out *= self.a
            out += (noise * self.rms) * rng.standard_normal(out.shape)
            out /= np.linalg.norm(out, axis=1, keepdims=True)
            yield out.astype(np.float32)

    def at(self, xy: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
        """All descriptors of ``xy`` at once (N, D)."""
        return np.concatenate(list(self.blocks(xy, noise, rng)) or [np.empty((0, self.dim))])


def layout_positions(
    layout: str | Path, n: int, rng: np.random.Generator, key: str = "utmDb", jitter_m=3.0
) -> np.ndarray:
    """``n`` UTM (east, north) positions from a real layout's ``key`` array (``utmDb`` or
    ``utmQ``): every position once while ``n`` allows, then drawn again, each with
    ``jitter_m`` metres of Gaussian jitter; sorted by the layout's order."""
    utm = np.load(layout)[key].astype(np.float64)
    idx = np.concatenate([rng.permutation(len(utm)), rng.integers(0, len(utm), max(0, n))])[:n]
    return utm[np.sort(idx)] + rng.normal(0.0, jitter_m, (n, 2))
