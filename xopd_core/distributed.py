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

Gradients are summed by `all_reduce_gradients`, one all-reduce of one flat buffer a step
(DDP's scheme with a single bucket), rather than by wrapping the model in
`DistributedDataParallel`: DDP reduces inside every rank's backward pass and so needs every
rank to run the same number of them, while `share_parts` balances ranks by padded size (a
rank may get fewer micro-batches, or none) and a round's anchor loss runs on rank 0 only.

`ShardedUpdate` is the other mode (`train.parallel: fsdp`): FSDP2's `fully_shard` over the
transformer layers, for students whose weights, gradients and AdamW moments do not fit one
device.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from xopd_core.runtime import die_with_parent, launched_rank

Part = list[int]
R = TypeVar("R")
MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
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
    of its model and data must not stay behind: the kernel sends SIGKILL when it goes.

    What the fork copied is never garbage-collected here: a process group of an earlier
    section, left in a reference cycle, hung this rank in its destructor (py-spy: the
    collector inside a forward pass, in ~ProcessGroupGloo, pthread_cond_broadcast), its
    threads and locks being the parent's. The parent collects before forking too."""
    gc.freeze()
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


_launched_sections = 0


def _run_launched(fn: Callable[[int, int], R], rank: int, world: int, device: str) -> R:
    """`fn` as this launched rank, in the launcher's group (env:// rendezvous: MASTER_ADDR,
    MASTER_PORT); gloo on CPU, NCCL on CUDA. Rank 0 returns fn's result; every other rank
    ends its process when its share is done (SystemExit 0, through its callers' `with`
    blocks), so only rank 0 goes on to write outputs. Hence one such section per launch."""
    global _launched_sections
    if _launched_sections:
        raise RuntimeError(
            f"rank {rank}: a second distributed section in one launch (the other ranks have "
            "ended after the first); launch a command that has one, such as `xopd train`"
        )
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"rank {rank} of {world}: no rendezvous, {' and '.join(missing)} not set; start "
            "the ranks with torchrun (--standalone on one machine, --rdzv-endpoint across "
            "several)"
        )
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"rank {rank}: train.device cuda needs NCCL and a GPU; none is visible"
            )
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == world:  # every rank on this machine
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=TIMEOUT)
    _launched_sections += 1
    try:
        result = fn(rank, world)
    finally:
        dist.destroy_process_group()
    if rank != 0:  # unwinds its caller, so what it opened (vLLM engines) is closed
        raise SystemExit(0)
    return result


