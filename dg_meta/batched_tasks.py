"""The batched task engine: the E tasks of a meta-batch adapted and scored in one computation per layer.

Tasks are folded into the channel dimension. A stacked input ``[E, N, C, ...]`` (E tasks of N examples) becomes
``[N, E*C, ...]``; the network runs once, with every task's own (fast) weights stacked ``[E, ...]``:

- a convolution with per-task weights ``[E, O, C/g, k, k]`` is one convolution with ``groups = E*g``;
- batch norm with batch statistics (``track_running_stats=False``, MAML's transductive norm) over the ``E*C``
  channels normalises each task's channels with that task's own statistics, i.e. it is per-task batch norm, and
  it is PyTorch's native ``batch_norm`` (whose double backward is exact, unlike its ``vmap`` rule);
- a linear layer is a batched matrix product over tasks;
- parameter-free layers (ReLU, pooling, flattening) act per channel and need no change.

The output ``[N, E*K]`` is unfolded to ``[E, N, K]``. Each task's loss depends only on its own slice, so the
gradient of the summed task losses with respect to the stacked weights is every task's own gradient, and
differentiating through ``theta.expand(E, ...)`` sums the tasks' meta-gradients into ``theta``: the same
meta-gradient as the per-task loop (``dg_meta.functional.task_query_loss``), first or second order, any number
of inner steps (``tests/test_batched_tasks.py``: 1e-10 in float64). Tasks must have the same shapes
(``samplers.stack_episodes``). ``fold_network`` refuses layers it cannot fold.

Speed (``bench/maml_speed.py``, docs/benchmarks.md): on a GPU one folded computation replaces E small ones;
on a CPU the folded activations of many tasks fall out of the cache, and the task-parallel loop
(``dg_meta.task_threads``) is faster, so ``engine="auto"`` picks by device (``resolve_engine``).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.errors import UsageError
from dg_meta.functional import InnerLR, LossFn, Params, sgd_step

#: the task engines of the MAML family; "auto" is "batched" on CUDA and "threads" on the CPU
ENGINES = ("auto", "loop", "threads", "batched", "vmap")


def resolve_engine(engine: str, device: torch.device) -> str:
    """The engine ``engine`` means on ``device``: ``auto`` -> ``batched`` on CUDA, ``threads`` elsewhere."""
    if engine != "auto":
        return engine
    return "batched" if device.type == "cuda" else "threads"


class FoldedConv2d(nn.Module):
    """``nn.Conv2d`` with per-task weights ``[E, O, C/g, k, k]`` on task-folded inputs (``groups = E*g``)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise UsageError(f"the batched engine folds only zero-padded convolutions, not padding_mode="
                             f"'{conv.padding_mode}': choose hparam engine loop")
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        n_tasks = self.weight.shape[0]
        weight = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = None if self.bias is None else self.bias.reshape(-1)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups * n_tasks)


class FoldedBatchNorm(nn.Module):
    """Batch norm with batch statistics and per-task affine ``[E, C]`` on task-folded inputs."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.reshape(-1)
        bias = None if self.bias is None else self.bias.reshape(-1)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)


class FoldedLinear(nn.Module):
    """``nn.Linear`` with per-task weights ``[E, O, F]`` on task-folded features ``[N, E*F]``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        n_tasks, n_out, n_in = self.weight.shape
        if x.dim() != 2:
            raise UsageError(f"the batched engine folds linear layers on flat features only, got a "
                             f"{x.dim()}-d input: choose hparam engine loop")
        tasks = x.view(len(x), n_tasks, n_in).transpose(0, 1)
        out = torch.bmm(tasks, self.weight.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.transpose(0, 1).reshape(len(x), n_tasks * n_out)


def _folded_layer(name: str, module: nn.Module) -> nn.Module | None:
    """The folded replacement of ``module``, None if it needs none, or a ``UsageError``."""
    if type(module) is nn.Conv2d:
        return FoldedConv2d(module)
    if type(module) is nn.Linear:
        return FoldedLinear(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
        return FoldedBatchNorm(module)
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)):
        raise UsageError(f"the batched engine cannot fold {type(module).__name__} ('{name}'): only batch norm "
                         "with track_running_stats=False is per-task; choose hparam engine loop")
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise UsageError(f"the batched engine cannot fold {type(module).__name__} ('{name}'): it folds Conv2d, "
                         "Linear and batch norm with batch statistics; choose hparam engine loop")
    return None


