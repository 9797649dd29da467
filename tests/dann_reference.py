"""An independent replay of DomainBed's ``AbstractDANN.update`` (DANN and CDANN) for tests: hand-written forward
passes of the tiny two-layer MLPs, the input-gradient penalty in closed form, HandAdam with L2 weight decay."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from torch import Tensor


def mlp2(params: list[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """A depth-2 ReLU MLP ``W2 relu(W1 x + b1) + b2``: returns (output, hidden pre-activation)."""
    w1, b1, w2, b2 = params
    hidden = x @ w1.t() + b1
    return hidden.relu() @ w2.t() + b2, hidden


def closed_form_penalty(logits: Tensor, hidden: Tensor, domains: Tensor, disc: list[Tensor]) -> Tensor:
    """``mean_i ||d sum_j CE_j / d u_i||^2`` for the depth-2 discriminator: the input gradient of ``CE_i`` is
    ``W1^T (relu'(h_i) * W2^T (softmax(l_i) - e_{d_i}))``."""
    w1, _, w2, _ = disc
    residual = logits.softmax(1) - F.one_hot(domains, logits.shape[1]).to(logits.dtype)
    grad_u = ((residual @ w2) * (hidden > 0).to(logits.dtype)) @ w1
    return grad_u.pow(2).sum(1).mean()


class DANNReference:
    """Featurizer (4 tensors), classifier (2) and discriminator (4, plus the class embedding when
    ``conditional``) as plain tensors, updated by HandAdam exactly as the docstring of ``DANN`` says."""

    def __init__(self, algorithm, conditional: bool):
        hp = algorithm.hparams
        self.hp, self.conditional = hp, conditional
        gen = [*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()]
        disc = list(algorithm.discriminator.parameters())
        if conditional:
            disc.append(algorithm.class_embeddings.weight)
        betas = (hp["beta1"], 0.9)
        self.gen = HandAdam(gen, lr=hp["lr_g"], betas=betas)
        self.disc = HandAdam(disc, lr=hp["lr_d"], betas=betas)
        self.count = 0

    def losses(self, gen: list[Tensor], disc: list[Tensor], batch) -> dict[str, Tensor]:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        domains = torch.cat([torch.full((len(x_d),), d) for d, (x_d, _) in enumerate(batch)])
        z, _ = mlp2(gen[:4], x)
        u = z + disc[4][y] if self.conditional else z
        logits, hidden = mlp2(disc[:4], u)
        ce = -logits.log_softmax(1)[torch.arange(len(y)), domains]
        if self.conditional:
            counts = torch.bincount(y)
            domain_loss = (ce / (counts[y] * len(counts))).sum()
        else:
            domain_loss = ce.mean()
        penalty = closed_form_penalty(logits, hidden, domains, disc[:4])
        disc_loss = domain_loss + self.hp["grad_penalty"] * penalty
        class_loss = F.cross_entropy(z @ gen[4].t() + gen[5], y)
        return {"disc_loss": disc_loss, "class_loss": class_loss,
                "gen_loss": class_loss - self.hp["lambda"] * disc_loss, "grad_penalty": penalty}

    def step(self, batch) -> tuple[dict[str, Tensor], bool]:
        """One update; returns its losses and whether it was a discriminator step."""
        self.count += 1
        d_steps = self.hp["d_steps_per_g_step"]
        disc_turn = self.count % (1 + d_steps) < d_steps
        gen = [p.clone().requires_grad_() for p in self.gen.params]
        disc = [p.clone().requires_grad_() for p in self.disc.params]
        losses = self.losses(gen, disc, batch)
        if disc_turn:
            grads = torch.autograd.grad(losses["disc_loss"], disc)
            self.disc.step([g + self.hp["weight_decay_d"] * p for g, p in zip(grads, self.disc.params)])
        else:
            grads = torch.autograd.grad(losses["gen_loss"], gen)
            self.gen.step([g + self.hp["weight_decay_g"] * p for g, p in zip(grads, self.gen.params)])
        return {k: v.detach() for k, v in losses.items()}, disc_turn
