"""Data parallelism on torch.distributed: ranks forked inside the call, in one gloo group."""

from __future__ import annotations

import multiprocessing
import os
import sys

import pytest
import torch

from tests.orphans import child_outlives_a_killed_parent
from xopd_core.distributed import all_gather_rows, run_ranks, share_parts
from xopd_core.train.sft import LossTerms, response_nll_terms, train_steps


def test_share_parts_deals_every_part_once_by_padded_size() -> None:
    lengths = [5, 5, 5, 5, 10, 10, 40, 40]
    parts = [[0, 1], [2, 3], [4, 5], [6, 7]]  # padded sizes 10, 10, 20, 80
    one, two = share_parts(parts, lengths, 2)
    assert one == [[6, 7]]  # the costliest part alone outweighs the rest
    assert two == [[0, 1], [2, 3], [4, 5]]  # kept in the given order
    even = share_parts([[0], [1], [2], [3]], [4, 3, 2, 1], 2)
    assert even == [[[0], [3]], [[1], [2]]]  # 4 + 1 against 3 + 2
    assert share_parts(parts, lengths, 1) == [parts]
    assert share_parts([[0]], [1], 3) == [[[0]], [], []]
    with pytest.raises(ValueError, match="world size"):
        share_parts(parts, lengths, 0)


def _fit(
    processes: int, steps: int = 12, dtype: torch.dtype = torch.float32
) -> tuple[list[float], list[torch.Tensor]]:
    """A tiny LM with one parameter no loss reaches (it must keep `grad=None`, so AdamW's
    weight decay leaves it alone), trained on sequences of three lengths."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(8, 16), torch.nn.Linear(16, 8)).to(dtype)
    unused = torch.nn.Parameter(torch.ones(3, dtype=dtype))
    gen = torch.Generator().manual_seed(1)
    lengths = [4 + (i % 3) * 3 for i in range(48)]
    seqs = [(torch.randint(0, 8, (1,), generator=gen) + torch.arange(n)) % 8 for n in lengths]

    def loss_of(idx: list[int]) -> LossTerms:
        longest = max(lengths[i] for i in idx)
        ids = torch.zeros(len(idx), longest, dtype=torch.long)
        labels = torch.full((len(idx), longest), -100)
        for row, i in enumerate(idx):
            ids[row, : lengths[i]] = seqs[i]
            labels[row, : lengths[i]] = seqs[i]
        return response_nll_terms(model(ids), labels)

    losses = train_steps(
        [*model.parameters(), unused],
        lengths,
        loss_of,
        steps=steps,
        batch_size=16,
        lr=0.05,
        warmup=0,
        seed=0,
        micro_batch_size=4,
        processes=processes,
    )
    return losses, [p.detach().clone() for p in [*model.parameters(), unused]]


def test_two_ranks_train_as_one_up_to_rounding_and_repeat_exactly() -> None:
    threads = torch.get_num_threads()
    one_losses, one = _fit(1)
    two_losses, two = _fit(2)
    again_losses, again = _fit(2)
    assert torch.get_num_threads() == threads  # restored after the ranks stop
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    assert two_losses[-1] < two_losses[0]
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert two_losses == again_losses
    assert all(torch.equal(a, b) for a, b in zip(two, again, strict=True))
    assert torch.equal(two[-1], torch.ones(3))  # no gradient anywhere: untouched
    assert not multiprocessing.active_children()


def test_two_ranks_give_one_ranks_update_in_float64() -> None:
    """The step of 2 ranks is the step of 1 rank on the whole batch: each rank's share of the
    micro-batches, gradients summed, divided by the whole batch's count."""
    one_losses, one = _fit(1, dtype=torch.float64)
    two_losses, two = _fit(2, dtype=torch.float64)
    assert two_losses == pytest.approx(one_losses, rel=1e-12)
    for a, b in zip(one, two, strict=True):
        assert b.dtype == torch.float64
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_a_failing_rank_stops_training_with_its_error() -> None:
    model = torch.nn.Linear(4, 2)
    x = torch.randn(16, 4)

    def loss_of(idx: list[int]) -> LossTerms:
        if multiprocessing.parent_process() is not None:  # in the forked rank
            raise ValueError(f"rows {idx} are broken")
        return LossTerms(model(x[idx]).pow(2).sum(), float(len(idx)))

    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed.*rows \[.*\] are broken"):
        train_steps(
            list(model.parameters()),
            [1] * 16,
            loss_of,
            steps=5,
            batch_size=16,
            lr=0.1,
            warmup=0,
            seed=0,
            micro_batch_size=4,
            processes=2,
        )
    assert not multiprocessing.active_children()