def fold_network(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that runs E tasks folded into its channels (parameter names unchanged, values
    supplied stacked by ``batched_forward``). The network's own ``forward`` must treat dimension 1 as channels
    (as Conv-4 and MLPs built from these layers do)."""
    folded = copy.deepcopy(module)
    for name, child in list(folded.named_modules()):
        replacement = _folded_layer(name, child)
        if replacement is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        setattr(parent, attr, replacement)
    return folded


_FOLDED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def folded_copy(network: nn.Module) -> nn.Module:
    """``fold_network(network)``, built once per network (only its structure matters: the parameters are always
    supplied by ``batched_forward``)."""
    if network not in _FOLDED:
        _FOLDED[network] = fold_network(network)
    return _FOLDED[network]


def stack_params(params: Params, n_tasks: int) -> Params:
    """Every tensor repeated for ``n_tasks`` tasks as an expanded view ``[E, ...]`` (gradients sum back)."""
    return {k: v.unsqueeze(0).expand(n_tasks, *v.shape) for k, v in params.items()}


def batched_forward(folded: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Outputs ``[E, N, K]`` of the E tasks' inputs ``x`` ``[E, N, ...]`` with stacked ``params`` ``[E, ...]``;
    ``folded`` comes from ``fold_network``."""
    n_tasks, n = x.shape[:2]
    tasks_in_channels = x.transpose(0, 1).reshape(n, n_tasks * x.shape[2], *x.shape[3:])
    out = torch.func.functional_call(folded, params, (tasks_in_channels,))
    return out.view(n, n_tasks, -1).transpose(0, 1)


def task_losses(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """``[E]``: ``loss_fn`` (one task's ``(outputs, targets) -> scalar``) applied to each task."""
    return torch.func.vmap(loss_fn)(outputs, targets)


def batched_inner_loop(folded: nn.Module, params: Params, loss_fn: LossFn, x: Tensor, y: Tensor, steps: int,
                       lr: InnerLR, create_graph: bool) -> Params:
    """``steps`` SGD steps of every task on its own ``loss_fn(outputs, y)`` from stacked ``params``."""
    for _ in range(steps):
        params = sgd_step(params, task_losses(loss_fn, batched_forward(folded, params, x), y).sum(), lr,
                          create_graph)
    return params


def batched_query_losses(folded: nn.Module, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                         query_y: Tensor, steps: int, lr: InnerLR, first_order: bool,
                         inner_loss: LossFn = F.cross_entropy, outer_loss: LossFn = F.cross_entropy) -> Tensor:
    """``functional.task_query_loss`` for E stacked tasks at once: ``[E]`` query losses after ``steps`` inner
    SGD steps from the shared ``params`` (differentiable to them; second order unless ``first_order``)."""
    fast = batched_inner_loop(folded, stack_params(params, len(support_x)), inner_loss, support_x, support_y, steps,
                              lr, create_graph=not first_order)
    return task_losses(outer_loss, batched_forward(folded, fast, query_x), query_y)


def batched_predictor(folded: nn.Module, fast: Params, transform: Callable[[Tensor], Tensor]
                      ) -> Callable[[Tensor], Tensor]:
    """A predictor of ``[E, M, K]`` logits (``transform`` of the outputs) for E tasks' queries ``[E, M, ...]``."""
    fast = {k: v.detach() for k, v in fast.items()}

    def predict_queries(query_x: Tensor) -> Tensor:
        with torch.no_grad():
            return transform(batched_forward(folded, fast, query_x))

    return predict_queries
