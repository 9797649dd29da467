"""Every DomainBed algorithm is registered under DomainBed's name, listed by ``--help``, and trains through the
CLI on RotatedDigits to well above chance (10%) on its training domains' validation splits."""

from __future__ import annotations

import json

import pytest

from dg_meta import registry
from dg_meta.train import main

#: DomainBed's ``algorithms.ALGORITHMS`` (facebookresearch/DomainBed b93c22a) but ERM and MLDG (issue 13's list)
DOMAINBED_ALGORITHMS = [
    "IRM", "VREx", "GroupDRO", "Mixup", "CORAL", "MMD", "DANN", "CDANN", "MTL", "SagNet", "ARM", "RSC", "SD",
    "Fish", "Fishr", "ANDMask", "SANDMask", "IGA", "SelfReg", "TRM", "IB_ERM", "IB_IRM", "CAD", "CondCAD",
    "Transfer", "CausIRL_CORAL", "CausIRL_MMD", "EQRM", "RDM", "ADRMX", "URM", "ERMPlusPlus",
]
STEPS = 50
BATCH = 8  # per domain (RotatedDigits' default 16): half the compute of a step ...
NEED_DEFAULT_BATCH = {"DANN", "RSC", "ARM", "Transfer", "ADRMX"}  # ... except these, under 20% at batch 8
#: DomainBed's defaults that do not train in a few steps on RotatedDigits, replaced for this smoke test only (each
#: docstring says why): SANDMask's tau 1 zeroes its mask; MMD's weight 1 collapses the features (DomainBed's own
#: code does the same, measured); IGA's weight 1000 holds the loss at chance for 100 steps; CAD's bottleneck weight
#: 0.1 swamps the cross-entropy on unnormalised features (13.8% held out at 100 steps); ERM++ probes the head alone
#: for 500 steps and averages from step 600
OVERRIDES = {
    "SANDMask": {"tau": 0.5}, "MMD": {"mmd_gamma": 0.1}, "CausIRL_MMD": {"mmd_gamma": 0.1}, "IGA": {"penalty": 0.01},
    "CAD": {"lmbda": 0.01}, "CondCAD": {"lmbda": 0.01}, "ERMPlusPlus": {"linear_steps": 5, "sma_start_iter": 20},
}
#: slower starters: ARM's context network (trained, as in the paper) holds it at chance for 50 steps (52% held out
#: at 100); Transfer's second Adam step on the risk gap; ADRMX's featurizers move on one update in three
LONGER = {"ARM": 100, "Transfer": 100, "ADRMX": 100}
#: mean validation accuracy over the five training domains after STEPS steps must reach this: twice chance
FLOOR = 0.2


def test_every_domainbed_name_is_registered_and_listed_by_help(capsys):
    registry.discover()
    assert len(DOMAINBED_ALGORITHMS) == 32
    missing = [name for name in DOMAINBED_ALGORITHMS if name not in registry.algorithm_names()]
    assert missing == []
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in DOMAINBED_ALGORITHMS)


@pytest.mark.slow
@pytest.mark.parametrize("name", DOMAINBED_ALGORITHMS)
def test_trains_through_the_cli_well_above_chance(name, tmp_path):
    out = tmp_path / name
    batch = {} if name in NEED_DEFAULT_BATCH else {"batch_size": BATCH}
    hparams = ["--hparams", json.dumps({**batch, **OVERRIDES.get(name, {})})]
    steps = str(LONGER.get(name, STEPS))
    assert main(["--algorithm", name, "--dataset", "RotatedDigits", "--test-envs", "0", "--steps", steps,
                 "--checkpoint-freq", steps, "--output-dir", str(out), "--no-progress", *hparams]) == 0
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    val = [record[f"env{e}_out_acc"] for e in range(1, 6)]
    assert sum(val) / len(val) >= FLOOR, val
