"""One run on several processes with ``torch.distributed`` (data parallelism), launched by ``torchrun`` or Slurm.

Every process draws the same global batch from the same seeded sampler and keeps its shard: each training
domain's minibatch is cut into equal contiguous slices, one per rank (DG algorithms), and the meta-batch's
tasks are dealt in contiguous blocks (meta-learners). Each rank computes the gradients of its shard, and before
every ``optimizer.step()`` of the optimizers an algorithm names (``Algorithm.data_parallel_optimizers``) a step
pre-hook replaces each gradient by its mean over the ranks, so every rank takes the same step and ``update``
code is unchanged. With equal shards the mean over ranks of per-shard means is the minibatch mean, so the
averaged gradient is the single-process one (up to float summation order). Terms that couple the examples of a
minibatch (CORAL's covariances, MMD's kernels) see the whole minibatch through ``gather_rows``, an all-gather
whose backward sums the ranks' gradients, which the averaging turns back into the single-process gradient.

Algorithms declare how they are data-parallel (``Algorithm.data_parallel``, read from the class itself, never
inherited, because a subclass changes the loss): ``"exact"`` (per-example losses, or per-task losses of a
meta-batch) or ``"gather"`` (made exact with ``gather_rows``); anything else is refused with one line, and so
are networks that make shards differ from the minibatch (dropout, batch norm over a DG minibatch).

The process group is PyTorch's own (``init_process_group``: gloo on CPU, nccl on CUDA, one device per rank),
with a timeout (``$DG_META_DIST_TIMEOUT`` seconds, default 1800; rank 0 evaluates while the others wait in a
collective, so it must exceed an evaluation). Rank, world size and local rank come from torchrun (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) or from Slurm's ``srun`` (``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, the first host of the step's node list, a port from the job id).

A process that fails writes a one-line reason into the group's store before it exits; the others' next
collective fails (gloo: at once; otherwise at the timeout) or their launcher stops them (SIGTERM), and the
lowest surviving rank prints one line naming the process that failed, or that died without a word (kill -9).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dg_meta.errors import TrainingError, UsageError

if TYPE_CHECKING:
    from dg_meta.algorithm import Algorithm

DATA_PARALLEL_MODES = ("exact", "gather")
TIMEOUT_ENV = "DG_META_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
REPORT_GRACE_S = 3.0  # how long a survivor waits for the other processes' reports before naming the silent ones
_KEY = "dg_meta/{}/{}"


@dataclass(frozen=True)
class Environment:
    """Where this process stands in a launch: from torchrun's or Slurm's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None  # None: torchrun's own rendezvous (``env://``)
    master_port: int | None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[03-05,07],gpu1`` -> ``node03``), as ``scontrol show
    hostnames`` gives it; used when ``scontrol`` is not at hand."""
    match = re.match(r"([^,\[]+)(?:\[([^-,\]]+))?", nodelist)
    return "localhost" if match is None else match.group(1) + (match.group(2) or "")


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "localhost"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return first_host(nodes)


def environment() -> Environment | None:
    """The launch this process belongs to: torchrun (``RANK`` and ``WORLD_SIZE`` set; any world size) or a
    Slurm step of several tasks (``SLURM_STEP_NUM_TASKS`` > 1, so a one-task job stays single-process); None
    for a plain process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        if "TORCHELASTIC_RUN_ID" in env:  # torchrun: its store is the agent's; env:// reads the rest
            addr, port = None, None
        return Environment(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), addr,
                           None if port is None else int(port))
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if "SLURM_PROCID" in env and tasks > 1:
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return Environment(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)),
                           env.get("MASTER_ADDR") or _slurm_master(), port)
    return None


def timeout_s() -> float:
    """The process group's timeout: ``$DG_META_DIST_TIMEOUT`` seconds, default 1800."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


class PeerFailure(RuntimeError):
    """A collective failed: another process stopped, or did not answer within the timeout."""


class Terminated(BaseException):
    """SIGTERM while in a session: torchrun stopping the survivors of a failed process, or Slurm ending the job."""


@dataclass
class _Session:
    handles: list[Any] = field(default_factory=list)  # hooks to remove when the session ends


_session: _Session | None = None
_prints: bool | None = None  # the last session's decision: may this process print the run's lines?


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes of the run (1 outside a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that evaluates and writes the run's files (rank 0, or a plain process)."""
    return rank() == 0


def prints() -> bool:
    """Whether this process prints the run's messages: rank 0 (of the environment, before any session), or
    the process that a failed session chose to report the failure."""
    if _prints is not None:
        return _prints
    env = environment()
    return env is None or env.rank == 0


