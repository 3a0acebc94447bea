import numpy as np
import pytest

from vdit_deploy.metrics import max_abs, psnr, rel_l2, ssim


def test_psnr_closed_form():
    ref = np.zeros((2, 3, 4, 8, 8))
    got = ref + 0.02                                   # mse 4e-4, range 2 -> 10 log10(4 / 4e-4) = 40 dB
    assert psnr(got, ref) == pytest.approx(40.0)
    assert psnr(ref, ref) == float("inf")


def test_ssim_identity_and_ordering():
    rng = np.random.default_rng(0)
    ref = np.clip(rng.normal(0, 0.5, (3, 4, 16, 16)), -1, 1)
    assert ssim(ref, ref) == pytest.approx(1.0)
    small = ssim(ref + rng.normal(0, 0.05, ref.shape), ref)
    large = ssim(ref + rng.normal(0, 0.3, ref.shape), ref)
    assert 1.0 > small > large > 0
    assert ssim(np.zeros_like(ref), ref) < 0.05      # no structure left


def test_relative_errors():
    ref = np.array([3.0, 4.0])
    assert rel_l2(ref * 1.1, ref) == pytest.approx(0.1)
    assert max_abs(ref + [0, -0.5], ref) == 0.5
