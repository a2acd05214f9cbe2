"""The certificates on CUDA (issue 23): the same code on ``device_type="gpu"`` classifiers, float32 bounds with their
rounding terms as sound there as on the CPU, TF32 kept out of a certificate and the user's settings restored. Skipped
without a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.rounding import exact_kernels
from tests.conftest import make_cnn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(model_factory, shape):
    """The same model as a CPU and as a GPU classifier."""
    cpu = PyTorchWeightClassifier(model_factory(), nn.CrossEntropyLoss(), shape, 10, device_type="cpu")
    gpu = PyTorchWeightClassifier(model_factory(), nn.CrossEntropyLoss(), shape, 10, device_type="gpu")
    return cpu, gpu


@pytest.mark.parametrize("method", ["interval", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_bounds_match_cpu_and_survive_the_attack(digits_images, method, dtype):
    _, _, x_test, _ = digits_images
    x = x_test[:64]
    cpu, gpu = _pair(lambda: make_cnn(seed=4), (1, 8, 8))
    budget = PerturbationBudget(1e-3, "inf")
    lb_cpu = WeightPerturbationCertifier(cpu, budget, method=method, verbose=False, dtype=dtype).margin_lower_bounds(x)
    certifier = WeightPerturbationCertifier(gpu, budget, method=method, verbose=False, dtype=dtype)
    lb_gpu = certifier.margin_lower_bounds(x)
    finite = np.isfinite(lb_cpu)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(lb_gpu[finite], lb_cpu[finite], rtol=tol, atol=tol)
    certified = certifier.certify(x)
    attack = PerSampleWeightPGD(gpu, budget, max_iter=50, num_random_init=1, verbose=False).generate(x)
    assert not np.any(attack["flipped"] & certified)


def test_tf32_is_off_inside_a_certificate_and_restored_after():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with exact_kernels():
            assert matmul.fp32_precision == "ieee"
            a = torch.randn(256, 256, device="cuda")
            exact = (a.double() @ a.double()).float()
            assert torch.allclose(a @ a, exact, rtol=1e-4, atol=1e-3)
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_bit_flip_bounds_match_cpu_and_stay_below_single_flips(digits_images, dtype):
    from art_weightpert.certification.bit_flip import BitFlipCertifier
    from art_weightpert.certification.bit_flip_enumeration import single_flip_robustness

    _, _, x_test, y_test = digits_images
    x, y = x_test[:32], y_test[:32]
    cpu, gpu = _pair(lambda: make_cnn(seed=4), (1, 8, 8))
    lb_cpu = BitFlipCertifier(cpu, 1, verbose=False, dtype=dtype).margin_lower_bounds(x, y)
    certifier = BitFlipCertifier(gpu, 1, verbose=False, dtype=dtype)
    lb_gpu = certifier.margin_lower_bounds(x, y)
    finite = np.isfinite(lb_cpu)
    np.testing.assert_allclose(lb_gpu[finite], lb_cpu[finite], rtol=1e-4, atol=1e-4)
    assert not np.any(certifier.certify(x, y) & ~single_flip_robustness(cpu, x, y))
