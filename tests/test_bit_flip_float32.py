"""BitFlipCertifier's ``dtype``: validated (TypeError / ValueError naming it; read-only after construction), float64 the
default and identical when given explicitly. float32 bounds carry the rounding-error terms of docs/theory.md §5: they
stay below the exact single-flip enumeration and close to float64's, and on a cancellation-heavy network where a
float32 bound without those terms certifies a prediction that the exact network does not keep, ours does not.
(Soundness against single flips, BFA and random flips in float32 is also in the bit-flip certifier's tests.)"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PyTorchWeightClassifier
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.certification.bit_flip_enumeration import single_flip_robustness


@pytest.mark.parametrize(
    "value, error",
    [("float32", TypeError), (np.float32, TypeError), (torch.float16, ValueError), (torch.int32, ValueError)],
)
def test_bad_dtype_names_the_argument(tiny_mlp_classifier, value, error):
    with pytest.raises(error, match="dtype"):
        BitFlipCertifier(tiny_mlp_classifier, 1, dtype=value)
    certifier = BitFlipCertifier(tiny_mlp_classifier, 1, verbose=False)
    with pytest.raises(AttributeError):
        certifier.dtype = torch.float32  # a constructor argument, as the weight-perturbation certifier's
    assert certifier.dtype == torch.float64


def test_float64_default_and_explicit_agree(tiny_mlp_classifier, digits):
    _, _, x, y = digits
    x, y = x[:30], y[:30]
    default = BitFlipCertifier(tiny_mlp_classifier, 2, verbose=False)
    explicit = BitFlipCertifier(tiny_mlp_classifier, 2, verbose=False, dtype=torch.float64)
    assert default.dtype == torch.float64 and "dtype=torch.float64" in repr(default)
    np.testing.assert_array_equal(default.margin_lower_bounds(x, y), explicit.margin_lower_bounds(x, y))


@pytest.mark.parametrize("method", ["interval", "linear"])
def test_float32_bounds_below_exact_and_near_float64(tiny_mlp_classifier, digits, method):
    _, _, x, y = digits
    x, y = x[:40], y[:40]
    exact = single_flip_robustness(tiny_mlp_classifier, x, y)
    c32 = BitFlipCertifier(tiny_mlp_classifier, 1, method=method, verbose=False, dtype=torch.float32)
    c64 = BitFlipCertifier(tiny_mlp_classifier, 1, method=method, verbose=False)
    b32, b64 = c32.margin_lower_bounds(x, y), c64.margin_lower_bounds(x, y)
    finite = np.isfinite(b64)
    assert b32.dtype == np.float64 and np.array_equal(finite, np.isfinite(b32))
    # the rounding terms cost ~1e-4 of the margins' scale here, never more than 1e-3
    assert np.all(np.abs(b32[finite] - b64[finite]) <= 1e-3 * (1 + np.abs(b64[finite])))
    cert32, cert64 = c32.certify(x, y), c64.certify(x, y)
    assert not np.any(cert32 & ~exact)
    assert np.sum(cert32 != cert64) <= 1
    np.testing.assert_array_equal(c32.certified_flips(x, y) >= 1, cert32)


def _rounding_model() -> tuple[nn.Module, float]:
    """``x ↦ head(v·(Σ_i c_i x − A))`` with ``A = 2¹⁰``, ``c = A·(1, b, b)``, ``b = 0.75·2⁻²³`` and ``v = 1``: exactly
    the sum is ``A(1 + 1.5·2⁻²³)``, in float32 ``A(1 + 2⁻²²)`` in every summation order (``A + Ab`` rounds up, and
    ``Ab + Ab`` then ``A(1 + 1.5·2⁻²³)`` is a tie that rounds to even: the same value), so no GEMM kernel's blocking can
    change it. Subtracting ``A`` in a layer of its own is exact and leaves ``2⁻¹²`` against the exact ``1.5·2⁻¹³``;
    the head's bias ``−1.75·2⁻¹³`` puts the exact margin at ``−2⁻¹⁵``, which float32 evaluates as ``+2⁻¹⁵``: above
    the certificates' tolerance (``2⁻¹⁸`` of the logits' scale). The layer ``v`` (named ``"3"``) works at the small
    scale, where its flips' boxes are computed without visible rounding. Returns the model and the exact margin
    ``f_0 − f_1`` at ``x = 1``."""
    a, b = 2.0**10, 0.75 * 2.0**-23
    first, second = nn.Linear(1, 3, bias=False), nn.Linear(3, 1, bias=False)
    shift, scale, head = nn.Linear(1, 1), nn.Linear(1, 1, bias=False), nn.Linear(1, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[a], [a * b], [a * b]])), second.weight.fill_(1.0)
        shift.weight.fill_(1.0), shift.bias.fill_(-a), scale.weight.fill_(1.0)
        head.weight.copy_(torch.tensor([[1.0], [0.0]])), head.bias.copy_(torch.tensor([-1.75 * 2.0**-13, 0.0]))
    exact = Fraction(a) * (1 + 2 * Fraction(b)) - Fraction(a) - Fraction(1.75 * 2.0**-13)
    return nn.Sequential(first, second, shift, scale, head).eval(), float(exact)


@pytest.mark.parametrize("method", ["interval", "linear"])
@pytest.mark.parametrize("k", [0, 1])
def test_rounding_terms_keep_a_cancellation_heavy_certificate_sound(monkeypatch, method, k):
    model, exact = _rounding_model()
    assert exact < 0  # the exact network does not predict class 0 at x = 1
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (1,), 2)
    x, y = np.ones((1, 1), np.float32), np.array([0])
    assert clf.predict(x).argmax(1)[0] == 0  # float32 does
    # k flips of bit 0 of the weight v (1.0 → 1 + 2⁻²³ on a positive input: they only raise the margin)
    kwargs = {"method": method, "verbose": False, "encoding": "float", "layers": ["3"], "bits": [0]}
    ours = BitFlipCertifier(clf, k, dtype=torch.float32, **kwargs)
    bound = ours.margin_lower_bounds(x, y)[0, 1]
    assert bound <= exact and not ours.certify(x, y)[0]
    reference = BitFlipCertifier(clf, k, **kwargs).margin_lower_bounds(x, y)[0, 1]  # float64: ~exact
    assert abs(reference - exact) < 1e-15
    for module in ("bit_flip_bounds", "bit_flip_cases", "bit_flip_terms"):  # the same bound without rounding terms
        monkeypatch.setattr(f"art_weightpert.certification.{module}.rounds", lambda t: False)
    naive = BitFlipCertifier(clf, k, dtype=torch.float32, **kwargs)
    assert naive.certify(x, y)[0] and naive.margin_lower_bounds(x, y)[0, 1] > 0  # false: the test can fail


def test_verify_in_float32_certifies_only_robust_samples(tiny_mlp_classifier, digits):
    _, _, x, y = digits
    x, y = x[:40], y[:40]
    exact = single_flip_robustness(tiny_mlp_classifier, x, y)
    result = BitFlipCertifier(tiny_mlp_classifier, 1, verbose=False, dtype=torch.float32).verify(x, y, time_limit=0.2)
    assert not np.any((result.status == "certified") & ~exact)
    assert not np.any((result.status == "falsified") & exact)
    assert np.mean(result.status == "certified") >= 0.9 * exact.mean() > 0


def test_float32_bounds_ignore_an_enclosing_autocast(tiny_mlp_classifier, digits):
    """Inside ``torch.autocast`` the products would run in bfloat16 (error ~1e-2, far beyond the float32 terms): the
    certificate turns it off for its own work and gives the bounds it gives outside."""
    _, _, x, y = digits
    certifier = BitFlipCertifier(tiny_mlp_classifier, 2, verbose=False, dtype=torch.float32)
    plain = certifier.margin_lower_bounds(x[:20], y[:20])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = certifier.margin_lower_bounds(x[:20], y[:20])
        assert torch.is_autocast_enabled("cpu")  # restored
    np.testing.assert_array_equal(inside, plain)


def test_a_linear_layers_pair_term_covers_the_rounding_of_its_coefficient():
    # G = λ ĥ = (1 + 2⁻²³)·−(1 + 2⁻²³) = −(1 + 2⁻²² + 2⁻⁴⁶) exactly, −(1 + 2⁻²²) in float32 (rounded toward zero): the
    # term D·G of the change D = 1 computed as is would sit 2⁻⁴⁶ above the exact one
    from art_weightpert.certification.bit_flip_bounds import layer_flip_terms
    from art_weightpert.certification.bit_flip_terms import FlipTable
    from art_weightpert.network import read_network

    layer = read_network(nn.Sequential(nn.Linear(1, 1)), (1,)).layers[0]
    one = torch.ones((1, 1, 1))
    table = FlipTable(one, one[..., 0], torch.zeros((1, 1)))
    lam, h = 1 + 2.0**-23, -(1 + 2.0**-23)
    term = layer_flip_terms(layer, table, torch.full((1, 1, 1), lam), *(2 * [torch.full((1, 1), h)]), 1)
    exact = Fraction(lam) * Fraction(h)
    assert float(term) < float(np.float32(lam) * np.float32(h)) and Fraction(float(term)) <= exact
