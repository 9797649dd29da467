"""SWAD (dg_meta/swad.py and ``--swad``): the averages are means of what they say they average, the loss-valley
rule is the official one, batch norms are recomputed, and a resumed SWAD run equals an uninterrupted one."""

from __future__ import annotations

import json
from collections import deque

import pytest
import torch
from torch import nn

import dg_meta.train as train_module
from dg_meta.swad import SWAD, LossValley
from dg_meta.train import parse_args, resolve_run, train
from dg_meta.weight_averaging import ParameterAverage, update_bn


def segment(value: float, start: int, end: int, loss: float) -> ParameterAverage:
    s = ParameterAverage()
    s.add([torch.tensor([value])], start, end)
    s.end_loss = loss
    return s


class OfficialLossValley:
    """khanrc/swad ``domainbed/swad.py`` ``LossValley`` transcribed over (value, start, end, loss) tuples, with
    ``AveragedModel``'s running mean: the test's independent oracle."""

    def __init__(self, n_converge=3, n_tolerance=6, tolerance_ratio=0.3):
        self.nc, self.nt, self.ratio = n_converge, n_tolerance, tolerance_ratio
        self.cq, self.sq = deque(maxlen=n_converge), deque(maxlen=n_tolerance)
        self.final, self.converge_step, self.dead = None, None, False

    @staticmethod
    def add(avg, seg):
        value, n, start, end = avg
        value = seg[0] if n == 0 else value + (seg[0] - value) / (n + 1)
        return (value, n + 1, seg[1] if n == 0 else start, seg[2])

    def update(self, seg):
        if self.dead:
            return
        self.cq.append(seg)
        self.sq.append(seg)
        if self.converge_step is None:
            if len(self.cq) < self.nc:
                return
            losses = [s[3] for s in self.cq]
            if losses.index(min(losses)) == 0:
                self.converge_step = self.cq[0][2]
                self.final = (self.cq[0][0], 0, -1, -1)
                self.th = sum(losses) / len(losses) * (1 + self.ratio)
                q = list(self.sq)[: self.nt - self.nc + 1]
                start = 0
                for i in reversed(range(len(q))):
                    if q[i][3] > self.th:
                        start = i + 1
                        break
                for s in q[start + 1:]:
                    self.final = self.add(self.final, s)
            return
        if self.sq[0][2] < self.converge_step:
            return
        if min(s[3] for s in self.sq) > self.th:
            self.dead = True
            return
        self.final = self.add(self.final, self.sq[0])

    def result(self):
        if self.converge_step is None:
            return (self.cq[-1][0], 1, self.cq[-1][1], self.cq[-1][2])
        final = self.final
        if not self.dead:
            rest = list(self.sq)[1:]
            while rest and min(s[3] for s in rest) <= self.th:
                final = self.add(final, rest.pop(0))
        return final


LOSS_CURVES = {
    "converges early, valley never dies": [3.0, 2.0, 2.5, 2.6, 2.1, 2.2, 2.4, 2.3],
    "converges late, valley dies": [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 3.5, 3.2, 3.3, 3.4, 3.6, 9.0, 9.5, 9.9, 9.7,
                                    9.8, 9.6, 9.9],
    "valley ends before the run": [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 3.5, 3.2, 3.3, 3.4, 3.6, 6.0, 6.5],
    "never converges": [5.0, 4.0, 3.0, 2.0, 1.0],
}


@pytest.mark.parametrize("curve", LOSS_CURVES)
def test_loss_valley_selects_what_the_official_rule_selects(curve):
    ours, official = LossValley(), OfficialLossValley()
    for i, loss in enumerate(LOSS_CURVES[curve]):
        value = float(i * i)  # a different "weight" per segment
        ours.observe(segment(value, 10 * i + 1, 10 * i + 10, loss))
        official.update((value, 10 * i + 1, 10 * i + 10, loss))
        assert ours.dead_valley == official.dead
    got, want = ours.final_average(), official.result()
    assert torch.allclose(got.mean[0], torch.tensor([want[0]]), rtol=1e-6)
    assert (got.start_step, got.end_step) == (want[2], want[3])
    again = ours.final_average()  # the selection is read, not consumed
    assert torch.equal(again.mean[0], got.mean[0])


