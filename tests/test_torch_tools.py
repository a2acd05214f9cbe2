"""The torch helpers every layer shares (torch_tools)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from art_weightpert.torch_tools import (
    HEAP_BLOCK_BYTES,
    batch_slices,
    eval_mode,
    float64_copy,
    keep_freed_memory,
    kept_training_flags,
    run_with_parameters,
)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2))


def test_training_flags_come_back_per_module_also_after_an_error():
    model = _model().train()
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError), kept_training_flags(model):
        model.eval()
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_float64_copy_is_private_and_run_with_parameters_leaves_the_module_alone():
    model = _model().eval()
    copy64 = float64_copy(model)
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in copy64.parameters())
    with torch.no_grad():
        copy64[0].weight.add_(1.0)
    assert not torch.equal(model[0].weight.double(), copy64[0].weight)  # the user's module is untouched
    x = torch.rand(5, 4)
    weight = torch.zeros_like(model[0].weight, requires_grad=True)
    out = run_with_parameters(model, {"0.weight": weight}, x)
    expected = model[2](torch.zeros(5, 3) + model[0].bias)
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert weight.grad is not None and model[0].weight.grad is None


def test_batch_slices():
    assert [(s.start, s.stop) for s in batch_slices(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert list(batch_slices(0, 4)) == []


def test_replaced_method_is_restored_also_after_an_exception():
    from art_weightpert.torch_tools import replaced_method

    own = nn.Linear(2, 2)
    own.forward = lambda x: x  # an instance attribute of its own: restored, not removed
    plain = nn.Linear(2, 2)
    with pytest.raises(RuntimeError), replaced_method([own, plain], "forward", lambda self, x: 2 * x):
        assert torch.equal(plain(torch.ones(1, 2)), 2 * torch.ones(1, 2))
        raise RuntimeError
    assert "forward" not in plain.__dict__ and own.forward(torch.ones(1, 2)).equal(torch.ones(1, 2))


_FAULTS_SCRIPT = """
import resource, sys, torch
from torch import nn
import art_weightpert.certification.linear as linear
from art_weightpert import PerturbationBudget
from art_weightpert.network import read_network
if sys.argv[1] == "off":
    linear.keep_freed_memory = lambda: None
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
model = model.eval().requires_grad_(False)
x = torch.rand(128, 784)
labels = model(x).argmax(1)
network = read_network(model, (784,))
balls = PerturbationBudget(1e-3, "inf").parameter_balls(model, torch.float32)
with torch.no_grad():
    linear.linear_margin_bounds(network, balls, x, labels, torch.float32, rounding=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        linear.linear_margin_bounds(network, balls, x, labels, torch.float32, rounding=True)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


_ALLOCATOR_SETTINGS = [k for k in os.environ if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's adaptive mmap and trim thresholds")
@pytest.mark.skipif(bool(_ALLOCATOR_SETTINGS), reason=f"allocator settings in the environment: {_ALLOCATOR_SETTINGS}")
def test_the_linear_bound_reuses_freed_memory_instead_of_faulting_pages_in():
    # a fresh process each (the thresholds only rise): without keep_freed_memory the chunk temporaries of every call
    # are trimmed or unmapped and their pages faulted in again (thousands per call); with it, almost none
    faults = {}
    for mode in ("off", "on"):
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True
        )
        faults[mode] = int(done.stdout.strip().splitlines()[-1])
    if faults["off"] <= 1000:  # e.g. transparent huge pages always on: nothing to keep
        pytest.skip(f"this system's allocator does not return the chunks' memory: {faults}")
    assert faults["on"] < faults["off"] / 10, faults


def test_keep_freed_memory_runs_once_per_process(monkeypatch):
    import art_weightpert.torch_tools as tools

    calls = []
    monkeypatch.setattr(tools, "_freed_memory_kept", False)
    monkeypatch.setattr(tools.torch, "UntypedStorage", lambda *args, **kwargs: calls.append((args, kwargs)))
    keep_freed_memory()
    keep_freed_memory()
    assert calls == [((HEAP_BLOCK_BYTES,), {"device": "cpu"})]  # on the CPU whatever the default device
