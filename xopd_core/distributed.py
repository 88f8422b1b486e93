"""Data parallelism on torch.distributed: ranks in a gloo process group, each computing its
share of a batch's micro-batches (training) or of the prompts (greedy decoding).

`run_ranks(fn, n)` starts the ranks inside the call: torch.multiprocessing forks n − 1
processes (forks, so they already hold the model, the data and the closures: nothing is
pickled), all n join one gloo group over a file store, and each runs `fn(rank, n)`; this
process is rank 0 and gets fn(0, n)'s result. Every rank steps its own optimizer on the
same summed gradients, so the ranks' weights stay equal without being sent (DDP's scheme);
rank 0 keeps them when the others exit.

A tiny model's small matrix products gain ~1.4x from a second thread on 2 cores; two
single-threaded ranks on halves of a batch gain more (docs/speed.md, "Processes").
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from xopd_core.runtime import die_with_parent

Part = list[int]
R = TypeVar("R")
TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a rank that went silent


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _join_group(store: str, rank: int, world: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, unless the user chose one
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=TIMEOUT
    )


def _rank(
    index: int, fn: Callable[[int, int], object], store: str, world: int, threads: int
) -> None:
    """A forked rank (index 0 is rank 1). If the trainer is killed (the OOM killer), this copy
    of its model and data must not stay behind: the kernel sends SIGKILL when it goes."""
    die_with_parent()
    torch.set_num_threads(threads)
    _join_group(store, index + 1, world)
    try:
        fn(index + 1, world)
    finally:
        dist.destroy_process_group()
    # Done: leave without the interpreter's exit work, which belongs to the process this
    # one is a copy of. Under a Prefect worker's flow run that work ended a finished rank
    # with exit code 1 (measured: fn returned, the group was destroyed, then code 1).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _failed_rank(ranks: tmp.ProcessContext) -> tuple[int, str] | None:
    """The first forked rank that failed, and its traceback; None if none does within 2 s."""
    try:
        ranks.join(timeout=2)
    except tmp.ProcessRaisedException as err:
        return err.error_index + 1, err.msg
    except tmp.ProcessExitedException as err:
        return err.error_index + 1, f"exited with code {err.exit_code}"
    return None


def run_ranks(fn: Callable[[int, int], R], world: int) -> R:
    """`fn(rank, world)` on `world` ranks (this process and `world − 1` forks, each on its
    share of the threads); returns rank 0's result. A rank's exception is raised here as a
    RuntimeError naming the rank and holding its traceback; no rank outlives the call."""
    if world < 1:
        raise ValueError(f"the world size must be ≥ 1, got {world}")
    if world == 1:
        return fn(0, 1)
    if dist.is_initialized():
        raise RuntimeError("a process group is already running: ranks cannot be started inside it")
    threads = max(1, torch.get_num_threads() // world)
    with tempfile.TemporaryDirectory(prefix="xopd-ranks-") as folder:
        store = os.path.join(folder, "store")
        ranks = tmp.start_processes(
            _rank,
            args=(fn, store, world, threads),
            nprocs=world - 1,
            join=False,
            start_method="fork",
        )
        try:
            with _threads(threads):
                _join_group(store, 0, world)
                try:
                    result = fn(0, world)
                except BaseException as ours:
                    # A rank that died first broke rank 0's collective: its error says more.
                    failed = _failed_rank(ranks)
                    if failed is not None:
                        raise RuntimeError(f"rank {failed[0]} failed:\n{failed[1]}") from ours
                    raise
                finally:
                    dist.destroy_process_group()
            while not ranks.join():
                pass
        finally:
            for p in ranks.processes:
                if p.is_alive():
                    p.kill()
                p.join()
    return result


def share_parts(parts: Sequence[Part], lengths: Sequence[int], ranks: int) -> list[list[Part]]:
    """`parts` (micro-batches of example indices) dealt to `ranks` ranks so each gets a
    similar padded size (examples × longest length): the costliest part first, each to the
    least-loaded rank so far (ties to the lower rank). A rank may get none; each keeps its
    parts in the given order."""
    if ranks < 1:
        raise ValueError(f"the world size must be ≥ 1, got {ranks}")
    cost = [len(p) * max(lengths[i] for i in p) for p in parts]
    load = [0] * ranks
    dealt: list[list[int]] = [[] for _ in range(ranks)]
    for k in sorted(range(len(parts)), key=lambda k: (-cost[k], k)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        load[r] += cost[k]
        dealt[r].append(k)
    return [[parts[k] for k in sorted(ks)] for ks in dealt]


def all_reduce_gradients(
    params: Sequence[torch.nn.Parameter], total: float, count: float
) -> tuple[float, float]:
    """Sum every rank's `.grad` of `params` (one all-reduce of one flat buffer) and their
    (loss total, count). A parameter no rank computed a gradient for keeps `None`, so
    AdamW's weight decay leaves it alone, as on one rank."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    has = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype)
    flat = torch.cat([*(g.reshape(-1) for g in grads), has])
    stats = torch.tensor([total, count], dtype=torch.float64)
    dist.all_reduce(flat)
    dist.all_reduce(stats)
    summed = flat[: -len(params)].split([p.numel() for p in params])
    anyone = flat[-len(params) :].tolist()
    for p, g, a in zip(params, summed, anyone, strict=True):
        p.grad = g.view_as(p).to(p.dtype) if a > 0 else None
    return float(stats[0]), float(stats[1])


def all_gather_rows(rows: list[list[int]]) -> list[list[list[int]]]:
    """Every rank's rows of ints, in rank order (outside a process group: this process's);
    sent as one flat tensor a rank: the row count, the row lengths, the values."""
    if not dist.is_initialized():
        return [rows]
    mine = torch.tensor([len(rows), *map(len, rows), *itertools.chain(*rows)], dtype=torch.long)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(mine)]))
    longest = int(max(sizes))
    padded = [torch.zeros(longest, dtype=torch.long) for _ in sizes]
    dist.all_gather(padded, torch.nn.functional.pad(mine, (0, longest - len(mine))))
    out = []
    for flat in (t.tolist() for t in padded):
        lens = flat[1 : 1 + flat[0]]
        ends = list(itertools.accumulate(lens, initial=1 + flat[0]))
        out.append([flat[a:b] for a, b in itertools.pairwise(ends)])
    return out


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank holds the same keys)."""
    summed = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(summed)
    return {k: v / dist.get_world_size() for k, v in zip(values, summed.tolist(), strict=True)}
