"""RFS (Tian et al., ECCV 2020): a cross-entropy embedding, optionally self-distilled, scored by logistic
regression on the L2-normalised support features."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from dg_meta.algorithms.fewshot_pretrain import FewShotPretrain
from torch import Tensor, nn

from dg_meta.algorithm import Losses
from dg_meta.errors import UsageError
from dg_meta.hparams import HParam, choice, log_uniform, non_negative, positive
from dg_meta.init_from import load_matching, read_run_model
from dg_meta.registry import register_algorithm
from dg_meta.support_heads import fit_logistic_regression

#: ``train_supervised.py`` / ``train_distillation.py``: ``--momentum`` 0.9
MOMENTUM = 0.9
#: ``eval/meta_eval.py``: ``LogisticRegression(penalty='l2', C=1.0, solver='lbfgs', multi_class='multinomial')``
LOGREG_C = 1.0
TEACHER_HELP = ("set the hparam teacher_run to the folder of a finished run of the previous generation with this "
                "run's network, e.g. python -m dg_meta.train --algorithm RFS --dataset DATASET --output-dir runs/gen0, "
                "then --hparams '{\"teacher_run\": \"runs/gen0\"}'")


def l2_normalise(z: Tensor) -> Tensor:
    """``z / ||z||`` row by row (``meta_eval.normalize``: no epsilon)."""
    return z / z.norm(dim=1, keepdim=True)


def distillation_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``DistillKL``: ``T^2 / B * sum_i KL(softmax(t_i / T) || softmax(s_i / T))`` over the ``B`` rows."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="sum") * temperature ** 2 / len(student)


@register_algorithm
class RFS(FewShotPretrain):
    """"Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?" (Tian, Wang, Krishnan,
    Tenenbaum & Isola, ECCV 2020). Official code: github.com/WangYueFt/rfs.

    - Embedding (``train_supervised.py``): the few-shot backbone ``f`` (hparam ``backbone``) and a linear head
      ``W`` over every training class minimise the cross-entropy ``CE(W f(x), y)`` of ordinary minibatches with
      SGD, lr 0.05, momentum 0.9, weight decay 5e-4 (its defaults ``--learning_rate``, ``--momentum``,
      ``--weight_decay``).
    - Self-distillation (``train_distillation.py``, ``--distill kd``): with hparam ``teacher_run`` (the run folder
      of the previous generation, whose ``network`` must be this run's architecture; its weights are loaded
      frozen and always in eval mode, as the official ``model_t.eval()`` outside the optimiser), a freshly
      initialised student of the same architecture minimises ``gamma * CE(s, y) + alpha * KL`` with student and
      teacher logits ``s, t`` of the same minibatch and ``KL = T^2 / B * sum_i KL(softmax(t_i / T) ||
      softmax(s_i / T))`` (``distill/criterion.py``: ``DistillKL``, ``size_average=False`` divided by the batch).
      ``gamma`` = ``-r``, ``alpha`` = ``-a`` = 0.5 as in the official born-again command (``scripts/run.sh``:
      ``-r 0.5 -a 0.5``; the file's defaults 1 and 0 would not distil), ``T`` = ``--kd_T`` = 4. The official
      ``-b`` weighs the other distillation losses, zero for ``kd``, and is not an hparam here. Without a teacher
      (generation 0) the loss is the plain cross-entropy.
    - Few-shot evaluation (``adapt``; ``eval/meta_eval.py``, ``meta_test`` with ``is_norm=True``,
      ``classifier='LR'``): the frozen features ``f(x)`` (the penultimate layer, ``use_logit=False``; the official
      ``eval_fewshot.py`` reports this and the logits as features) are L2-normalised, ``z / ||z||``, and a
      multinomial logistic regression with ``C = 1`` (``support_heads.fit_logistic_regression``, sklearn's
      objective) is fitted on the support set alone; its decision values ``W' z_q + b'`` are the query logits.

    Departures: the learning rate is constant (the official one drops 10x at epochs 60 and 80 of 100; the loop has
    no epochs); minibatches hold the dataset's ``batch_size`` examples of each training domain (the official
    loader draws 64 from the pooled classes), without the official augmentation, and the support set is not
    augmented (the official ``n_aug_support_samples`` 5); the logistic regression is solved to tighter tolerances
    than sklearn's (``fit_logistic_regression``).
    """

    HPARAMS = {
        "lr": HParam(0.05, log_uniform(-2, -1), positive, "positive", "SGD learning rate"),
        "weight_decay": HParam(5e-4, log_uniform(-6, -2), non_negative, "non-negative", "L2 penalty (SGD)"),
        "teacher_run": HParam("", None, lambda v: isinstance(v, str), "a run folder",
                              "run of the previous generation to distil (empty: generation 0, no distillation)"),
        "gamma": HParam(0.5, choice([0.5, 1.0]), non_negative, "non-negative",
                        "weight of the cross-entropy when distilling (official -r)"),
        "alpha": HParam(0.5, choice([0.5, 1.0]), non_negative, "non-negative",
                        "weight of the KL divergence to the teacher (official -a)"),
        "kd_temperature": HParam(4.0, choice([1.0, 4.0, 8.0]), positive, "positive",
                                 "T: distillation temperature (official --kd_T)"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.teacher = self._load_teacher(hparams["teacher_run"]) if hparams["teacher_run"] else None

    def build_optimizer(self) -> torch.optim.Optimizer:
        """SGD with momentum 0.9 over ``network`` (``lr``, ``weight_decay``)."""
        return torch.optim.SGD(self.network.parameters(), lr=self.hparams["lr"], momentum=MOMENTUM,
                               weight_decay=self.hparams["weight_decay"])

    def _load_teacher(self, run_dir: str) -> nn.Module:
        """A copy of ``network`` holding the ``network.*`` weights of the run in ``run_dir``, frozen, eval mode."""
        option = "RFS hparam teacher_run"
        prefix = "network."
        state = {k[len(prefix):]: v for k, v in read_run_model(run_dir, option).items() if k.startswith(prefix)}
        teacher = copy.deepcopy(self.network)
        _, missing = load_matching(teacher, state)
        if missing:
            raise UsageError(f"{option} {run_dir}: its network is not this run's ({prefix}{missing[0]} absent or of "
                             f"another shape); {TEACHER_HELP}")
        return teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> RFS:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        logits = self.network(x)
        ce = F.cross_entropy(logits, y)
        losses = {"loss": ce}
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            kd = distillation_kl(logits, teacher_logits, self.hparams["kd_temperature"])
            losses = {"loss": self.hparams["gamma"] * ce + self.hparams["alpha"] * kd, "ce": ce, "kd": kd}
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in losses.items()}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """Logistic regression fitted on the L2-normalised frozen support features only."""
        with torch.no_grad():
            support_z = l2_normalise(self.embed(support_x))
        weight, bias = fit_logistic_regression(support_z, support_y, LOGREG_C)

        def predict_query(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                query_z = l2_normalise(self.embed(query_x))
                return (query_z.double() @ weight.t() + bias).to(query_z.dtype)

        return predict_query
