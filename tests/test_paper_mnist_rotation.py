"""The papers' MNIST-rotation networks (hparam ``featurizer``), the 16x16 protocol (``image_size``) and
bench/paper_mnist_rotation.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_cli
from dg_meta.datasets.mnist import load_mnist
from dg_meta.datasets.mnist_rotation1k import MNISTRotation1k, balanced_subset
from dg_meta.datasets.rotation import ANGLES, rotated

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.networks import CrossGradLeNet, MNISTConvNet, MTAEEncoder, featurizer_for


def _bench():
    spec = importlib.util.spec_from_file_location("paper_mnist_rotation", REPO / "bench" / "paper_mnist_rotation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("side, flat", [(16, 128 * 2 * 2), (28, 128 * 3 * 3), (32, 128 * 4 * 4)])
def test_crossgrad_lenet_has_the_official_layer_sizes(side, flat):
    net = CrossGradLeNet((1, side, side))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (5, 5), (2, 2)), (32, 64, (5, 5), (2, 2)), (64, 128, (5, 5), (2, 2))]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(flat, 128), (128, 64)]
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == [0.5]
    assert net(torch.rand(3, 1, side, side)).shape == (3, 64) and net.n_outputs == 64


def test_crossgrad_lenet_computes_conv_relu_pool_then_two_relu_layers():
    torch.manual_seed(0)
    net = CrossGradLeNet((1, 16, 16)).eval()
    x = torch.rand(4, 1, 16, 16)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    fc3, fc1 = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    h = x
    for conv in convs:
        h = F.max_pool2d(F.relu(F.conv2d(h, conv.weight, conv.bias, padding=2)), 2)
    h = F.relu(F.linear(F.relu(F.linear(h.flatten(1), fc3.weight, fc3.bias)), fc1.weight, fc1.bias))
    torch.testing.assert_close(net(x), h)
    net.train()
    assert not torch.equal(net(x), net(x))  # dropout is active in training


def test_mtae_encoder_is_one_sigmoid_layer_of_500_units():
    torch.manual_seed(0)
    net = MTAEEncoder((1, 16, 16))
    (linear,) = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert (linear.in_features, linear.out_features, net.n_outputs) == (256, 500, 500)
    x = torch.rand(5, 1, 16, 16)
    torch.testing.assert_close(net(x), torch.sigmoid(x.reshape(5, 256) @ linear.weight.T + linear.bias))


def test_featurizer_hparam_picks_the_network():
    shape = (1, 16, 16)
    assert isinstance(featurizer_for(shape, {}), MNISTConvNet)
    assert isinstance(featurizer_for(shape, {"featurizer": "domainbed"}), MNISTConvNet)
    assert isinstance(featurizer_for(shape, {"featurizer": "crossgrad_lenet"}), CrossGradLeNet)
    assert isinstance(featurizer_for(shape, {"featurizer": "mtae_mlp"}), MTAEEncoder)
    irm = featurizer_for((2, 14, 14), {"featurizer": "irm_mlp", "hidden_dim": 7})
    linears = [m for m in irm.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(392, 7), (7, 7)] and irm.n_outputs == 7
    assert all(torch.equal(m.bias, torch.zeros(7)) for m in linears)
    x = torch.rand(3, 2, 14, 14)
    expected = torch.relu(torch.relu(x.reshape(3, 392) @ linears[0].weight.T) @ linears[1].weight.T)
    torch.testing.assert_close(irm(x), expected)
    with pytest.raises(UsageError, match="^unknown featurizer 'lenet': choose one of domainbed, crossgrad_lenet, "
                                         "mtae_mlp, irm_mlp$"):
        featurizer_for(shape, {"featurizer": "lenet"})
    with pytest.raises(UsageError, match="needs images of at least 8x8"):
        CrossGradLeNet((1, 7, 7))


def test_dataset_declares_and_checks_the_hparams():
    declared = declared_hparams(MNISTRotation1k)
    assert resolve(declared)["featurizer"] == "domainbed" and resolve(declared)["image_size"] == 28
    with pytest.raises(UsageError, match="^hparam 'featurizer' = 'lenet' is invalid: it must be one of domainbed, "
                                         "crossgrad_lenet, mtae_mlp, irm_mlp$"):
        resolve(declared, overrides={"featurizer": "lenet"})
    with pytest.raises(UsageError, match="hparam 'image_size' = 0 is invalid"):
        resolve(declared, overrides={"image_size": 0})


def test_16x16_protocol_resizes_the_same_digits_then_rotates(mnist_root):
    data = MNISTRotation1k(str(mnist_root), {"image_size": 16})
    assert data.input_shape == (1, 16, 16)
    images, labels = load_mnist(str(mnist_root))
    keep = balanced_subset(labels[:60_000], 100, 10, seed=0)
    upright = F.interpolate(images[keep].float().div(255.0).unsqueeze(1), size=(16, 16), mode="bilinear",
                            antialias=True, align_corners=False).clamp(0, 1)
    for angle, domain in zip(ANGLES, data.domains):
        assert domain.x.shape == (1000, 1, 16, 16) and torch.equal(domain.labels, labels[keep])
        torch.testing.assert_close(domain.x, rotated(upright, angle))
    assert 0.0 <= float(data.domains[3].x.min()) and float(data.domains[3].x.max()) <= 1.0


def test_cli_trains_the_paper_network_on_real_mnist(mnist_root, tmp_path):
    hparams = {"featurizer": "crossgrad_lenet", "image_size": 16, "batch_size": 4}
    result = run_cli("--algorithm", "ERM", "--dataset", "MNISTRotation1k", "--data-dir", str(mnist_root),
                     "--test-envs", "0", "--steps", "2", "--checkpoint-freq", "2", "--hparams", json.dumps(hparams),
                     "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "args.json").read_text())["run"]["hparams"]
    assert {k: saved[k] for k in hparams} == hparams
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["algorithm"]["model"]
    assert state["featurizer.body.0.weight"].shape == (32, 1, 5, 5)
    assert state["featurizer.head.1.weight"].shape == (128, 512)
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and 0.0 <= record["env0_in_acc"] <= 1.0


def test_published_rows_follow_the_columns():
    bench = _bench()
    rows = bench.published_rows(bench.SETUPS["crossgrad"], ["0°", "75°", "Avg"])
    assert rows == {"CrossGrad (published)": [(88.3, None, None), (91.4, None, None), None]}
    full = bench.published_rows(bench.SETUPS["crossgrad"], [f"{a}°" for a in ANGLES] + ["Avg"])
    assert full["CrossGrad (published)"][-1] == (pytest.approx((88.3 + 98.6 + 98.0 + 97.7 + 97.7 + 91.4) / 6), None,
                                                 None)
    rows = bench.published_rows(bench.SETUPS["mmdaae"], ["30°", "Avg"])
    assert rows == {"MMDAAE (published)": [None, (89.8, None, None)]}


def test_bench_runs_skips_finished_runs_and_writes_its_block(mnist_root, tmp_path, monkeypatch):
    bench = _bench()
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    argv = ["--setup", "mmdaae", "--steps", "2", "--checkpoint-freq", "2", "--test-envs", "1", "--data-dir",
            str(mnist_root), "--output-dir", str(tmp_path / "runs"), "--doc", str(doc), "--device", "cpu"]
    assert bench.main(argv) == 0
    (folder,) = (tmp_path / "runs" / "mmdaae").iterdir()
    wall = float((folder / "wall_seconds").read_text())
    assert wall > 0
    monkeypatch.setattr(bench, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert bench.main(argv) == 0  # finished: skipped, its wall time unchanged
    assert float((folder / "wall_seconds").read_text()) == wall
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.count("<!-- paper-mnist-rotation-mmdaae:start -->") == 1
    assert "| ERM (ours) | " in text and "| MMDAAE (published) | – | 89.8 |" in text
    assert '"featurizer": "mtae_mlp"' in text and "| ERM | 1 | " in text


def test_hparams_flag_sets_values_over_the_setups():
    bench = _bench()
    registry.discover()
    args = bench.build_parser().parse_args(["--setup", "mmdaae", "--algorithms", "MMDAAE", "--test-envs", "0",
                                            "--hparams", '{"adv_weight": 0.01, "batch_size": 8}'])
    (run,) = bench.job_runs(args)
    assert run["hparams"]["adv_weight"] == 0.01 and run["hparams"]["batch_size"] == 8
    assert run["hparams"]["featurizer"] == "mtae_mlp" and run["hparams"]["mmd_weight"] == 0.1


@pytest.mark.parametrize("hparams, message", [
    ("{adv", "error: --hparams {adv: not JSON (Expecting property name enclosed in double quotes); give an object "
             "such as '{\"adv_weight\": 0.01}'"),
    ("[1]", "error: --hparams [1]: give a JSON object such as '{\"adv_weight\": 0.01}'"),
])
def test_bad_hparams_are_one_line_and_exit_code_2(hparams, message, tmp_path, capsys):
    assert _bench().main(["--setup", "mmdaae", "--hparams", hparams, "--output-dir", str(tmp_path / "runs"),
                          "--doc", str(tmp_path / "b.md")]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not any(tmp_path.iterdir())