def _resolve_device(requested: str, env: Environment) -> torch.device:
    device = torch.device(requested)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {requested}: runs on several processes use cpu (gloo) or cuda (nccl)")
    if device.index is not None and env.world_size > 1:
        raise UsageError(f"--device {requested}: with {env.world_size} processes give --device cuda; each process "
                         "takes the GPU of its local rank")
    count = torch.cuda.device_count()
    if count == 0:
        raise UsageError(f"--device {requested}: process {env.rank} sees no GPU; use --device cpu")
    if count == 1:  # one GPU visible per task (CUDA_VISIBLE_DEVICES set by Slurm or the user)
        return torch.device("cuda", 0)
    if env.local_rank >= count:
        raise UsageError(f"process {env.rank} has local rank {env.local_rank} but sees only {count} GPUs: start at "
                         "most one process per GPU on each node")
    return torch.device("cuda", env.local_rank)


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"received {signal.Signals(signum).name}")


@contextmanager
def session(device: str, kept: Callable[[], str] = lambda: "") -> Iterator[str]:
    """Join the launch's process group (if launched by torchrun or a multi-task srun) for the body, and yield
    the device this process trains on (``cuda:LOCAL_RANK`` for ``cuda``). Outside a launch, or when the group
    already exists (a caller's), it yields ``device`` and leaves everything as it is.

    A failure inside the body is written to the group's store; a failed collective or a SIGTERM becomes one
    ``TrainingError`` line naming the process that failed (``kept()`` appended: what a re-run resumes from),
    printed (``prints``) by the lowest surviving rank only.
    """
    global _session, _prints
    env = environment()
    if env is None or _session is not None:
        yield device
        return
    if dist.is_initialized():
        _session = _Session()
        try:
            yield device
        finally:
            _close(_session)
            _session = None
        return
    resolved = _resolve_device(device, env)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    init_method = "env://" if env.master_addr is None else f"tcp://{env.master_addr}:{env.master_port}"
    try:
        dist.init_process_group(backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s()),
                                device_id=resolved if resolved.type == "cuda" else None)
    except RuntimeError as exc:  # an unreachable master, a port in use, a rendezvous that timed out
        where = "torchrun's rendezvous" if env.master_addr is None else f"{env.master_addr}:{env.master_port}"
        raise TrainingError(f"process {env.rank} of {env.world_size} could not join the run's process group at "
                            f"{where} ({' '.join(str(exc).split())[:200]})") from None
    _session = _Session()
    _prints = env.rank == 0
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    previous = signal.SIG_DFL if previous is None else previous  # a handler installed outside Python
    try:
        yield str(resolved)
        _collective(dist.barrier)  # nobody reports success before rank 0 has written everything
    except (PeerFailure, Terminated) as exc:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's next SIGTERM must not cut the report
        line, _prints = _peer_failure_line(env, exc)
        raise TrainingError(f"{line}; {kept()}".rstrip("; ")) from None
    except BaseException as exc:
        _report_own_failure(env, exc)
        raise
    else:
        dist.destroy_process_group()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        _close(_session)
        _session = None


def _close(current: _Session) -> None:
    for handle in current.handles:
        handle.remove()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UsageError | TrainingError) else f"{type(exc).__name__}: {text}"[:300]


def _report_own_failure(env: Environment, exc: BaseException) -> None:
    """Write this process's failure into the store, so that the survivors can name it."""
    try:
        _store().set(_KEY.format("failed", env.rank), _one_line(exc))
    except Exception:  # the store's host (rank 0 under srun) may be gone: nothing more to tell
        pass


def _peer_failure_line(env: Environment, cause: BaseException) -> tuple[str, bool]:
    """The line naming the processes that failed or died, and whether this process prints it."""
    world = env.world_size
    try:
        store = _store()
        store.set(_KEY.format("survived", env.rank), type(cause).__name__)
        deadline = time.monotonic() + REPORT_GRACE_S
        while True:
            failed = {r: store.get(_KEY.format("failed", r)).decode() for r in range(world)
                      if store.check([_KEY.format("failed", r)])}
            survived = {r for r in range(world) if store.check([_KEY.format("survived", r)])}
            if len(failed) + len(survived) >= world or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception:  # under srun rank 0 hosts the store: its loss leaves nobody to ask
        return (f"process 0 of {world} (the host of the rendezvous store) stopped: the run ends", env.rank == 1)
    silent = [r for r in range(world) if r not in failed and r not in survived]
    survivors = sorted(survived)
    reporter = bool(survivors) and env.rank == survivors[0] and 0 not in failed  # rank 0 printed its own error
    if failed:
        first = min(failed)
        line = f"process {first} of {world} failed ({failed[first]}): the run ends"
    elif silent:
        names = ", ".join(map(str, silent))
        how = (f"did not answer within the {timeout_s():g} s timeout (${TIMEOUT_ENV}): stuck, or dead"
               if "timeout" in str(cause).lower() or "timed out" in str(cause).lower() else
               "died without reporting an error (killed: kill -9, the out-of-memory killer or a lost node)")
        line = f"process {names} of {world} {how}: the run ends"
    else:
        line = f"every process was stopped by its launcher ({cause}): the run ends"
    return line, reporter