def test_the_hand_worked_curve():
    # losses 3, 2, 2.5: the oldest of the last three is not the minimum; then 2, 2.5, 2.6: it is, so the run has
    # converged at the segment of loss 2 (steps 11-20); threshold 1.3 * mean(2, 2.5, 2.6); the window
    # smooth_q[:n_tolerance - n_converge + 1] holds segments 0..3, none above the threshold, so segments 1, 2
    # and 3 join (one past index 0): mean of the values 1, 2, 3; a later head of smooth_q older than step 20
    # (segment 0) does not join
    valley = LossValley()
    for i, loss in enumerate([3.0, 2.0, 2.5, 2.6, 2.1]):
        valley.observe(segment(float(i), 10 * i + 1, 10 * i + 10, loss))
    assert valley.converge_step == 20 and valley.threshold == pytest.approx(1.3 * 7.1 / 3)
    assert valley.final.n == 3 and valley.final.mean[0].item() == pytest.approx(2.0)
    assert (valley.final.start_step, valley.final.end_step) == (11, 40)
    final = valley.final_average()  # at the end, segments 1..4 after the head still lie under the threshold
    assert final.n == 7 and final.end_step == 50


def test_segment_average_is_the_mean_of_the_snapshots_and_the_model_copy_carries_it():
    model = nn.Linear(2, 1)
    swad = SWAD(model)
    snapshots = []
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step))
        snapshots.append([p.detach().clone() for p in model.parameters()])
        swad.update(step)
    for m, *values in zip(swad.segment.mean, *snapshots):
        assert torch.allclose(m, torch.stack(values).mean(0))
    swad.close_segment(1.0)
    averaged, average = swad.averaged_model()
    assert (average.start_step, average.end_step) == (1, 4)
    for p, *values in zip(averaged.parameters(), *snapshots):
        assert torch.allclose(p, torch.stack(values).mean(0))
    assert averaged is not model


def test_update_bn_recomputes_running_statistics_as_the_plain_mean():
    net = nn.Sequential(nn.BatchNorm1d(2))
    net[0].running_mean.fill_(100.0)
    batches = iter([torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])])
    net.eval()
    update_bn(net, net, batches, steps=2)
    assert torch.allclose(net[0].running_mean, torch.tensor([4.0, 5.0]))
    assert net[0].momentum == 0.1 and not net.training


def swad_run(*extra: str) -> dict:
    return resolve_run(parse_args(["--algorithm", "ERM", "--steps", "30", "--checkpoint-freq", "5", "--test-envs",
                                   "0", "--swad", "--hparams", '{"lr": 0.02, "batch_size": 4}', *extra]))


class Crash(Exception):
    pass


def test_swad_run_ends_with_the_averaged_models_record_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    run = swad_run()
    train(run, "data", tmp_path / "straight", "cpu", progress=False)
    straight = [json.loads(line) for line in (tmp_path / "straight" / "results.jsonl").read_text().splitlines()]
    assert straight[-1]["swad"] and all("train_out_loss" in r for r in straight)
    assert not any(r.get("swad") for r in straight[:-1]) and straight[-1]["args"]["swad"]
    saves = []
    original = train_module.atomic_torch_save

    def crash_on_third(path, obj):
        original(path, obj)
        saves.append(path)
        if len(saves) == 3:
            raise Crash

    monkeypatch.setattr(train_module, "atomic_torch_save", crash_on_third)
    with pytest.raises(Crash):
        train(run, "data", tmp_path / "resumed", "cpu", progress=False)
    monkeypatch.setattr(train_module, "atomic_torch_save", original)
    train(run, "data", tmp_path / "resumed", "cpu", progress=False)
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "results.jsonl").read_text().splitlines()]
    timing = ("step_time", "eval_time")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in straight]


def test_swad_is_refused_for_episodic_algorithms_and_without_out_splits():
    with pytest.raises(train_module.UsageError, match="--swad averages the weights of DG algorithms"):
        resolve_run(parse_args(["--algorithm", "MAML", "--swad"]))
    with pytest.raises(train_module.UsageError, match="--swad needs the training domains' out splits"):
        swad_run("--holdout-fraction", "0")
