"""torch.distributed helpers: sharding by whole batches, gathering in single-process order, data checks, and a
launcher that fails (instead of hanging) when one process fails. Two gloo processes on this machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from art_weightpert import distributed


def test_single_process_helpers_are_the_identity():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert [(s.start, s.stop) for s in distributed.my_batches(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    pieces = [np.arange(4), np.arange(4, 8), np.arange(8, 10)]
    np.testing.assert_array_equal(distributed.gather_batches(pieces, 10, 4), np.arange(10))
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    distributed.check_same_data(np.zeros(3), name="x")  # nothing to compare against


def _sharding_worker(out_path: str) -> None:
    n, batch_size = 23, 4
    batches = list(distributed.my_batches(n, batch_size))
    pieces = [np.stack([np.arange(s.start, s.stop), np.full(s.stop - s.start, distributed.rank())], 1) for s in batches]
    gathered = distributed.gather_batches(pieces, n, batch_size)
    total = distributed.all_reduce_sum(torch.tensor([float(distributed.rank() + 1)]))
    summed = distributed.all_reduce_sum_dict({"a": torch.ones(2, 2) * (distributed.rank() + 1), "b": torch.ones(3)})
    x = np.arange(12.0).reshape(3, 4)
    distributed.check_same_data(x, np.arange(3), name="x")
    try:
        distributed.check_same_data(x + distributed.rank(), name="x")
        mismatch = "not detected"
    except ValueError as error:
        mismatch = str(error)
    if distributed.is_main_process():
        np.savez(
            out_path, gathered=gathered, total=total.numpy(), a=summed["a"].numpy(), b=summed["b"].numpy(),
            world=distributed.world_size(), mismatch=np.array(mismatch),
        )  # fmt: skip


def test_two_processes_shard_whole_batches_and_gather_in_order(tmp_path):
    out = tmp_path / "out.npz"
    distributed.launch(_sharding_worker, 2, args=(str(out),))
    with np.load(out) as result:
        gathered = result["gathered"]
        np.testing.assert_array_equal(gathered[:, 0], np.arange(23))  # single-process order
        np.testing.assert_array_equal(gathered[:, 1], (np.arange(23) // 4) % 2)  # batch b computed on rank b mod 2
        assert float(result["total"][0]) == 3.0 and int(result["world"]) == 2
        np.testing.assert_array_equal(result["a"], np.full((2, 2), 3.0))
        np.testing.assert_array_equal(result["b"], np.full(3, 2.0))
        assert "`x` differs across ranks" in str(result["mismatch"])


def _failing_worker() -> None:
    if distributed.rank() == 1:
        raise RuntimeError("rank one broke")
    distributed.all_reduce_sum(torch.ones(1))  # would wait forever for rank 1 without the launcher's cleanup


def test_a_failing_process_fails_the_launch_with_its_error():
    with pytest.raises(Exception, match="rank one broke"):
        distributed.launch(_failing_worker, 2)


def test_launch_rejects_bad_nproc():
    with pytest.raises(ValueError, match="nproc"):
        distributed.launch(_failing_worker, 0)
    with pytest.raises(TypeError, match="nproc"):
        distributed.launch(_failing_worker, 1.5)
