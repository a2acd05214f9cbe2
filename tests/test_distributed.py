"""torch.distributed helpers: sharding by whole batches, gathering in single-process order, data checks, and a
launcher that fails (instead of hanging) when one process fails. Two gloo processes on this machine."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from art_weightpert import distributed


def test_single_process_helpers_are_the_identity(monkeypatch):
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert [(s.start, s.stop) for s in distributed.my_batches(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    pieces = [np.arange(4), np.arange(4, 8), np.arange(8, 10)]
    np.testing.assert_array_equal(distributed.gather_batches(pieces, 10, 4), np.arange(10))
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    monkeypatch.setattr(distributed, "_digest", lambda *arrays: pytest.fail("hashed the data in one process"))
    distributed.check_same_data(np.zeros(3), name="x")  # nothing to compare against, nothing hashed


def _sharding_checks() -> dict[str, np.ndarray]:
    n, batch_size, r = 23, 4, distributed.rank()
    batches = list(distributed.my_batches(n, batch_size))
    pieces = [np.stack([np.arange(s.start, s.stop), np.full(s.stop - s.start, r)], 1) for s in batches]
    gathered = distributed.gather_batches(pieces, n, batch_size)
    mapped = distributed.map_batches(lambda index: index * 10, n, batch_size)
    total = distributed.all_reduce_sum(torch.tensor([float(r + 1)]))
    summed = distributed.all_reduce_sum_dict({"a": torch.ones(2, 2) * (r + 1), "b": torch.ones(3)})
    x = np.arange(12.0).reshape(3, 4)
    distributed.check_same_data(x, np.arange(3), name="x")
    try:
        distributed.check_same_data(x + r, name="x")
        mismatch = "not detected"
    except ValueError as error:
        mismatch = str(error)
    shards = np.array(
        [[distributed.shard_of_batch(size).start, distributed.shard_of_batch(size).stop] for size in (1, 5)]
    )
    module = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(module.weight, float(r))
    module.weight.grad, module.bias.grad = torch.full((2, 2), r + 1.0), None
    distributed.all_reduce_gradients(list(module.parameters()))
    distributed.broadcast_module(module)
    return {
        "gathered": gathered, "mapped": mapped, "total": total.numpy(), "a": summed["a"].numpy(),
        "b": summed["b"].numpy(), "world": np.array(distributed.world_size()), "mismatch": np.array(mismatch),
        "shards": shards, "grad": module.weight.grad.numpy(), "bias_grad_none": np.array(module.bias.grad is None),
        "broadcast_weight": module.weight.detach().numpy(),
    }  # fmt: skip


def test_two_processes_shard_whole_batches_and_gather_in_order(evaluation_run):
    result = evaluation_run
    gathered = result["gathered"]
    np.testing.assert_array_equal(gathered[:, 0], np.arange(23))  # single-process order
    np.testing.assert_array_equal(gathered[:, 1], (np.arange(23) // 4) % 2)  # batch b computed on rank b mod 2
    np.testing.assert_array_equal(result["mapped"], np.arange(23) * 10)
    assert float(result["total"][0]) == 3.0 and int(result["world"]) == 2
    np.testing.assert_array_equal(result["a"], np.full((2, 2), 3.0))
    np.testing.assert_array_equal(result["b"], np.full(3, 2.0))
    assert "`x` differs across ranks" in str(result["mismatch"])
    np.testing.assert_array_equal(result["shards"], [[0, 1], [0, 3]])  # rank 0: all of a batch of 1, 3 of 5
    np.testing.assert_array_equal(result["grad"], np.full((2, 2), 3.0))  # summed
    assert bool(result["bias_grad_none"])  # None on every rank stays None
    np.testing.assert_array_equal(result["broadcast_weight"], np.zeros((2, 2)))  # rank 0's


def _failing_worker() -> None:
    if distributed.rank() == 1:
        raise RuntimeError("rank one broke")
    distributed.all_reduce_sum(torch.ones(1))  # would wait forever for rank 1 without the launcher's cleanup


def test_a_failing_process_fails_the_launch_with_its_error():
    with pytest.raises(Exception, match="rank one broke"):
        distributed.launch(_failing_worker, 2)


def _worker_with_exit_handler(folder: str) -> None:
    import atexit

    rank = distributed.rank()
    with open(os.path.join(folder, f"returned{rank}"), "w", encoding="utf-8") as handle:
        handle.write("done")
    atexit.register(lambda: open(os.path.join(folder, f"atexit{rank}"), "w", encoding="utf-8").close())


def test_a_successful_launch_runs_the_exit_handlers_of_every_process(tmp_path):
    # each process that succeeded ends without the interpreter's finalization (gloo's teardown race); its atexit
    # handlers still run and its files are written
    distributed.launch(_worker_with_exit_handler, 2, args=(str(tmp_path),))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atexit0", "atexit1", "returned0", "returned1"]


def test_launch_rejects_bad_nproc():
    with pytest.raises(ValueError, match="nproc"):
        distributed.launch(_failing_worker, 0)
    with pytest.raises(TypeError, match="nproc"):
        distributed.launch(_failing_worker, 1.5)


# ------------------------------------------------------------------------------------------------ training
def _training_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10))
    torch.manual_seed(1)
    bn = torch.nn.Sequential(
        torch.nn.Linear(64, 24), torch.nn.BatchNorm1d(24), torch.nn.ReLU(), torch.nn.Linear(24, 10)
    )
    return {"plain": plain, "bn": bn}


def _train_all(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Robust training (λ, μ > 0, interval bound) of both models; 201 samples in batches of 40 leave a last global
    batch of 1 (an empty shard on rank 1), 202 in batches of 40 a last batch of 2 (batch norm needs 2)."""
    from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightRobustTrainer

    out = {}
    for name, model in _training_models().items():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
        clf = PyTorchWeightClassifier(model, torch.nn.CrossEntropyLoss(), (64,), 10, optimizer=optimizer)
        trainer = WeightRobustTrainer(  # batch norm on batch statistics: the global batch's (sync_batch_norm)
            clf, PerturbationBudget(0.001, "row_l1"), lam=0.2, mu=1e-3, warmup=2, batch_norm="train", verbose=False
        )
        n = 201 if name == "plain" else 202
        torch.manual_seed(123)
        history = trainer.fit(x[:n], y[:n], batch_size=40, nb_epochs=3)
        out[f"{name}_user_module"] = np.array(clf.model is model)
        out[f"{name}_loss"] = np.array(history["loss"])
        for key, value in model.state_dict().items():
            out[f"{name}/{key}"] = value.detach().numpy().copy()
    return out


