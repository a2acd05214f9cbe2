"""The trainer's shared forward pass, the lean "paper" bound and fill_label compute what the plain code does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier
from art_weightpert.certification import METHODS
from art_weightpert.certification.common import fill_label
from art_weightpert.certification.paper import PAPER_RULES, paper_margin_bounds
from art_weightpert.defences.trainer import WeightRobustTrainer
from art_weightpert.defences.trainer.loss import operator_norm_sum, robust_term
from art_weightpert.defences.trainer.schedule import scale_param_balls
from art_weightpert.defences.trainer.shared_forward import affine_outputs, train_matches_eval
from art_weightpert.network import Affine, read_network


def mlp(seed: int, bias: bool, hidden: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(seed)
    middle = [hidden] if hidden is not None else []
    return nn.Sequential(nn.Linear(12, 9, bias=bias), nn.ReLU(), *middle, nn.Linear(9, 7, bias=bias), nn.Tanh(),
                         nn.Linear(7, 5, bias=bias))  # fmt: skip


def formula_b(network, balls, x, labels, dtype, scale=None):
    """docs/theory.md §3 formula B written out with every term (zero ones included): the reference of the lean bound."""
    params = network.params(dtype=dtype)
    x = x.to(dtype)
    n = x.flatten(1).abs().amax(dim=1)
    d = torch.zeros_like(n)
    s = torch.ones_like(n) if scale is None else scale.to(dtype)

    def radii(layer):
        rows = params[layer.weight_name].shape[0]
        wt, bt = balls.get(layer.weight_name), balls.get(layer.bias_name)
        zeros = torch.zeros(rows, dtype=dtype)
        shape = params[layer.weight_name].shape
        eps = zeros if wt is None else wt.ball.row_l1_radius(wt.radius.to(dtype), shape).expand(rows)
        beta = zeros if bt is None else bt.ball.entry_bound(bt.radius.to(dtype), (rows,))
        return eps, beta

    for layer in network.layers[:-1]:
        if isinstance(layer, Affine):
            weight = params[layer.weight_name]
            a = weight.abs().sum(dim=1).max()
            eps, beta = radii(layer)
            b_norm = params[layer.bias_name].abs().max() if layer.bias_name else torch.zeros((), dtype=dtype)
            d = a * d + s * eps.max() * n + s * beta.max()
            n = (a + s * eps.max()) * n + b_norm + s * beta.max()
        else:
            n, d = PAPER_RULES[type(layer)](layer, n, d)
    last = network.layers[-1]
    weight = params[last.weight_name]
    eps, beta = radii(last)
    dw = (weight[labels].unsqueeze(1) - weight.unsqueeze(0)).abs().sum(dim=2)
    eta = dw * d[:, None] + (eps[labels][:, None] + eps) * s[:, None] * n[:, None] + (beta[labels][:, None] + beta)
    logits = network.forward(x, params)
    return fill_label(logits.gather(1, labels[:, None]) - logits - eta, labels)


def grads(value: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value[torch.isfinite(value)].sum(), list(model.parameters()), allow_unused=True))


@pytest.mark.parametrize("seed", range(8))
def test_lean_paper_bound_equals_formula_b_with_every_term(seed):
    bias = seed % 2 == 0
    model = mlp(seed, bias, nn.Sigmoid() if seed % 4 == 1 else None)
    network = read_network(model, (12,))
    norm = ("inf", "row_l1", "l2")[seed % 3]
    layers = (None, ["0"], ["4" if seed % 4 != 1 else "5"], None)[seed % 4]
    budget = PerturbationBudget(0.05, norm=norm, layers=layers, include_bias=bias and seed % 3 == 0)
    x, labels = torch.rand(6, 12), torch.randint(0, 5, (6,))
    for dtype in (torch.float32, torch.float64):
        balls = {t.param_name: t for t in budget.parameter_balls(model, dtype)}
        scale = torch.rand(6) if seed % 2 else None
        got = paper_margin_bounds(network, balls, x, labels, dtype, scale)
        want = formula_b(network, balls, x, labels, dtype, scale)
        torch.testing.assert_close(got, want)
        for g, w in zip(grads(got, model), grads(want, model)):
            torch.testing.assert_close(g, w)
        model.to(dtype)
        shared = paper_margin_bounds(network, balls, x, labels, dtype, scale, clean_values=clean_values(network, x))
        torch.testing.assert_close(shared, got)
        model.float()


def clean_values(network, x):
    """The trainer's shared forward: the model's own forward with its affine outputs kept, and the logits."""
    with affine_outputs(network) as clean:  # (every affine layer: no parameter named perturbed)
        logits = network.model(x.to(next(network.model.parameters()).dtype))
    return {**clean, len(network.layers): logits}


class Residual(nn.Module):
    """A residual MLP whose middle Linear is used twice (its uses get no shared value) and a residual conv net."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv = conv
        if conv:
            self.inp, self.mid = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1, bias=False)
            self.out = nn.Linear(3 * 16, 5)
        else:
            self.inp, self.mid, self.out = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.mid(h) + h)
        if self.conv:
            return self.out(torch.flatten(torch.relu(self.mid(h)), 1))
        return self.out(torch.relu(self.mid(h) + h))