def test_processes_need_micro_batches() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="micro_batch_size"):
        train_steps(
            [p],
            [1],
            lambda idx: LossTerms(p.sum(), 1.0),
            steps=1,
            batch_size=1,
            lr=0.1,
            warmup=0,
            seed=0,
            processes=2,
        )


def test_ranks_run_in_one_group_each_on_its_share_of_the_threads() -> None:
    here, threads = os.getpid(), torch.get_num_threads()

    def fn(rank: int, world: int) -> list[list[list[int]]]:
        total = torch.tensor([float(rank + 1)])
        torch.distributed.all_reduce(total)
        rows = [[rank, world, int(total)], [os.getpid(), torch.get_num_threads()], [7] * rank]
        return all_gather_rows(rows)

    three = run_ranks(fn, 3)
    assert [r[0] for r in three] == [[0, 3, 6], [1, 3, 6], [2, 3, 6]]  # rank, world, 1+2+3
    assert [r[2] for r in three] == [[], [7], [7, 7]]  # rows of any length, none included
    pids = [r[1][0] for r in three]
    assert pids[0] == here and len(set(pids)) == 3
    assert all(r[1][1] == max(1, threads // 3) for r in three)
    assert torch.get_num_threads() == threads
    assert not torch.distributed.is_initialized()
    assert run_ranks(lambda rank, world: (rank, world), 1) == (0, 1)
    assert all_gather_rows([[1, 2]]) == [[[1, 2]]]  # outside a group: this process's own
    assert not multiprocessing.active_children()
    with pytest.raises(ValueError, match="world size"):
        run_ranks(fn, 0)


def test_rank_zeros_own_error_is_raised_as_it_is_and_no_rank_stays() -> None:
    def fn(rank: int, world: int) -> None:
        if rank == 0:
            raise KeyError("rank zero's item")
        torch.distributed.barrier()  # the forked rank waits for a rank 0 that is gone

    with pytest.raises(KeyError, match="rank zero's item"):
        run_ranks(fn, 2)
    assert not multiprocessing.active_children()
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_trainer_takes_its_ranks_with_it() -> None:
    """The OOM killer's SIGKILL runs no clean-up: a forked rank (a copy of the model and
    data) must not stay behind, orphaned, holding the memory."""
    code = (
        "import os, time\n"
        "from xopd_core.distributed import run_ranks\n"
        "def fn(rank, world):\n"
        "    if rank == 1:\n"
        "        print(os.getpid(), flush=True)\n"
        "    time.sleep(600)\n"
        "run_ranks(fn, 2)\n"
    )
    assert not child_outlives_a_killed_parent(code), "a rank outlived the trainer that forked it"


def test_launched_ranks_refuse_a_wrong_world_and_a_missing_rendezvous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a launcher the ranks are its own: a world size other than its WORLD_SIZE, or
    no MASTER_ADDR/MASTER_PORT to meet at, stop before any group is joined."""
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"rank 1: the launcher started 4 ranks .* asks for 2"):
        run_ranks(lambda r, n: r, 2)
    with pytest.raises(
        RuntimeError, match=r"rank 1 of 4: no rendezvous, MASTER_ADDR and MASTER_PORT"
    ):
        run_ranks(lambda r, n: r, 4)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='four'"):
        run_ranks(lambda r, n: r, 4)
    assert not torch.distributed.is_initialized()


def test_forked_ranks_cannot_share_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        run_ranks(lambda r, n: r, 2, device="cuda")
    assert run_ranks(lambda r, n: (r, n), 1, device="cuda") == (0, 1)