def run_ranks(fn: Callable[[int, int], R], world: int, device: str = "cpu") -> R:
    """`fn(rank, world)` on `world` ranks (this process and `world − 1` forks, each on its
    share of the threads); returns rank 0's result. A rank's exception is raised here as a
    RuntimeError naming the rank and holding its traceback; no rank outlives the call.

    In a process a launcher started (`launched_rank`), the ranks are the launcher's: `world`
    must be its WORLD_SIZE, and this process runs its own rank only (`_run_launched`).
    `device`: where the model is (cuda: NCCL; forks cannot share a GPU, so launched only)."""
    if world < 1:
        raise ValueError(f"the world size must be ≥ 1, got {world}")
    launched = launched_rank()
    if launched is not None and launched[1] > 1:
        rank, size = launched
        if size != world:
            raise ValueError(
                f"rank {rank}: the launcher started {size} ranks (WORLD_SIZE) but this step "
                f"asks for {world}: set the processes key to {size}"
            )
        return _run_launched(fn, rank, size, device)
    if world == 1:
        return fn(0, 1)
    if device == "cuda":
        raise ValueError(
            f"{world} ranks on CUDA need a process each: start them with torchrun "
            f"--nproc-per-node {world} (forks of one process cannot share a GPU)"
        )
    if dist.is_initialized():
        raise RuntimeError("a process group is already running: ranks cannot be started inside it")
    threads = max(1, torch.get_num_threads() // world)
    gc.collect()  # an earlier section's group is destroyed here, not in a fork (`_rank`)
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


class ReplicatedUpdate:
    """`train.parallel: ddp` (and one process): every rank holds the whole model, computes
    its share's gradients, and steps on their sum, so the ranks' weights stay equal without
    being sent. The interface `ShardedUpdate` shares, so the trainer's loop has one path."""

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
        self.model = model
        self._params = list(params)

    def start(self, opt: torch.optim.Optimizer, make: MakeOptimizer) -> torch.optim.Optimizer:
        """The optimizer to step inside the group: `opt` itself."""
        return opt

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def reduce(self, loss_total: float) -> float:
        """After every rank's backward: sum the gradients and the loss totals over ranks."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return loss_total
        total, _ = all_reduce_gradients(self._params, loss_total, 0.0)
        return total

    def clip_grad_norm_(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))

    def publish(self) -> None:
        """Nothing to publish: the model that samples is the one that stepped."""

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        return opt.state_dict()

    def share_of_extra_loss(self, rank: int, ranks: int) -> float:
        """The weight a rank gives a loss outside the step's rollouts (the anchor): rank 0
        runs it whole, the others not at all (0)."""
        return 1.0 if rank == 0 else 0.0


def _layer_classes(model: torch.nn.Module) -> set[str]:
    """The class names transformers keeps whole when it splits a model over devices (its
    `_no_split_modules`: the decoder and encoder layers), of the model and its parts."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    return names


class ShardedUpdate:
    """FSDP2 for the update (`train.parallel: fsdp`), inside a process group.

    The update runs on a copy of `model` whose transformer layers that train are sharded
    over the ranks (`fully_shard`, one group a layer): each rank keeps 1/world of their
    weights, gradients and AdamW moments, and gathers a layer's weights only while it runs
    (forward and backward). The parts outside those layers that train (embeddings, output
    head, final norm: a 7B LM's ~15 %) stay whole on every rank, their gradients summed as
    under ddp. Frozen parameters (the audio encoder) are shared with `model`, not copied.

    `model` itself stays whole and keeps sampling the rollouts, as an inference engine
    would: `publish()` gathers the new weights into it after each step. Gradients are
    summed, not averaged (`set_gradient_divide_factor(1)`), because the loss already
    carries the whole step's weights, so the update is one process's up to float rounding.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        """The copy, made before any rank starts: a rank forked while another thread held
        a lock deadlocked deep-copying the model (measured). `start()` inside the group."""
        self.source = model
        # Frozen parameters are shared with the source model instead of copied.
        shared: dict[int, Any] = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=shared)
        classes = _layer_classes(model)
        self.layers = [
            m
            for m in reversed(list(self.model.modules()))  # inner layers before outer ones
            if type(m).__name__ in classes and any(p.requires_grad for p in m.parameters())
        ]
        if not self.layers:
            raise ValueError(
                f"train.parallel fsdp shards the transformer layers, and {type(model).__name__} "
                "names none that train (its _no_split_modules): use train.parallel: ddp"
            )

    def start(self, opt: torch.optim.Optimizer, make: MakeOptimizer) -> torch.optim.Optimizer:
        """Inside the process group (every rank): shard the copy's layers, and return the
        optimizer `make(parameters)` over them, holding this rank's shard of `opt`'s state
        when a resumed run restored one (`opt` is emptied)."""
        for layer in self.layers:
            fully_shard(layer)
            assert isinstance(layer, FSDPModule)
            layer.set_gradient_divide_factor(1.0)
            layer.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled sum
        optimizer = make(self.parameters())
        if opt.state:  # resumed: one process's moments, each rank keeps its shard
            self.load_optimizer_state(optimizer, opt.state_dict())
            opt.state.clear()
        self.model.train()
        return optimizer

    def share_of_extra_loss(self, rank: int, ranks: int) -> float:
        """Sharded layers need every rank in every forward: each rank runs a loss outside
        the step's rollouts (the anchor) at 1/ranks of its weight, and the sum is the same."""
        return 1.0 / ranks

    def parameters(self) -> list[torch.nn.Parameter]:
        """The copy's trainable parameters, in the source model's order (sharded ones are
        DTensors)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def reduce(self, loss_total: float) -> float:
        """After every rank's backward: sum the whole parameters' gradients (the sharded
        ones were reduce-scattered in the backward pass) and the ranks' loss totals."""
        whole = [p for p in self.parameters() if not isinstance(p, DTensor)]
        if not whole:
            stats = torch.tensor([loss_total], dtype=torch.float64)
            dist.all_reduce(stats)
            return float(stats[0])
        total, _ = all_reduce_gradients(whole, loss_total, 0.0)
        return total

    def clip_grad_norm_(self, max_norm: float) -> float:
        """`torch.nn.utils.clip_grad_norm_` over whole and sharded gradients together: the
        2-norm of all of them (each shard's squares summed over the ranks), then every
        gradient scaled by min(1, max_norm / (norm + 1e-6)). Returns the norm."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        squares = torch.zeros(2, dtype=torch.float64)
        for g in grads:
            if isinstance(g, DTensor):
                squares[0] += g.to_local().double().pow(2).sum()
            else:
                squares[1] += g.double().pow(2).sum()
        shard_part = squares[:1].clone()
        dist.all_reduce(shard_part)
        norm = math.sqrt(float(shard_part[0] + squares[1]))
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm

    @torch.no_grad()
    def publish(self) -> None:
        """Gather the copy's trainable weights into the source model (every rank)."""
        source = dict(self.source.named_parameters())
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                source[name].copy_(_whole(p) if isinstance(p, DTensor) else p)

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """`opt.state_dict()` with every sharded moment gathered whole (every rank takes
        part; the result is what one process's AdamW would hold)."""
        sd = opt.state_dict()
        state = {
            i: {k: _whole(v) if isinstance(v, DTensor) else v for k, v in s.items()}
            for i, s in sd["state"].items()
        }
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_optimizer_state(self, opt: torch.optim.Optimizer, full: dict[str, Any]) -> None:
        """Load one process's AdamW state (every rank holds it whole) into `opt` over the
        sharded copy: each rank keeps its shard of each moment, no communication."""
        params = self.parameters()
        state = {}
        for i, s in full["state"].items():
            p = params[int(i)]
            state[i] = {
                k: _shard_like(p, v) if isinstance(p, DTensor) and v.shape == p.shape else v
                for k, v in s.items()
            }
        opt.load_state_dict({"state": state, "param_groups": full["param_groups"]})


# FSDP2 keeps dim 0 of each parameter in torch.chunk's pieces, rank r the r-th. The two
# functions below move those pieces with the default group's own collectives rather than
# DTensor's (`full_tensor`, `distribute_tensor`): in a rank forked from a process that had
# run an earlier group, the DTensor's mesh reported coordinate 0 on rank 1, so
# `distribute_tensor` handed rank 1 rank 0's rows, and `full_tensor` hung in a later test
# (torch 2.13, measured in this suite).


def _rows_per_rank(t: torch.Tensor) -> int:
    return -(-t.shape[0] // dist.get_world_size())


def _whole(t: DTensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (every rank takes part)."""
    local = t.to_local()
    rows = _rows_per_rank(t)
    padded = local.new_zeros((rows, *t.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat(pieces)[: t.shape[0]]


def _shard_like(p: DTensor, whole: torch.Tensor) -> DTensor:
    """This rank's rows of `whole`, laid out as FSDP2's parameter `p` (no communication)."""
    rows = _rows_per_rank(whole)
    local = whole[dist.get_rank() * rows :][: p.to_local().shape[0]].clone()
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