MODELS = {
    "mlp": (lambda: mlp(5, True), (12,), ["2", "4"], ["4"]),
    "residual_mlp": (lambda: Residual(conv=False), (12,), ["mid", "out"], ["out"]),
    "residual_cnn": (lambda: Residual(conv=True), (1, 4, 4), ["mid", "out"], ["out"]),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("which", ["all", "after_the_first", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interval_bound_on_clean_values_equals_its_own_forward(name, which, dtype):
    """The interval bound given the model's own forward's values (centres of the boxes of affine layers on exact
    inputs; the logits when only the last layer is perturbed) computes the same bounds and gradients as on its own,
    on chains and on networks with residual additions and a shared module."""
    factory, shape, after_first, last = MODELS[name]
    model = factory().to(dtype).eval()
    network = read_network(model, shape)
    layers = {"all": None, "after_the_first": after_first, "last": last}[which]
    budget = PerturbationBudget(0.03, norm="row_l1", layers=layers, include_bias=which != "last")
    balls = {t.param_name: t for t in budget.parameter_balls(model, dtype)}
    x, labels = torch.rand(10, *shape, dtype=dtype), torch.randint(0, 5, (10,))
    alone = METHODS["interval"].bounds(network, balls, x, labels, dtype=dtype)
    shared = METHODS["interval"].bounds(network, balls, x, labels, dtype=dtype, clean_values=clean_values(network, x))
    torch.testing.assert_close(shared, alone)  # (float64 convolutions of the network may run as conv_gemm)
    for g, w in zip(grads(shared, model), grads(alone, model)):
        torch.testing.assert_close(g, w)  # the same terms, summed in another order
    assert all(not m._forward_hooks for m in model.modules())  # the hooks are gone


def test_affine_outputs_hooks_the_layers_on_exact_inputs_only():
    model = mlp(4, True)  # Linear 0, ReLU, Linear 2, Tanh, Linear 4
    network = read_network(model, (12,))
    for perturbed, hooked in [((), [1, 3, 5]), (("0.weight",), [1]), (("2.bias",), [1, 3]), (("4.weight",), [1, 3, 5])]:
        with affine_outputs(network, perturbed) as clean:
            model(torch.rand(2, 12))
        assert sorted(clean) == hooked


def test_affine_outputs_removes_its_hooks_after_an_exception():
    model = Residual(conv=False)
    network = read_network(model, (12,))
    with pytest.raises(RuntimeError, match="boom"):
        with affine_outputs(network) as clean:
            model(torch.rand(2, 12))
            raise RuntimeError("boom")
    assert sorted(clean) == [1, len(network.layers)]  # inp and out; mid is used twice
    assert all(not m._forward_hooks for m in model.modules())


class HalvesInTraining(nn.Module):
    """A forward that branches on the training flag (read in eval mode by the network reader)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(0, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 0.5 if self.training else x)


def test_train_matches_eval_only_without_dropout_batch_norm_or_training_branches():
    plain = mlp(0, True)
    assert train_matches_eval(read_network(plain, (12,)), plain, (12,))
    assert plain.training  # flags restored
    dropout = mlp(0, True, nn.Dropout(0.5))
    assert not train_matches_eval(read_network(dropout, (12,)), dropout, (12,))
    norm = mlp(0, True, nn.BatchNorm1d(9))
    assert not train_matches_eval(read_network(norm, (12,)), norm, (12,))
    branching = HalvesInTraining().eval()
    assert not train_matches_eval(read_network(branching, (12,)), branching, (12,))
    assert not branching.training


@pytest.mark.parametrize("bound", list(METHODS))
@pytest.mark.parametrize("hidden", [None, "dropout", "batchnorm"])
def test_loss_terms_equal_the_straightforward_loss_and_gradients(bound, hidden):
    middle = {None: None, "dropout": nn.Dropout(0.0), "batchnorm": nn.BatchNorm1d(9)}[hidden]  # p = 0: deterministic
    model = mlp(3, True, middle)
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (12,), 5, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1))  # fmt: skip
    budget = PerturbationBudget(0.02, norm="row_l1", include_bias=True)
    trainer = WeightRobustTrainer(
        clf, budget, lam=0.7, mu=0.05, kappa=0.1, method=bound, batch_norm="train", verbose=False
    )  # fmt: skip  (frozen batch norm: tests/test_resnet_training.py)
    x, labels = torch.rand(16, 12), torch.randint(0, 5, (16,))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    terms = trainer.loss_terms(x, labels, eps_scale=0.5)
    got = grads(terms["loss"], model)

    if hidden == "batchnorm":  # the same running statistics as before the trainer's forward
        model.load_state_dict(state)
    balls = scale_param_balls({t.param_name: t for t in budget.parameter_balls(model)}, 0.5)
    ce = nn.functional.cross_entropy(model(x), labels)
    network = read_network(model, (12,))  # after the forward: the bound reads this step's running statistics
    robust = robust_term(METHODS[bound].bounds(network, balls, x, labels, dtype=torch.float32), 0.1).mean()
    loss = ce + 0.7 * robust + 0.05 * operator_norm_sum(network)
    torch.testing.assert_close(terms["loss"], loss)
    torch.testing.assert_close(terms["robust"], robust)
    for g, w in zip(got, grads(loss, model)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fill_label_equals_the_scatter_of_an_inf_column(dtype):
    bounds = torch.randn(9, 4, dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 0])
    got = fill_label(bounds, labels)
    want = bounds.scatter(1, labels[:, None], torch.full((9, 1), float("inf"), dtype=dtype))
    assert torch.equal(got, want) and got.dtype == dtype
    weights = torch.randn(9, 4, dtype=dtype)
    grad_got = torch.autograd.grad((got.clamp_max(9) * weights).sum(), bounds)[0]
    grad_want = torch.autograd.grad((want.clamp_max(9) * weights).sum(), bounds)[0]
    assert torch.equal(grad_got, grad_want)


@pytest.mark.parametrize("bound, hooks", [("interval", 1), ("paper", 0)])  # the first layer's; paper: the logits
def test_fit_keeps_the_affine_hooks_for_the_run_only_even_when_it_fails(monkeypatch, bound, hooks):
    model = mlp(3, True)
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (12,), 5, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1))  # fmt: skip
    trainer = WeightRobustTrainer(clf, PerturbationBudget(0.02, norm="row_l1"), lam=0.5, method=bound, verbose=False)
    x, y = torch.rand(40, 12).numpy(), torch.randint(0, 5, (40,)).numpy()
    trainer.fit(x, y, batch_size=16, nb_epochs=1)
    assert all(not m._forward_hooks for m in model.modules())
    real_epoch = trainer._epoch

    def failing_epoch(*args):
        assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # during the run
        real_epoch(*args)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(trainer, "_epoch", failing_epoch)
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.fit(x, y, batch_size=16, nb_epochs=2)
    assert all(not m._forward_hooks for m in model.modules())
