"""Data parallelism over processes on one CPU machine: forked helpers compute the gradients of
some micro-batches of each batch while this process computes the rest (`GradientHelpers`),
or a share of independent jobs such as greedy-decoding batches (`forked_map`).

A tiny model's small matrix products gain ~1.4x from a second thread on 2 cores; two
single-threaded processes on halves of a batch gain more (docs/speed.md, "Processes"). A helper is
a fork, so it already holds the model, the data and the loss closure (nothing is pickled);
the trained parameters are moved to shared memory before the fork, so a helper reads every
optimizer step's result in place. Only this process steps the optimizer. Not
torch.distributed: no rendezvous or process group, one pipe and shared gradient buffers each.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import torch

from xopd_core.runtime import die_with_parent

Part = list[int]
T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _map_share(conn: Connection, fn: Callable[[Any], Any], share: list[Any], threads: int) -> None:
    die_with_parent()
    torch.set_num_threads(threads)
    try:
        conn.send([fn(x) for x in share])
    except BaseException:
        conn.send(traceback.format_exc())


def forked_map(fn: Callable[[T], R], items: Sequence[T], processes: int) -> list[R]:
    """`[fn(x) for x in items]`, with items `k, k + processes, …` computed by forked helper k
    (k ≥ 1; this process takes k = 0), each process on its share of the threads. `fn` may
    be a closure over models and data: helpers are forks, only items' results are pickled.
    A helper's exception is raised here as a RuntimeError holding its traceback."""
    if processes < 1:
        raise ValueError(f"processes must be ≥ 1, got {processes}")
    processes = min(processes, len(items))
    if processes <= 1:
        return [fn(x) for x in items]
    threads = max(1, torch.get_num_threads() // processes)
    shares = [list(items[k::processes]) for k in range(processes)]
    ctx = multiprocessing.get_context("fork")
    helpers = []
    try:
        for k in range(1, processes):
            ours, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_map_share,
                args=(theirs, fn, shares[k], threads),
                name=f"xopd-map-helper-{k}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            helpers.append((proc, ours))
        with _threads(threads):
            results: list[list[Any]] = [[fn(x) for x in shares[0]]]
        for k, (proc, conn) in enumerate(helpers, start=1):
            try:
                reply = conn.recv()
            except EOFError:
                proc.join()
                raise RuntimeError(f"helper {k} died (exit code {proc.exitcode})") from None
            if isinstance(reply, str):
                raise RuntimeError(f"helper {k} failed:\n{reply}")
            results.append(reply)
    finally:
        for proc, conn in helpers:
            conn.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    out: list[R] = [None] * len(items)  # type: ignore[list-item]
    for k, share in enumerate(results):
        out[k::processes] = share
    return out


def share_parts(parts: Sequence[Part], lengths: Sequence[int], processes: int) -> list[list[Part]]:
    """`parts` (micro-batches of example indices) dealt to `processes` workers so each gets a
    similar padded size (examples × longest length): the costliest part first, each to the
    least-loaded worker so far (ties to the lower worker). A worker may get none. Worker 0
    is this process; each worker keeps its parts in the given order."""
    if processes < 1:
        raise ValueError(f"processes must be ≥ 1, got {processes}")
    cost = [len(p) * max(lengths[i] for i in p) for p in parts]
    load = [0] * processes
    dealt: list[list[int]] = [[] for _ in range(processes)]
    for k in sorted(range(len(parts)), key=lambda k: (-cost[k], k)):
        w = min(range(processes), key=lambda w: (load[w], w))
        load[w] += cost[k]
        dealt[w].append(k)
    return [[parts[k] for k in sorted(ks)] for ks in dealt]


def _serve(
    conn: Connection,
    params: list[torch.nn.Parameter],
    grads: list[torch.Tensor],
    run_parts: Callable[[list[Part]], tuple[float, float]],
    threads: int,
) -> None:
    """A helper's loop: for each list of parts received, their summed gradients into the
    shared `grads` (with which parameters got one) and (loss total, count); None ends it.
    A helper holds a copy of the model and data: if the trainer is killed (the OOM killer),
    it must not stay behind. The pipe cannot tell it (the fork holds the trainer's end too),
    so it asks the kernel for SIGKILL when the trainer goes."""
    die_with_parent()
    torch.set_num_threads(threads)
    try:
        while (parts := conn.recv()) is not None:
            for p in params:
                p.grad = None
            total, count = run_parts(parts)
            has = []
            for p, g in zip(params, grads, strict=True):
                has.append(p.grad is not None)
                if p.grad is not None:
                    g.copy_(p.grad)
            conn.send((total, count, has))
    except EOFError:  # the trainer went away
        return
    except BaseException:
        conn.send(traceback.format_exc())


class GradientHelpers:
    """`n` forked helpers for a training loop over `params`. `run_parts(parts)` runs forward
    and backward over a list of micro-batches, accumulating into `.grad`, and returns the
    summed (loss total, count). Use as a context manager; the helpers stop on exit.

    Each step: `start(i, parts)` for each helper, then this process runs its own parts,
    then `collect()` adds the helpers' gradients, in helper order, to this process's. The
    sum is the same for a fixed `n`, so training stays deterministic; it differs from a
    one-process run only in float rounding."""

    def __init__(
        self,
        n: int,
        params: Sequence[torch.nn.Parameter],
        run_parts: Callable[[list[Part]], tuple[float, float]],
        threads: int = 1,
    ) -> None:
        self.params = list(params)
        for p in self.params:
            p.data.share_memory_()
        ctx = multiprocessing.get_context("fork")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._grads: list[list[torch.Tensor]] = []  # helper k writes its gradients here
        try:
            for k in range(n):
                grads = [torch.zeros_like(p.data).share_memory_() for p in self.params]
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=_serve,
                    args=(theirs, self.params, grads, run_parts, threads),
                    name=f"xopd-gradient-helper-{k}",
                    daemon=True,
                )
                proc.start()
                theirs.close()
                self._conns.append(ours)
                self._procs.append(proc)
                self._grads.append(grads)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> GradientHelpers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, k: int, parts: list[Part]) -> None:
        self._conns[k].send(parts)

    def collect(self) -> tuple[float, float]:
        """Wait for every helper's step; add their gradients to `.grad` (a parameter no
        process computed a gradient for keeps None) and return their summed (total, count)."""
        total, count = 0.0, 0.0
        for k, conn in enumerate(self._conns):
            try:
                reply = conn.recv()
            except EOFError:
                code = self._procs[k].exitcode
                raise RuntimeError(f"gradient helper {k} died (exit code {code})") from None
            if isinstance(reply, str):
                raise RuntimeError(f"gradient helper {k} failed:\n{reply}")
            t, c, has = reply
            total += t
            count += c
            for p, g, h in zip(self.params, self._grads[k], has, strict=True):
                if not h:
                    continue
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        return total, count

    def close(self) -> None:
        for conn in self._conns:
            with suppress(OSError):  # a helper that died has closed its end
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs, self._grads = [], [], []
