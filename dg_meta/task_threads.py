"""The task-parallel loop: the tasks of a meta-batch run the per-task code on parallel CPU threads.

The per-task loop (``functional.task_query_loss`` on one task after another) keeps each task's activations in
the cache, but its small operations (a 5-image support set) use the intra-op threads poorly. Here the tasks are
dealt to as many worker threads as PyTorch has intra-op threads, each running one task at a time with one
intra-op thread (PyTorch releases the GIL inside its kernels and the autograd engine). Every worker has its own
copy of the network, because ``torch.func.functional_call`` swaps a module's parameters while it runs; the
copies' own parameters are never read, the caller passes the real ones.

Results come back in task order, so the caller reduces them in the loop's order: the gradients equal the loop's bit
for bit when the loop also runs on one intra-op thread, and to rounding otherwise (a kernel's reductions may split
differently over threads: measured 7e-7 on float32 Conv-4 meta-gradients). The per-task function must not draw
random numbers (the order of draws across threads is not fixed) and the network must hold no buffers (each copy
would have its own).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn

from dg_meta.errors import UsageError

Task = TypeVar("Task")
Result = TypeVar("Result")


class TaskThreads:
    """Runs ``fn(network_copy, task)`` over tasks on ``torch.get_num_threads()`` worker threads."""

    def __init__(self, network: nn.Module):
        if any(True for _ in network.buffers()):
            raise UsageError("the threads engine needs a network without buffers (each thread holds a copy); "
                             "choose hparam engine loop")
        self._network = weakref.ref(network)  # not a strong reference: threads_for's cache is keyed by it
        self._copies: list[nn.Module] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    @property
    def network(self) -> nn.Module:
        network = self._network()
        assert network is not None, "the network of these task threads was deleted"
        return network

    def _workers(self, n: int) -> list[nn.Module]:
        while len(self._copies) < n:
            self._copies.append(copy.deepcopy(self.network))
        for c in self._copies[:n]:
            c.train(self.network.training)
        return self._copies[:n]

    def map(self, fn: Callable[[nn.Module, Task], Result], tasks: Sequence[Task]) -> list[Result]:
        """``[fn(copy, task) for task in tasks]``, in task order, computed on parallel threads."""
        threads = torch.get_num_threads()
        n_workers = min(threads, len(tasks))
        if n_workers <= 1:
            return [fn(self.network, t) for t in tasks]
        copies = self._workers(n_workers)
        if self._pool is None or self._pool_size < n_workers:
            self._pool = ThreadPoolExecutor(n_workers, thread_name_prefix="dg-meta-task")
            self._pool_size = n_workers
        grad_enabled = torch.is_grad_enabled()

        def worker(w: int) -> list[tuple[int, Result]]:
            torch.set_num_threads(1)  # the OpenMP thread count is per thread: set it in the worker too
            with torch.set_grad_enabled(grad_enabled):
                return [(i, fn(copies[w], tasks[i])) for i in range(w, len(tasks), n_workers)]

        torch.set_num_threads(1)
        try:
            parts = list(self._pool.map(worker, range(n_workers)))
        finally:
            torch.set_num_threads(threads)
        ordered: list[Result | None] = [None] * len(tasks)
        for part in parts:
            for i, result in part:
                ordered[i] = result
        return ordered  # type: ignore[return-value]


_THREADS: weakref.WeakKeyDictionary[nn.Module, TaskThreads] = weakref.WeakKeyDictionary()


def threads_for(network: nn.Module) -> TaskThreads:
    """The ``TaskThreads`` of ``network``, built once per network."""
    if network not in _THREADS:
        _THREADS[network] = TaskThreads(network)
    return _THREADS[network]


def sum_in_order(per_task: Sequence[Sequence[torch.Tensor | None]]) -> list[torch.Tensor | None]:
    """Element-wise sums of the tasks' tensor lists, added in task order (the loop's accumulation order);
    ``None`` entries (unused parameters) are skipped."""
    totals: list[torch.Tensor | None] = [None] * len(per_task[0])
    for tensors in per_task:
        for i, t in enumerate(tensors):
            if t is not None:
                totals[i] = t if totals[i] is None else totals[i] + t
    return totals