def _collective(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return op(*args, **kwargs)
    except RuntimeError as exc:
        raise PeerFailure(" ".join(str(exc).split())[:300]) from exc


def barrier() -> None:
    """Wait for every process (no-op outside a process group)."""
    if world_size() > 1:
        _collective(dist.barrier)


def from_main(compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0, its (picklable) result sent to every rank; the others wait meanwhile."""
    if not dist.is_initialized():
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    _collective(dist.broadcast_object_list, box, src=0)
    return box[0]


def shard(n: int, what: str) -> slice:
    """This rank's contiguous share of ``n`` items (the whole range outside a process group); ``n`` must be a
    multiple of the world size (``what`` names the items in the one-line refusal)."""
    world = world_size()
    if n % world:
        raise UsageError(f"{what} ({n}) is not a multiple of the {world} processes: every process needs an equal "
                         f"share; change it or the number of processes")
    size = n // world
    return slice(rank() * size, (rank() + 1) * size)


def mean_(tensors: list[Tensor]) -> list[Tensor]:
    """Replace each tensor (in place) by its mean over the processes; returns them."""
    world = world_size()
    if world == 1:
        return tensors
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        _collective(dist.all_reduce, flat)
        flat /= world
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))
    return tensors


def mean_losses(losses: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The losses of one step averaged over the processes (one collective), so logs and the non-finite check
    see the global means on every rank; unchanged outside a process group."""
    if world_size() == 1 or not losses:
        return losses
    values = torch.stack([v.detach().to(device, torch.float64).reshape(()) if isinstance(v, Tensor)
                          else torch.tensor(float(v), dtype=torch.float64, device=device) for v in losses.values()])
    mean_([values])
    return {k: mean.to(v.dtype) if isinstance(v, Tensor) else float(mean)
            for (k, v), mean in zip(losses.items(), values.unbind())}


def update(algorithm: Algorithm, batch: Any, device: torch.device) -> dict[str, Any]:
    """``algorithm.update(batch)`` on this process's share of the batch, then what keeps the processes one
    model: batch-norm running statistics merged (``merge_running_statistics``) and the losses averaged
    (``mean_losses``). Exactly ``algorithm.update(batch)`` on one process."""
    if world_size() == 1:
        return algorithm.update(batch)
    before = _running_statistics(algorithm)
    losses = algorithm.update(batch)
    merge_running_statistics(before)
    return mean_losses(losses, device)


_Statistics = list[tuple[nn.modules.batchnorm._BatchNorm, Tensor, Tensor, Tensor]]


def _running_statistics(model: nn.Module) -> _Statistics:
    return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            and m.track_running_stats and m.running_mean is not None]


def merge_running_statistics(before: _Statistics) -> None:
    """Give every batch norm the running statistics a single process would have after the whole batch.

    A single process updates ``R <- a R + m s_t`` (``a = 1 - momentum``) once per forward, task after task; rank
    ``k`` of ``W`` did the ``n`` updates of its block of tasks from the same ``R_0``, reaching ``R_k``. The
    single-process value is ``a^(W n) R_0 + sum_k a^((W - 1 - k) n) (R_k - a^n R_0)``: one all-reduce of the
    ranks' terms (``n`` must be the same on every rank: the same forwards per task)."""
    world, me = world_size(), rank()
    terms, starts = [], []
    for module, mean0, var0, count0 in before:
        n = (module.num_batches_tracked - count0).to(mean0.dtype)
        a = torch.as_tensor(1.0 - module.momentum, dtype=mean0.dtype, device=mean0.device)
        decay, own_weight = a.pow(n), a.pow((world - 1 - me) * n)
        terms += [own_weight * (module.running_mean - decay * mean0), own_weight * (module.running_var - decay * var0)]
        starts += [a.pow(world * n) * mean0, a.pow(world * n) * var0]
    if not terms:
        return
    mean_(terms)  # the mean over ranks: times world is the sum
    for (module, _, _, count0), start_mean, start_var, term_mean, term_var in zip(
            before, starts[0::2], starts[1::2], terms[0::2], terms[1::2]):
        module.running_mean.copy_(start_mean + world * term_mean)
        module.running_var.copy_(start_var + world * term_var)
        module.num_batches_tracked.copy_(count0 + world * (module.num_batches_tracked - count0))


def _buckets(tensors: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def average_gradients(params: list[Tensor]) -> None:
    """Replace the ``.grad`` of ``params`` by its mean over the processes, one collective per dtype and device.

    A parameter without a gradient on some process counts as a zero gradient there; one without a gradient on
    every process keeps none (an optimizer then skips it, as in a single process). A presence count travels
    in the same buffer, so this costs one all-reduce (and, on CUDA, one read-back of the counts)."""
    world = world_size()
    if world == 1:
        return
    for bucket in _buckets(params):
        present = torch.tensor([p.grad is not None for p in bucket], dtype=bucket[0].dtype, device=bucket[0].device)
        flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in bucket] + [present])
        _collective(dist.all_reduce, flat)
        parts = flat.split([p.numel() for p in bucket] + [len(bucket)])
        for p, part, count in zip(bucket, parts, parts[-1].tolist()):
            if count == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = (part / world).view_as(p).clone()
            else:
                p.grad.copy_(part.view_as(p)).div_(world)