def _generator_run(x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[np.ndarray, str]:
    """``fit_generator`` of the plain model on batches of ``(x, y)`` in order: ``(first weight, error or "")``."""
    from art.data_generators import NumpyDataGenerator

    from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightRobustTrainer

    model = _training_models()["plain"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    clf = PyTorchWeightClassifier(model, torch.nn.CrossEntropyLoss(), (64,), 10, optimizer=optimizer)
    trainer = WeightRobustTrainer(clf, PerturbationBudget(0.001, "row_l1"), lam=0.2, warmup=1, verbose=False)
    try:
        trainer.fit_generator(NumpyDataGenerator(x, y, batch_size, drop_remainder=False), nb_epochs=2)
    except ValueError as error:
        return model[0].weight.detach().numpy().copy(), str(error)
    return model[0].weight.detach().numpy().copy(), ""


def _generator_checks(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Each rank's generator yields its shard (rank r: samples [100 r, 100 r + 100), 20 per batch); the same
    generator on every rank and mismatched arrays in ``fit`` are refused."""
    from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightRobustTrainer

    r = distributed.rank()
    weight, error = _generator_run(x[100 * r : 100 * r + 100], y[100 * r : 100 * r + 100], 20)
    _, same = _generator_run(x[:100], y[:100], 20)
    model = _training_models()["plain"]
    clf = PyTorchWeightClassifier(
        model, torch.nn.CrossEntropyLoss(), (64,), 10, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)
    )
    try:
        WeightRobustTrainer(clf, PerturbationBudget(0.001), verbose=False).fit(x[: 50 + r], y[: 50 + r], nb_epochs=1)
        mismatch = "not detected"
    except ValueError as err:
        mismatch = str(err)
    return {"generator_weight": weight, "generator_error": np.array(error), "same_generator": np.array(same),
            "fit_mismatch": np.array(mismatch)}  # fmt: skip


def _training_worker(out_path: str, x: np.ndarray, y: np.ndarray) -> None:
    torch.set_num_threads(1)
    if distributed.rank() == 1:
        torch.manual_seed(999)  # the data order must come from rank 0, whatever the other ranks' generators hold
    result = _train_all(x, y)
    result.update(_generator_checks(x, y))
    spread = 0.0
    for key, value in result.items():  # how far the ranks' parameters and running statistics are apart
        if "/" in key:
            t = torch.as_tensor(value, dtype=torch.float64)
            low, high = t.clone(), t.clone()
            torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
            spread = max(spread, float((high - low).abs().max()))
    if distributed.is_main_process():
        np.savez(out_path, spread=spread, **result)


@pytest.mark.filterwarnings("ignore:robust training is stuck")
def test_two_process_training_equals_single_process_training(tmp_path, digits):
    x, y = digits[0][:202], digits[1][:202]
    single = _train_all(x, y)
    out = tmp_path / "train.npz"
    distributed.launch(_training_worker, 2, args=(str(out), x, y))
    # the single-process run on the global batches the two generators make together (rank 0's 20, then rank 1's 20)
    x_global = np.concatenate([np.concatenate([x[b : b + 20], x[100 + b : 120 + b]]) for b in range(0, 100, 20)])
    y_global = np.concatenate([np.concatenate([y[b : b + 20], y[100 + b : 120 + b]]) for b in range(0, 100, 20)])
    generator_weight, _ = _generator_run(x_global, y_global, 40)
    with np.load(out) as result:
        assert str(result["generator_error"]) == ""
        np.testing.assert_allclose(result["generator_weight"], generator_weight, rtol=0, atol=1e-6)
        assert "yields the same batch on several ranks" in str(result["same_generator"])
        assert "`x` differs across ranks" in str(result["fit_mismatch"])
        assert float(result["spread"]) == 0.0  # identical on every rank
        assert single["plain_loss"][-1] < single["plain_loss"][0]  # the runs learn
        assert single["bn_loss"][-1] < single["bn_loss"][0]
        for key, value in single.items():
            if key.endswith("user_module"):
                assert bool(result[key]) and bool(value)
            elif key.endswith("num_batches_tracked"):
                assert int(result[key]) == int(value) == 3 * 6
            else:  # equal up to the order of floating-point reductions (measured: 1.2e-7 plain, 8e-5 batch norm)
                atol = 1e-6 if key.startswith("plain") else 5e-4
                np.testing.assert_allclose(result[key], value, rtol=0, atol=atol, err_msg=key)


# ------------------------------------------------------------------------------------------------ evaluation
def _evaluation_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(64, 20), torch.nn.ReLU(), torch.nn.Linear(20, 10))


def _evaluate_all(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Every sharded evaluation on 150 samples in batches of 32 (5 batches: 3 on rank 0, 2 on rank 1)."""
    from art_weightpert import (
        BitFlipAttack,
        PerturbationBudget,
        PyTorchWeightClassifier,
        RandomBitFlips,
        RandomFloatBitFlips,
        RandomWeightPerturbation,
        WeightPerturbationCertifier,
        WeightPGD,
    )
    from art_weightpert.metrics import weight_robustness_curve

    clf = PyTorchWeightClassifier(_evaluation_model(), torch.nn.CrossEntropyLoss(), (64,), 10)
    budget = PerturbationBudget(0.02, "inf")
    torch.manual_seed(5 + distributed.rank())  # the random start must come from rank 0
    delta = WeightPGD(clf, budget, max_iter=8, num_random_init=1, batch_size=32, verbose=False).generate(x, y)
    random = RandomWeightPerturbation(clf, budget, nb_samples=4, seed=None, batch_size=32, verbose=False)
    torch.manual_seed(7 + distributed.rank())
    stats = random.evaluate(x, y)
    flips = BitFlipAttack(clf, max_flips=3, batch_size=32, verbose=False).generate(x, y)
    curve = weight_robustness_curve(
        clf, x, y, [0.0, 0.01, 0.03], methods=("clean", "random", "pgd"), batch_size=32, seed=0,
        pgd_params={"max_iter": 5},
    )  # fmt: skip
    l2 = WeightPGD(clf, PerturbationBudget(0.3, "l2"), max_iter=5, eps_step=0.2, batch_size=32, verbose=False)
    out = {f"pgd/{name}": value for name, value in delta.items()}
    out.update({f"pgd_l2/{name}": value for name, value in l2.generate(x, y).items()})
    out.update(random_accuracies=stats["accuracies"], random_clean=np.array(stats["clean"]))
    torch.manual_seed(13 + distributed.rank())  # seed=None: the flips must come from rank 0's stream
    bit_stats = RandomBitFlips(clf, nb_flips=40, bits=[0, 6, 7], nb_samples=3, batch_size=32, verbose=False).evaluate(
        x, None
    )  # labels: the quantized model's predictions
    float_stats = RandomFloatBitFlips(clf, ber=2e-4, nb_samples=3, seed=1, batch_size=32, verbose=False).evaluate(
        x, y, per_bit=False
    )
    for name, values in (("bit_flips", bit_stats), ("float_flips", float_stats)):
        out[f"{name}/accuracies"], out[f"{name}/nb_flips"] = values["accuracies"], values["nb_flips"]
        out.update({f"{name}/{key}": np.array(values[key]) for key in ("clean", "quantized") if key in values})
        for bit, summary in values.get("per_bit", {}).items():
            out[f"{name}/per_bit/{bit}"] = np.array([summary["mean"], summary["std"]])
    out["flips"] = np.array([str(flip) for flip in flips])
    for method in ("interval", "linear", "paper"):
        certifier = WeightPerturbationCertifier(clf, PerturbationBudget(0.01, "row_l1"), method, 32, verbose=False)
        out[f"certify/{method}"] = certifier.certify(x, y)
        out[f"certify_predicted/{method}"] = certifier.certify(x)
        out[f"margins/{method}"] = certifier.margin_lower_bounds(x, y)
        out[f"radius/{method}"] = certifier.certified_radius(x, y)
    for method, values in curve["accuracies"].items():
        out[f"curve/{method}"] = np.array(values)
    return out


def _evaluation_worker(out_path: str, x: np.ndarray, y: np.ndarray) -> None:
    from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, RandomBitFlips, RandomWeightPerturbation

    torch.set_num_threads(1)
    result = _evaluate_all(x, y)
    result.update(_sharding_checks())
    clf = PyTorchWeightClassifier(_evaluation_model(), torch.nn.CrossEntropyLoss(), (64,), 10)
    try:  # rank 1 passes other data: refused on every rank
        attack = RandomWeightPerturbation(clf, PerturbationBudget(0.01), nb_samples=1, seed=0, verbose=False)
        attack.evaluate(x[::-1].copy() if distributed.rank() == 1 else x, y)
        result["mismatch"] = np.array("not detected")
    except ValueError as error:
        result["mismatch"] = np.array(str(error))
    torch.manual_seed(11 + distributed.rank())  # seed=None: the draws must come from rank 0's stream
    flips = RandomBitFlips(clf, nb_flips=3, seed=None, verbose=False).generate()
    result["bit_flips_same"] = np.array(distributed.all_equal([str(flip) for flip in flips]))
    if distributed.is_main_process():
        np.savez(out_path, **result)


@pytest.fixture(scope="module")
def evaluation_run(tmp_path_factory, digits):
    """One launch of two processes for every sharded evaluation (start-up costs seconds)."""
    x, y = digits[0][:150], digits[1][:150]
    out = tmp_path_factory.mktemp("distributed") / "evaluate.npz"
    distributed.launch(_evaluation_worker, 2, args=(str(out), x, y))
    with np.load(out) as result:
        return dict(result)


def test_two_process_evaluation_equals_single_process_evaluation(evaluation_run, digits):
    x, y = digits[0][:150], digits[1][:150]
    torch.manual_seed(5)
    single = _evaluate_all(x, y)
    result = evaluation_run
    assert "`x` differs across ranks" in str(result["mismatch"])
    assert bool(result["bit_flips_same"])  # RandomBitFlips draws rank 0's flips on every rank
    np.testing.assert_array_equal(result["random_accuracies"], single["random_accuracies"])  # exact
    flip_keys = [k for k in single if k.startswith(("bit_flips/", "float_flips/"))]
    assert {"bit_flips/quantized", "bit_flips/per_bit/7", "float_flips/clean"} <= set(flip_keys)
    for key in flip_keys:  # the same draws on every rank, the counts summed: exact
        np.testing.assert_array_equal(result[key], single[key], err_msg=key)
    assert float(single["bit_flips/quantized"]) == 1.0 > single["bit_flips/accuracies"].min()  # the flips matter
    assert float(result["random_clean"]) == float(single["random_clean"])
    for key in [k for k in single if k.startswith("pgd")]:  # measured: box 0 (sign steps), ℓ2 3e-8
        np.testing.assert_allclose(result[key], single[key], rtol=0, atol=1e-6, err_msg=key)
    assert list(result["flips"]) == list(single["flips"])
    for key in [k for k in single if k.startswith(("certify", "margins", "radius"))]:
        np.testing.assert_array_equal(result[key], single[key], err_msg=key)  # exact: the same batches, gathered
    assert single["certify/interval"].any() and not single["certify/interval"].all()
    for key in [k for k in single if k.startswith("curve/")]:
        np.testing.assert_allclose(result[key], single[key], rtol=0, atol=1e-12, err_msg=key)


# ------------------------------------------------------------------------------------------------ command line
def test_cli_rejects_nproc_below_one(capsys):
    from art_weightpert.cli.commands import main

    for command in (["train", "--out", "m.pt"], ["evaluate", "--model", "m.pt", "--data", "d.npz"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--nproc", "0"])
        assert exit_info.value.code == 2
        assert "--nproc" in capsys.readouterr().err


def test_cli_train_in_two_processes_writes_only_when_every_rank_succeeded(tmp_path, capsys):
    from art_weightpert.cli.commands import main

    out = tmp_path / "model.pt"
    failed = main(["train", "--out", str(out), "--data", str(tmp_path / "missing.npz"), "--nproc", "2", "--quiet"])
    assert failed == 2 and "missing.npz" in capsys.readouterr().err  # the ranks' usage error, as one
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left
    argv = ["train", "--out", str(out), "--epochs", "1", "--hidden", "8", "--nproc", "2", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"Model saved to {out}" in printed and ".art-weightpert-partial" not in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.history.json", "model.pt"]
    history = (tmp_path / "model.history.json").read_text()
    assert str(out) in history and "partial" not in history
    from art_weightpert.cli.inputs import load_user_model

    assert load_user_model(str(out)).module(torch.zeros(2, 64)).shape == (2, 10)  # whatever format train chose
