"""LastShot (Ye, Ming, Zhan & Chao, TPAMI): ProtoNet distilled from a strong per-episode teacher."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from dg_meta.algorithms.protonet import ProtoNet
from torch import Tensor, nn

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import HParam, choice, log_uniform, positive, unit_interval
from dg_meta.init_from import load_matching, read_run_model, run_folder
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Cell, Episode
from dg_meta.support_heads import fit_logistic_regression

#: examples per class the logistic-regression teacher is fitted on (``randperm(...)[:50]`` in ``base.py``)
LOGREG_PER_CLASS = 50
TEACHER_HELP = ("set the hparam teacher_run to the folder of a finished pre-training run over all training "
                "classes, e.g. python -m dg_meta.train --algorithm FewShotPretrain --dataset DATASET --output-dir "
                "runs/pretrain, then --hparams '{\"teacher_run\": \"runs/pretrain\"}'")


@register_algorithm
class LastShot(ProtoNet):
    """Learning with A Strong Teacher for few-SHOT learning (Ye, Ming, Zhan & Chao, TPAMI), on ProtoNet.

    Follows the official code, github.com/Han-Jia/LastShot (``model/models/base.py``: ``FewShotModel``,
    ``model/trainer/fsl_trainer.py``: ``FSLTrainer``):

    - Teacher embedding ``f_T``: the featurizer of a finished run (hparam ``teacher_run``, a run folder), in
      that run's own architecture, frozen and always in eval mode (``FSLTrainer.__init__`` loads
      ``p_encoder`` from ``repo_init`` and sets ``requires_grad = False``; ``forward`` calls
      ``p_encoder.eval()``). The official teacher is the ``encoder`` of ``pretrain.py`` (cross-entropy over
      all training classes); here ``FewShotPretrain`` is that run (``ERM`` also works, with its own featurizer).
    - Student: ProtoNet's ``-||f(q) - c_k||^2`` divided by ``temperature`` (``ProtoNet._forward``, Euclidean
      branch), its ``featurizer`` initialised from the teacher run's ``featurizer.*`` weights when both are
      the same architecture (``prepare_model`` loads ``para_init``, by default the same file as
      ``repo_init``); a student of another architecture (e.g. Conv-4 under an ``ERM`` teacher's MNIST
      ConvNet) is not initialised, one line on stderr says so, and ``--init-from`` can initialise it.
    - Class repository: every training example of a class embedded once by ``f_T``; its centre is their
      mean (``FSLTrainer.__init__``: ``repo`` / ``repo_mean``).
    - NCM teacher (``teacher="ncm"``, official ``kd_type NN``, ``_kd_forward_ncm``): ``t_k(q) = f_T(q) .
      mu_k / ||mu_k||``, a dot product of the unnormalised query embedding with the L2-normalised centres.
    - LR teacher (``teacher="logreg"``, ``kd_type LR``, ``_kd_forward_lr``): multinomial logistic regression
      (sklearn's objective, ``C = kd_c``, unpenalised intercept) fitted on 50 random repository embeddings per
      class; its decision values ``W f_T(q) + b`` are the logits. Solved here with L-BFGS in float64.
    - Calibration (``ResidualScale``): ``s = A z + a + z``, ``A, a`` an ``nn.Linear(n_way, n_way)`` with
      PyTorch's default initialisation, applied to the student's logits ``z`` for the distillation term only.
    - Loss (``FSLTrainer.train``): ``(1 - b) T^2 KL(softmax(t / T) || softmax(s / T)) + b CE(z, y)``, the KL
      as ``F.kl_div``'s default ``reduction='mean'`` computes it (averaged over queries *and* classes, so
      ``1 / n_way`` of the per-query KL, although the official comment says ``batchmean``; we spell it as a
      sum over ``numel``, which newer PyTorch releases will keep meaning the same). Evaluation (``adapt``) uses the
      raw student logits ``z``: the teacher and the calibration are training-only (``FSLTrainer.evaluate``).

    Defaults are the official ones (``model/utils.py``): ``kd_balance`` 0, ``kd_temperature`` 1,
    ``temperature`` 64, ``kd_c`` 1; the teacher is used from the first step (``use_repo`` 1). Departures: the
    optimiser is ProtoNet's Adam (the official code uses SGD, Nesterov momentum 0.9, weight decay 5e-4 and a
    cosine schedule), episodes carry no data augmentation, and the official SVM teacher is not implemented.
    """

    HPARAMS = {
        "teacher_run": HParam("", None, lambda v: isinstance(v, str), "a run folder",
                              "finished run whose featurizer is the teacher (required)"),
        "teacher": HParam("ncm", choice(["ncm", "logreg"]), lambda v: v in ("ncm", "logreg"), "ncm or logreg",
                          "the strong classifier: nearest class mean or logistic regression"),
        "kd_balance": HParam(0.0, choice([0.0, 0.1, 0.5]), unit_interval, "in [0, 1]",
                             "b: weight of the cross-entropy against the distillation term"),
        "kd_temperature": HParam(1.0, choice([1.0, 4.0, 16.0]), positive, "positive", "T: distillation temperature"),
        "temperature": HParam(64.0, choice([1.0, 16.0, 64.0]), positive, "positive",
                              "the student's distances are divided by it"),
        "kd_c": HParam(1.0, log_uniform(-2, 2), positive, "positive", "C: inverse L2 strength of the LR teacher"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if not hparams["teacher_run"]:
            raise UsageError(f"LastShot needs a teacher: {TEACHER_HELP}")
        self.teacher, teacher_state = self._load_teacher(hparams["teacher_run"])
        student, teacher = type(self.featurizer).__name__, type(self.teacher).__name__
        if student == teacher:
            load_matching(self.featurizer, teacher_state)
        else:
            print(f"LastShot: the student ({student}) is not initialised from teacher_run {hparams['teacher_run']}: "
                  f"its featurizer is a {teacher}; pretrain the student's backbone (--algorithm FewShotPretrain) "
                  "to initialise both, or initialise the student with --init-from", file=sys.stderr)
        self.calibration = nn.Linear(hparams["n_way"], hparams["n_way"])
        self.optimizer.add_param_group({"params": list(self.calibration.parameters())})
        self.classes: dict[int, list[Cell]] = {}
        self.class_features: dict[int, Tensor] = {}

    data_parallel = "exact"  # ProtoNet's mean over episodes; the frozen teacher and its class centres per episode

    def data_parallel_refusal(self) -> str | None:
        if self.hparams["teacher"] == "logreg":
            return ("its logistic-regression teacher samples repository embeddings from the global RNG task "
                    "after task, so a process cannot draw its tasks' samples alone; use teacher ncm")
        return None

    def _load_teacher(self, run_dir: str) -> tuple[nn.Module, dict[str, Tensor]]:
        """The featurizer of the run in ``run_dir``, rebuilt in that run's architecture, frozen and in eval
        mode, and its state (names without ``featurizer.``)."""
        option = "LastShot hparam teacher_run"
        run = json.loads((run_folder(run_dir, option) / "args.json").read_text())["run"]
        cls = registry.get_algorithm(run["algorithm"])
        num_domains = len(registry.get_dataset(run["dataset"]).ENVIRONMENTS) - len(run["test_envs"])
        with torch.random.fork_rng(devices=[]):
            source = cls(self.input_shape, self.num_classes, num_domains, run["hparams"])
        teacher = getattr(source, "featurizer", None)
        if not isinstance(teacher, nn.Module):
            raise UsageError(f"{option} {run_dir}: a {run['algorithm']} run has no featurizer; {TEACHER_HELP}")
        prefix = "featurizer."
        state = {k[len(prefix):]: v for k, v in read_run_model(run_dir, option).items() if k.startswith(prefix)}
        _, missing = load_matching(teacher, state)
        if missing:
            raise UsageError(f"{option} {run_dir}: its featurizer does not fit this dataset's {self.input_shape} "
                             f"inputs ({missing[0]} absent or of another shape); {TEACHER_HELP}")
        return teacher.requires_grad_(False).eval(), state

    def train(self, mode: bool = True) -> LastShot:
        super().train(mode)
        self.teacher.eval()
        return self

    def set_training_classes(self, cells: list[Cell]) -> None:
        self.classes = {}
        for cell in cells:
            self.classes.setdefault(cell.class_id, []).append(cell)
        self.class_features = {}

    def _require_classes(self) -> None:
        if not self.classes:
            raise UsageError("LastShot needs the training classes: call set_training_classes(cells) first "
                             "(dg_meta.train does)")

    def episode_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
        """The student's raw logits ``z = -||z_q - c_k||^2 / temperature`` (training and evaluation)."""
        return super().episode_logits(support_z, support_y, query_z, n_way) / self.hparams["temperature"]

    def calibrate(self, logits: Tensor) -> Tensor:
        """``ResidualScale``: ``A z + a + z``, fed to the distillation term only."""
        return self.calibration(logits) + logits

    def embed_class(self, class_id: int) -> Tensor:
        """The teacher embedding of every training example of ``class_id`` (uncached)."""
        parts = []
        with torch.no_grad():
            for cell in self.classes[class_id]:
                for start in range(0, len(cell.indices), 256):
                    parts.append(self.teacher(cell.domain.fetch(cell.indices[start:start + 256])))
        return torch.cat(parts)

    def teacher_features(self, class_id: int) -> Tensor:
        """``embed_class(class_id)``, computed once per class and cached (the teacher is frozen)."""
        if class_id not in self.class_features:
            self.class_features[class_id] = self.embed_class(class_id)
        return self.class_features[class_id]

    def teacher_logits(self, episode: Episode) -> Tensor:
        """The strong classifier over the episode's global classes, applied to its queries."""
        self._require_classes()
        features = [self.teacher_features(int(c)) for c in episode.classes.tolist()]
        with torch.no_grad():
            query_t = self.teacher(episode.query_x)
        if self.hparams["teacher"] == "ncm":
            centres = F.normalize(torch.stack([f.mean(0) for f in features]), dim=1)
            return query_t @ centres.t()
        samples = [f[torch.randperm(len(f))[:LOGREG_PER_CLASS].to(f.device)] for f in features]
        weight, bias = fit_logistic_regression(torch.cat(samples), torch.cat(
            [torch.full((len(s),), k, device=s.device) for k, s in enumerate(samples)]), self.hparams["kd_c"])
        return (query_t.double() @ weight.t() + bias).to(query_t.dtype)

    def distillation_loss(self, logits: Tensor, teacher: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``(1 - b) T^2 KL(softmax(t/T) || softmax(calibrate(z)/T)) + b CE(z, y)`` and its two terms."""
        b, temp = self.hparams["kd_balance"], self.hparams["kd_temperature"]
        ce = F.cross_entropy(logits, y)
        kd = F.kl_div(F.log_softmax(self.calibrate(logits) / temp, 1), F.softmax(teacher / temp, 1),
                      reduction="sum") / logits.numel() * temp ** 2
        return {"loss": (1 - b) * kd + b * ce, "ce": ce, "kd": kd}

    def episode_loss(self, episode: Episode) -> dict[str, Tensor]:
        support_z, query_z = self.embed_episode(episode)
        logits = self.episode_logits(support_z, episode.support_y, query_z, episode.n_way)
        return self.distillation_loss(logits, self.teacher_logits(episode), episode.query_y)