def synchronize_optimizers(algorithm: Algorithm) -> Any:
    """Average the gradients before every step of ``algorithm.data_parallel_optimizers()`` (looked up at each
    step, so a rebuilt optimizer is covered), through a global optimizer step pre-hook; returns its handle (the
    session removes it when it ends)."""
    owner = weakref.ref(algorithm)

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        current = owner()
        if current is not None and any(o is optimizer for o in current.data_parallel_optimizers().values()):
            average_gradients([p for group in optimizer.param_groups for p in group["params"]])

    handle = register_optimizer_step_pre_hook(hook)
    if _session is not None:
        _session.handles.append(handle)
    return handle


class _GatherRows(torch.autograd.Function):
    """All-gather along dimension 0; the backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        _collective(dist.all_gather, parts, x)
        ctx.rows = len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        _collective(dist.all_reduce, grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_rows(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated along dimension 0 in rank order (the whole minibatch when ``x`` is this
    rank's shard), differentiable: each rank computing a loss ``P`` of the result and averaging the gradients
    (``average_gradients``) gives the gradient of ``P`` on the minibatch. ``x`` itself outside a group."""
    if world_size() == 1:
        return x
    return _GatherRows.apply(x)


def declared_mode(algorithm_cls: type) -> str | None:
    """The class's own ``data_parallel`` declaration (not inherited): ``"exact"``, ``"gather"`` or None."""
    mode = algorithm_cls.__dict__.get("data_parallel")
    return mode if mode in DATA_PARALLEL_MODES else None


def _network_refusal(algorithm: nn.Module, episodic: bool) -> str | None:
    for name, module in algorithm.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            return (f"its network draws dropout masks ({name}, p={module.p:g}): each process would draw its own, "
                    "not the single-process ones; set that dropout to 0")
        if not (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training):
            continue
        if not episodic:
            return (f"its network normalises with minibatch statistics ({name}, {type(module).__name__}): a shard's "
                    "statistics are not the minibatch's")
        if module.track_running_stats and module.momentum is None:
            return (f"its batch norm {name} keeps a cumulative average (momentum None), which the processes' "
                    "running statistics cannot be merged into; give it a momentum")
    return None


def check_data_parallel(algorithm: Algorithm, batch_sizes: list[int]) -> None:
    """Refuse, with one line, a run that several processes would not compute as one: an algorithm that declares
    no data-parallel form, one whose hparams or network make shards differ from the minibatch, or batches that
    do not split into equal shares. ``batch_sizes``: every training domain's minibatch size, or the meta-batch
    size (one entry). No-op on one process."""
    world = world_size()
    if world == 1:
        return
    name = type(algorithm).__name__
    episodic = algorithm.batch_kind == "episodes"
    reason = None
    if declared_mode(type(algorithm)) is None:
        reason = ("it declares no data-parallel form (its loss may couple the examples of a minibatch through "
                  "batch statistics, group weights or random draws; docs/distributed.md lists the algorithms that "
                  "are data-parallel)")
    reason = reason or algorithm.data_parallel_refusal() or _network_refusal(algorithm, episodic)
    if reason:
        raise UsageError(f"{name} cannot train on {world} processes: {reason}; run it on one process")
    what = "hparam meta_batch_size" if episodic else "every training domain's minibatch (hparam batch_size)"
    for n in batch_sizes:
        shard(n, what)
