"""Training on several processes: the micro-batches of a batch dealt out to forked helpers."""

from __future__ import annotations

import multiprocessing
import os
import sys

import pytest
import torch

from tests.orphans import child_outlives_a_killed_parent
from xopd_core.parallel import forked_map, share_parts
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
    with pytest.raises(ValueError, match="processes"):
        share_parts(parts, lengths, 0)


def _fit(processes: int, steps: int = 12) -> tuple[list[float], list[torch.Tensor]]:
    """A tiny LM with one parameter no loss reaches (it must keep `grad=None`, so AdamW's
    weight decay leaves it alone), trained on sequences of three lengths."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(8, 16), torch.nn.Linear(16, 8))
    unused = torch.nn.Parameter(torch.ones(3))
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


def test_two_processes_train_as_one_up_to_rounding_and_repeat_exactly() -> None:
    threads = torch.get_num_threads()
    one_losses, one = _fit(1)
    two_losses, two = _fit(2)
    again_losses, again = _fit(2)
    assert torch.get_num_threads() == threads  # restored after the helpers stop
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    assert two_losses[-1] < two_losses[0]
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert two_losses == again_losses
    assert all(torch.equal(a, b) for a, b in zip(two, again, strict=True))
    assert torch.equal(two[-1], torch.ones(3))  # no gradient anywhere: untouched
    assert not multiprocessing.active_children()


def test_a_failing_helper_stops_training_with_its_error() -> None:
    model = torch.nn.Linear(4, 2)
    x = torch.randn(16, 4)

    def loss_of(idx: list[int]) -> LossTerms:
        if multiprocessing.parent_process() is not None:  # in the helper
            raise ValueError(f"rows {idx} are broken")
        return LossTerms(model(x[idx]).pow(2).sum(), float(len(idx)))

    with pytest.raises(RuntimeError, match=r"(?s)gradient helper 0 failed.*rows \[.*\] are broken"):
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


def test_forked_map_keeps_the_order_and_spreads_the_items() -> None:
    here = os.getpid()
    out = forked_map(lambda x: (x * x, os.getpid(), torch.get_num_threads()), range(7), 3)
    assert [v for v, _, _ in out] == [x * x for x in range(7)]
    pids = [pid for _, pid, _ in out]
    assert pids[0::3] == [here] * 3  # this process takes items 0, 3, 6
    assert len(set(pids)) == 3 and all(len(set(pids[k::3])) == 1 for k in range(3))
    assert forked_map(lambda x: x + 1, [1], 4) == [2]  # more processes than items
    assert not multiprocessing.active_children()


def test_forked_map_raises_a_helpers_error() -> None:
    def fn(x: int) -> int:
        if x == 5:
            raise KeyError(f"item {x}")
        return x

    with pytest.raises(RuntimeError, match=r"(?s)helper 1 failed.*KeyError: 'item 5'"):
        forked_map(fn, range(6), 2)
    assert not multiprocessing.active_children()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_trainer_takes_its_gradient_helpers_with_it() -> None:
    """The OOM killer's SIGKILL runs no clean-up: a helper (a copy of the model and data)
    must not stay behind, orphaned, holding the memory."""
    code = (
        "import time, torch\n"
        "from xopd_core.parallel import GradientHelpers\n"
        "w = torch.nn.Parameter(torch.zeros(3))\n"
        "h = GradientHelpers(1, [w], lambda parts: (0.0, 0.0))\n"
        "print(h._procs[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    assert not child_outlives_a_killed_parent(code), (
        "the gradient helper outlived the trainer that forked it"
    )
