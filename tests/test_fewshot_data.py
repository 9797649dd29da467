"""Omniglot, OmniglotSmall, the official one-shot runs and miniImageNet, on tiny trees in the real layouts
(and on the shared Omniglot small sets when present); the few-shot protocol through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from dg_meta.datasets.miniimagenet import MiniImageNet
from dg_meta.datasets.omniglot import (
    BACKGROUND_ALPHABETS,
    EVALUATION_ALPHABETS,
    SMALL1_ALPHABETS,
    SMALL2_ONLY_ALPHABETS,
    Omniglot,
    OmniglotSmall,
    load_one_shot_runs,
)
from PIL import Image

from dg_meta.errors import UsageError


def write_png(path: Path, seed: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).random((size, size)) > 0.5
    Image.fromarray(pixels).save(path)


def write_alphabets(folder: Path, alphabets: list[str], characters: int, drawings: int) -> None:
    for a, alphabet in enumerate(alphabets):
        for c in range(characters):
            for d in range(drawings):
                name = f"{a:02d}{c:02d}_{d + 1:02d}.png"
                write_png(folder / alphabet / f"character{c + 1:02d}" / name, a * 997 + c * 31 + d)


def test_omniglot_torchvision_layout_alphabets_as_domains(tmp_path):
    root = tmp_path / "omniglot-py"
    write_alphabets(root / "images_background", BACKGROUND_ALPHABETS, 2, 2)
    write_alphabets(root / "images_evaluation", EVALUATION_ALPHABETS, 2, 2)
    data = Omniglot(str(tmp_path), {"rotation_classes": True})
    assert len(data) == 50 and data.DEFAULT_TEST_ENVS == list(range(30, 50))
    assert [d.name for d in data.domains] == BACKGROUND_ALPHABETS + EVALUATION_ALPHABETS
    assert data.num_classes == 100 * 4 and data.input_shape == (1, 28, 28)
    domain = data.domains[31]
    assert domain.labels.tolist() == [4 * c + r for r in range(4) for c in (62, 62, 63, 63)]
    x, y = domain.batch(torch.tensor([0, 4, 8, 12]))
    assert x.shape == (4, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    for k in range(4):
        assert torch.equal(x[k], torch.rot90(x[0], k, (1, 2)))
    plain = Omniglot(str(tmp_path), {"rotation_classes": False})
    assert plain.num_classes == 100 and len(plain.domains[0]) == 4


def test_omniglot_missing_files_name_the_layout(tmp_path):
    with pytest.raises(UsageError) as info:
        Omniglot(str(tmp_path), {})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("Omniglot not found: expected images_background/ and images_evaluation/ "
                              "(torchvision's omniglot-py layout")
    assert str((tmp_path / "omniglot-py").resolve()) in message
    write_alphabets(tmp_path / "omniglot-py" / "images_background", BACKGROUND_ALPHABETS[:29], 1, 1)
    (tmp_path / "omniglot-py" / "images_evaluation").mkdir()
    with pytest.raises(UsageError, match=r"lacks 21 of the 50 alphabet folders \(images_background/Tifinagh, "):
        Omniglot(str(tmp_path), {})


def test_omniglot_small_tiny_tree_and_test_domains(tmp_path):
    write_alphabets(tmp_path / "images_background_small1", SMALL1_ALPHABETS, 2, 3)
    write_alphabets(tmp_path / "images_background_small2", ["Greek", "Latin"] + SMALL2_ONLY_ALPHABETS, 2, 3)
    data = OmniglotSmall(str(tmp_path), {"rotation_classes": False})
    assert [d.name for d in data.domains] == SMALL1_ALPHABETS + SMALL2_ONLY_ALPHABETS
    assert [data.ENVIRONMENTS[i] for i in data.DEFAULT_TEST_ENVS] == SMALL2_ONLY_ALPHABETS
    assert data.num_classes == 16 and data.domains[7].labels.tolist() == [14, 14, 14, 15, 15, 15]
    with pytest.raises(UsageError, match="Omniglot small sets not found: expected images_background_small1/ and "
                                         "images_background_small2/"):
        OmniglotSmall(str(tmp_path / "nowhere"), {})


def test_omniglot_small_shared_sets(shared_data):
    if not (shared_data / "omniglot" / "images_background_small1").is_dir():
        pytest.skip(f"Omniglot small sets not found under {shared_data / 'omniglot'}")
    data = OmniglotSmall(str(shared_data), {"rotation_classes": False})
    assert [len(d) // 20 for d in data.domains] == [24, 22, 24, 40, 26, 47, 42, 17]
    assert data.num_classes == 242


def test_one_shot_runs_tiny_tree(tmp_path):
    folder = tmp_path / "one_shot_runs"
    for i in range(1, 21):
        run = folder / f"run{i:02d}"
        lines = []
        for j in range(1, 3):
            write_png(run / "training" / f"class{j:02d}.png", i * 10 + j)
            write_png(run / "test" / f"item{j:02d}.png", i * 10 + 3 - j)
            lines.append(f"run{i:02d}/test/item{j:02d}.png run{i:02d}/training/class{3 - j:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    runs = load_one_shot_runs(tmp_path)
    assert len(runs) == 20 and runs[0].query_y.tolist() == [1, 0]
    assert torch.equal(runs[0].query_x[0], runs[0].support_x[1])
    (folder / "run07" / "class_labels.txt").unlink()
    with pytest.raises(UsageError, match="run07 lacks class_labels.txt"):
        load_one_shot_runs(tmp_path)


def test_one_shot_runs_shared(shared_data):
    if not (shared_data / "omniglot" / "one_shot_runs").is_dir():
        pytest.skip(f"Omniglot one-shot runs not found under {shared_data / 'omniglot'}")
    runs = load_one_shot_runs(shared_data)
    assert [len(r.support_y) for r in runs] == [20] * 20
    assert runs[0].query_y[:3].tolist() == [7, 8, 1]  # run01: item01 -> class08, item02 -> class09, ...


def write_mini_imagenet(root: Path) -> None:
    folder = root / "miniImageNet"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, wnids in {"train": ["n01", "n02"], "val": ["n03", "n04"], "test": ["n05", "n06"]}.items():
        rows = ["filename,label"]
        for wnid in wnids:
            for k in range(3):
                name = f"{wnid}0000000{k}.jpg"
                Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "images" / name)
                rows.append(f"{name},{wnid}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")


def test_mini_imagenet_split_files_as_domains(tmp_path):
    write_mini_imagenet(tmp_path)
    data = MiniImageNet(str(tmp_path), {})
    assert [d.name for d in data.domains] == ["train", "val", "test"] and data.DEFAULT_TEST_ENVS == [1, 2]
    assert data.num_classes == 6
    assert [d.labels.tolist() for d in data.domains] == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [4, 4, 4, 5, 5, 5]]
    x, y = data.domains[2].batch(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 84, 84) and y.tolist() == [4, 5]


def test_mini_imagenet_missing_files(tmp_path):
    with pytest.raises(UsageError, match=r"^miniImageNet not found: expected images/<file>.jpg, train.csv, val.csv "
                                         r"and test.csv \(Ravi & Larochelle's split files\) in one of .*miniImageNet"):
        MiniImageNet(str(tmp_path), {})
    write_mini_imagenet(tmp_path)
    (tmp_path / "miniImageNet" / "images" / "n0500000001.jpg").unlink()
    with pytest.raises(UsageError, match="1 images listed in test.csv are missing .* \\(first: n0500000001.jpg\\)"):
        MiniImageNet(str(tmp_path), {})


def test_protonet_on_omniglot_small_tree_uses_the_class_pool_protocol(tmp_path):
    data = tmp_path / "data"
    write_alphabets(data / "images_background_small1", SMALL1_ALPHABETS, 3, 15)
    write_alphabets(data / "images_background_small2", ["Greek", "Latin"] + SMALL2_ONLY_ALPHABETS, 3, 15)
    out = tmp_path / "run"
    result = run_cli("--algorithm", "ProtoNet", "--dataset", "OmniglotSmall", "--data-dir", str(data),
                     "--steps", "3", "--checkpoint-freq", "3", "--fs-episodes", "2", "--fs-way", "3",
                     "--fs-query", "2", "--output-dir", str(out),
                     "--hparams", json.dumps({"n_way": 3, "n_query": 1}))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "args.json").read_text())["run"]["episode_protocol"] == "class_pool"
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert {"val_fs_acc", "test_fs_acc", "test_fs_ci"} <= set(record)
    assert not any(k.startswith("env") and k.endswith("_fs_acc") for k in record)
