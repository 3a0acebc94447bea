"""Accuracy metrics shared by verification, calibration reports and `vdit compare` (numpy only).

Videos are (..., C, F, H, W) arrays in [-1, 1] (data range 2)."""
from __future__ import annotations

import numpy as np


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref||: scale-free error of a whole tensor."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def max_abs(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))))


def psnr(got: np.ndarray, ref: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole array (inf when identical)."""
    mse = float(np.mean((np.asarray(got, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def _gaussian_blur(img: np.ndarray, sigma: float = 1.5, radius: int = 3) -> np.ndarray:
    """Separable Gaussian filter over the last two axes, 'valid' region only (as in Wang et al.)."""
    x = np.arange(-radius, radius + 1)
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    out = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), -1, img)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), -2, out)


def ssim(got: np.ndarray, ref: np.ndarray, data_range: float = 2.0) -> float:
    """Mean structural similarity (Wang et al. 2004; 7x7 Gaussian window, sigma 1.5) over every
    channel of every frame: arrays (..., H, W) with H, W >= 7."""
    a = np.asarray(got, np.float64).reshape(-1, *np.shape(got)[-2:])
    b = np.asarray(ref, np.float64).reshape(-1, *np.shape(ref)[-2:])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gaussian_blur(a), _gaussian_blur(b)
    var_a = _gaussian_blur(a * a) - mu_a ** 2
    var_b = _gaussian_blur(b * b) - mu_b ** 2
    cov = _gaussian_blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
