"""ADRMX: the networks and optimizers, the contrastive loss against an anchor-by-anchor re-implementation, the remix
draw, the discriminator/generator alternation, and five updates replayed with hand-written Adams."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.adrmx import ADRMX, remix_pairs, supcon_lambda_loss
from search_space import drawn
from torch import Tensor, nn
from torch.func import functional_call

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.registry import ALGORITHMS

GENERATOR = ("featurizer_label", "featurizer_domain", "classifier_label_1", "classifier_label_2", "classifier_domain")


def make(**overrides) -> ADRMX:
    torch.manual_seed(0)
    hparams = {**resolve(declared_hparams(ADRMX)), "mlp_width": 8, "mlp_depth": 3, **overrides}
    return ADRMX((3,), 4, 3, hparams).double()


def domain_batches(seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g))
            for _ in range(3)]


def reference_supcon(features: Tensor, y: Tensor, d: Tensor, lam: float = 0.5, temperature: float = 0.07) -> Tensor:
    """DomainBed's ``SupConLossLambda`` anchor by anchor: positives and negatives of the anchor's domain weigh
    ``lam``, of other domains ``1 - lam``; anchors without a positive are skipped and not counted."""
    f = features / features.norm(dim=1, keepdim=True)
    n = len(f)
    total, skipped = torch.zeros((), dtype=f.dtype), 0
    for i in range(n):
        def weighted(same_class: bool, same_domain: bool, i: int = i) -> list[Tensor]:
            w = lam if same_domain else 1 - lam
            return [w * torch.exp(f[i] @ f[j] / temperature) for j in range(n)
                    if j != i and (y[j] == y[i]) == same_class and (d[j] == d[i]) == same_domain]
        positives = weighted(True, True) + weighted(True, False)
        if not positives:
            skipped += 1
            continue
        denominator = sum(weighted(False, True) + weighted(False, False) + positives) + 1e-5
        total = total - sum(torch.log(e / denominator + 1e-5) for e in positives) / len(positives)
    return total / (n - skipped + 1)


def test_registered_with_domainbeds_defaults_and_search_space():
    assert ALGORITHMS["ADRMX"] is ADRMX
    hp = resolve(declared_hparams(ADRMX))
    expected = {"lr": 3e-3, "cnt_lambda": 1.0, "dclf_lambda": 1.0, "disc_lambda": 0.75, "rmxd_lambda": 1.0,
                "d_steps_per_g_step": 2, "beta1": 0.5, "mlp_width": 256, "mlp_depth": 9, "mlp_dropout": 0.0}
    assert {k: hp[k] for k in expected} == expected
    declared = declared_hparams(ADRMX)
    assert drawn(declared["lr"]) == {5e-4, 1e-3, 2e-3, 3e-3}
    assert drawn(declared["mlp_depth"]) == {8, 9, 10}
    for name in expected.keys() - {"lr", "mlp_depth"}:
        assert drawn(declared[name]) == {expected[name]}, name


def test_hparam_checks_accept_the_edges_and_refuse_what_is_outside():
    declared = declared_hparams(ADRMX)
    for name, good, bad in (("beta1", 0.0, 1.0), ("mlp_depth", 2, 1), ("mlp_dropout", 0.0, 1.0),
                            ("d_steps_per_g_step", 1, 0)):
        assert resolve(declared, 0, {name: good})[name] == good
        with pytest.raises(UsageError):
            resolve(declared, 0, {name: bad})


def test_networks_and_what_each_optimizer_holds():
    algorithm = make(weight_decay=0.1)
    linears = [(m.in_features, m.out_features) for m in algorithm.discriminator.modules() if isinstance(m, nn.Linear)]
    assert linears == [(8, 8), (8, 8), (8, 3)]
    for name, out in (("classifier_label_1", 4), ("classifier_label_2", 4), ("classifier_domain", 3)):
        head = [(m.in_features, m.out_features) for m in getattr(algorithm, name).modules() if isinstance(m, nn.Linear)]
        assert head == [(8, 4), (4, 2), (2, out)], name
    label, domain = algorithm.featurizer_label, algorithm.featurizer_domain
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(label.parameters(), domain.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(label.parameters(), domain.parameters()))
    generator = [p for name in GENERATOR for p in getattr(algorithm, name).parameters()]
    discriminator = list(algorithm.discriminator.parameters())
    for optimizer, params in ((algorithm.opt, generator), (algorithm.disc_opt, discriminator)):
        assert isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 1
        group = optimizer.param_groups[0]
        assert [id(p) for p in group["params"]] == [id(p) for p in params]
        assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.5, 0.9), 0)
    assert set(algorithm.optimizers()) == {"opt", "disc_opt"}
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(algorithm.predict(x), algorithm.classifier_label_1(label(x)))
    assert torch.equal(algorithm.embed(x), label(x))


@pytest.mark.parametrize("lam", [0.5, 0.2])
def test_contrastive_loss_matches_domainbeds_anchor_by_anchor_definition(lam):
    g = torch.Generator().manual_seed(2)
    features = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1, 2])  # class 3: one example, an anchor without positives
    d = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    expected = reference_supcon(features, y, d, lam)
    assert torch.allclose(supcon_lambda_loss(features, y, d, lam), expected, rtol=1e-12, atol=0)
    scaled = supcon_lambda_loss(3.0 * features, y, d, lam)  # the features are L2-normalised first
    assert torch.allclose(scaled, expected, rtol=1e-12, atol=0)
    hot = supcon_lambda_loss(features, y, d, lam, temperature=0.5)
    assert torch.allclose(hot, reference_supcon(features, y, d, lam, 0.5), rtol=1e-12, atol=0)


def test_remix_pairs_are_two_distinct_uniform_positions_below_each_class_count():
    y = torch.tensor([0, 3, 0, 1, 3, 0])  # counts 3, 1, 0, 2
    torch.manual_seed(0)
    seen: list[Counter] = [Counter() for _ in range(4)]
    for _ in range(2000):
        first, second, ok = remix_pairs(y, 4)
        assert ok.tolist() == [True, False, False, True]
        for c in (0, 3):
            seen[c][(int(first[c]), int(second[c]))] += 1
    assert set(seen[0]) == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert all(250 < n < 420 for n in seen[0].values())  # 333 +- 17 for each of 6 ordered pairs
    assert set(seen[3]) == {(0, 1), (1, 0)} and all(890 < n < 1110 for n in seen[3].values())  # 1000 +- 22


def test_remix_loss_sums_the_drawn_pairs_over_the_classes():
    algorithm = make()
    g = torch.Generator().manual_seed(4)
    invariant, domain_features = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 0, 1, 3, 0])
    state = torch.get_rng_state()
    first, second, _ = remix_pairs(y, 4)
    torch.set_rng_state(state)
    loss = algorithm.remix_loss(invariant, domain_features, y)
    head = algorithm.classifier_label_1
    expected = sum(F.cross_entropy(head(invariant[first[c]] + domain_features[second[c]]).unsqueeze(0),
                                   y[first[c]].unsqueeze(0)) for c in (0, 3)) / 4
    assert torch.allclose(loss, expected, rtol=0, atol=1e-12)
    assert algorithm.remix_loss(invariant[:1], domain_features[:1], y[:1]).item() == 0.0
    pair = algorithm.remix_loss(invariant[:2], domain_features[:2], torch.tensor([1, 1]))  # one pair, either order
    candidates = [F.cross_entropy(head(invariant[a] + domain_features[1 - a]).unsqueeze(0), torch.tensor([1])) / 4
                  for a in (0, 1)]
    assert any(torch.allclose(pair, c, rtol=0, atol=1e-12) for c in candidates)


def snapshot(algorithm: ADRMX) -> dict[str, list[Tensor]]:
    names = (*GENERATOR, "discriminator")
    return {name: [p.detach().clone() for p in getattr(algorithm, name).parameters()] for name in names}


@pytest.mark.parametrize("k, turns", [(2, "DGDDGD"), (1, "GDGDGD"), (3, "DDGDDD")])
def test_alternation_and_which_parameters_each_turn_moves(k, turns):
    algorithm = make(d_steps_per_g_step=k)
    for step, turn in enumerate(turns):
        before = snapshot(algorithm)
        losses = algorithm.update(domain_batches(step))
        after = snapshot(algorithm)
        moved = {name for name in before if not all(torch.equal(p, q) for p, q in zip(before[name], after[name]))}
        if turn == "D":
            assert set(losses) == {"loss_disc"} and moved == {"discriminator"}
        else:
            assert set(losses) == {"loss", "loss_disc", "loss_dmn", "loss_clf_int", "loss_cnt_int", "loss_clf_fin",
                                   "loss_cnt_final", "loss_remixed"}
            assert moved == set(GENERATOR)
    assert algorithm.update_count == len(turns)


def test_five_updates_replay_discriminator_and_generator_losses():
    weights = {"dclf_lambda": 0.6, "rmxd_lambda": 1.7, "cnt_lambda": 0.3, "disc_lambda": 0.9}
    algorithm = make(lr=0.01, beta1=0.3, **weights)
    copies = {name: copy.deepcopy(getattr(algorithm, name)) for name in (*GENERATOR, "discriminator")}
    names = {key: [n for n, _ in module.named_parameters()] for key, module in copies.items()}
    disc_adam = HandAdam(list(copies["discriminator"].parameters()), lr=0.01, betas=(0.3, 0.9))
    gen_adam = HandAdam([p for key in GENERATOR for p in copies[key].parameters()], lr=0.01, betas=(0.3, 0.9))
    sizes = [len(names[key]) for key in GENERATOR]

    def call(key: str, params: list[Tensor], x: Tensor) -> Tensor:
        return functional_call(copies[key], dict(zip(names[key], params)), (x,))

    for step in range(5):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        d = torch.arange(3).repeat_interleave(5)
        split = dict(zip(GENERATOR, torch.split(torch.arange(sum(sizes)), sizes)))
        gen = {key: [gen_adam.params[i] for i in split[key]] for key in GENERATOR}
        if step not in (1, 4):  # updates 1, 3, 4 train the discriminator; 2 and 5 the rest
            disc = [p.detach().requires_grad_() for p in disc_adam.params]
            z = (call("featurizer_label", gen["featurizer_label"], x)
                 - call("featurizer_domain", gen["featurizer_domain"], x))
            expected = {"loss_disc": F.cross_entropy(call("discriminator", disc, z.detach()), d)}
            disc_adam.step([g.detach() for g in torch.autograd.grad(expected["loss_disc"], disc)])
        else:
            params = [p.detach().requires_grad_() for p in gen_adam.params]
            gen = {key: [params[i] for i in split[key]] for key in GENERATOR}
            label = call("featurizer_label", gen["featurizer_label"], x)
            domain = call("featurizer_domain", gen["featurizer_domain"], x)
            z = label - domain
            state = torch.get_rng_state()
            first, second, ok = remix_pairs(y, 4)
            torch.set_rng_state(state)
            remixed = [call("classifier_label_1", gen["classifier_label_1"], z[first[c]] + domain[second[c]])
                       for c in range(4)]
            remix = [F.cross_entropy(remixed[c].unsqueeze(0), y[first[c]].unsqueeze(0)) for c in range(4) if ok[c]]
            expected = {
                "loss_disc": F.cross_entropy(call("discriminator", disc_adam.params, z), d),
                "loss_dmn": F.cross_entropy(call("classifier_domain", gen["classifier_domain"], domain), d),
                "loss_clf_int": F.cross_entropy(call("classifier_label_1", gen["classifier_label_1"], label), y),
                "loss_cnt_int": reference_supcon(label, y, d),
                "loss_clf_fin": F.cross_entropy(call("classifier_label_2", gen["classifier_label_2"], z), y),
                "loss_cnt_final": reference_supcon(z, y, d),
                "loss_remixed": sum(remix) / 4,
            }
            assert len(remix) >= 2
            expected["loss"] = (expected["loss_clf_int"] + expected["loss_clf_fin"] + 0.6 * expected["loss_dmn"]
                                + 1.7 * expected["loss_remixed"]
                                + 0.3 * (expected["loss_cnt_int"] + expected["loss_cnt_final"])
                                - 0.9 * expected["loss_disc"])
            gen_adam.step([g.detach() for g in torch.autograd.grad(expected["loss"], params)])
        losses = algorithm.update(batch)
        assert set(losses) == set(expected)
        for key, value in expected.items():
            assert torch.allclose(losses[key], value.detach(), rtol=0, atol=1e-12), key
        moved = [p for key in GENERATOR for p in getattr(algorithm, key).parameters()]
        for p, q in zip([*moved, *algorithm.discriminator.parameters()], [*gen_adam.params, *disc_adam.params],
                        strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_update_count_and_adam_states_are_checkpointed_so_a_resumed_run_continues_identically():
    algorithm = make()
    algorithm.update(domain_batches(0))  # update 1: discriminator turn
    state = copy.deepcopy(algorithm.checkpoint_state())
    resumed = make()
    resumed.load_checkpoint_state(state)
    assert resumed.update_count == 1
    for step in (1, 2):  # a generator turn, then a discriminator turn that needs the discriminator's Adam state
        torch.manual_seed(step)
        losses = algorithm.update(domain_batches(step))
        torch.manual_seed(step)
        assert set(resumed.update(domain_batches(step))) == set(losses)
        for p, q in zip(algorithm.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(p, q)
