"""Image-folder datasets: PACS on the real PACS_small subset (skips without ../shared), every other dataset on
a tiny tree built here in its real layout, seeded augmentation, official PACS splits, one-line data errors,
and a 20-step ResNet-18 ERM run at 64x64 through ``python -m dg_meta.train``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from dg_meta.datasets.image_folder import ImageFolderDataset, eval_transform
from PIL import Image

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
LAYOUTS = {  # name: (folder, domain folders, ENVIRONMENTS) as in DomainBed
    "PACS": ("PACS", ["art_painting", "cartoon", "photo", "sketch"], ["A", "C", "P", "S"]),
    "VLCS": ("VLCS", ["Caltech101", "LabelMe", "SUN09", "VOC2007"], ["C", "L", "S", "V"]),
    "OfficeHome": ("office_home", ["Art", "Clipart", "Product", "Real World"], ["A", "C", "P", "R"]),
    "TerraIncognita": ("terra_incognita", ["location_100", "location_38", "location_43", "location_46"],
                       ["L100", "L38", "L43", "L46"]),
    "DomainNet": ("domain_net", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
                  ["clip", "info", "paint", "quick", "real", "sketch"]),
    "Office31": ("office31", ["amazon", "dslr", "webcam"], ["A", "D", "W"]),
}


def load(name: str, root: Path, workers: int = 0, **overrides) -> ImageFolderDataset:
    cls = registry.get_dataset(name)
    return cls(str(root), resolve(declared_hparams(cls), 0, {"image_size": 8, **overrides}), num_workers=workers)


def build_tree(root: Path, name: str, classes=("bird", "car"), per_class: int = 2) -> Path:
    folder, domains, _ = LAYOUTS[name]
    for d, domain in enumerate(domains):
        for c, cls in enumerate(classes):
            (root / folder / domain / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (10, 7), (40 * d, 100 * c, 20 * i)).save(root / folder / domain / cls / f"{i}.png")
    return root


@pytest.fixture
def pacs_root(shared_data: Path) -> Path:
    root = shared_data / "PACS_small"
    if not (root / "PACS").is_dir():
        pytest.skip(f"PACS_small not found under {shared_data}")
    return root


def test_pacs_small_domains_classes_and_counts(pacs_root):
    dataset = load("PACS", pacs_root)
    assert dataset.ENVIRONMENTS == ["A", "C", "P", "S"] and len(dataset) == 4
    assert dataset.classes == PACS_CLASSES and dataset.num_classes == 7
    for domain in dataset.domains:
        assert len(domain) == 140
        assert torch.bincount(domain.labels).tolist() == [20] * 7
    assert dataset.input_shape == (3, 8, 8)
    x, y = dataset.domains[3].batch(torch.tensor([0, 139]))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and y.tolist() == [0, 6]


def test_augmentation_is_seeded_worker_independent_and_training_only(pacs_root):
    idx = torch.tensor([5, 60, 100, 7, 33])
    batches = []
    for workers in (0, 2):
        dataset = load("PACS", pacs_root, workers=workers)
        torch.manual_seed(123)
        batches.append(dataset.domains[1].for_training().fetch(idx))
        plain = dataset.domains[1].fetch(idx)
    dataset.close()
    assert torch.equal(batches[0], batches[1])
    assert not torch.allclose(batches[0], plain)
    with Image.open(dataset.files[1][5]) as image:
        assert torch.equal(plain[0], eval_transform(8)(image.convert("RGB")))
    off = load("PACS", pacs_root, data_augmentation=False)
    assert off.domains[0].for_training() is off.domains[0]


def test_pacs_official_split_lists(pacs_root, shared_data, tmp_path):
    if not (shared_data / "pacs_splits").is_dir():
        pytest.skip("pacs_splits not found")
    (tmp_path / "PACS").symlink_to(pacs_root / "PACS")
    (tmp_path / "pacs_splits").symlink_to(shared_data / "pacs_splits")
    dataset = load("PACS", tmp_path, pacs_splits=True)
    splits = dataset.split([0], trial_seed=0, holdout_fraction=0.2)
    for env, (inside, outside) in enumerate(zip(splits.in_idx, splits.out_idx)):
        assert len(inside) + len(outside) == 140 and not set(inside.tolist()) & set(outside.tolist())
        listed = (shared_data / "pacs_splits" / f"{dataset.DOMAIN_DIRS[env]}_crossval_kfold.txt").read_text().split()
        for i in outside.tolist():
            assert Path(dataset.files[env][i]).relative_to(dataset.base).as_posix() in listed
    # photo's crossval list holds the first images of each class, all of which PACS_small has
    assert len(splits.out_idx[2]) > 0 and splits.test_envs == [0]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_dataset_on_a_tiny_tree(name, tmp_path):
    dataset = load(name, build_tree(tmp_path, name))
    assert dataset.ENVIRONMENTS == LAYOUTS[name][2]
    assert dataset.classes == ["bird", "car"] and dataset.num_classes == 2
    assert [len(d) for d in dataset.domains] == [4] * len(LAYOUTS[name][1])
    x, y = dataset.domains[-1].for_training().batch(torch.tensor([3, 0]))
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [1, 0]


def test_missing_root_names_the_layout(tmp_path):
    with pytest.raises(UsageError) as e:
        load("VLCS", tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"VLCS not found: expected {tmp_path.resolve() / 'VLCS'}/<domain>/<class>/<image> "
                          "with domain folders Caltech101, LabelMe, SUN09, VOC2007")
    assert "python -m dg_meta.datasets.download VLCS" in msg and "\n" not in msg


def test_missing_domain_empty_class_and_class_mismatch(tmp_path):
    root = build_tree(tmp_path, "Office31")
    for image in (root / "office31" / "dslr" / "car").iterdir():
        image.unlink()
    with pytest.raises(UsageError, match=f"class folder {root / 'office31' / 'dslr' / 'car'} holds no images"):
        load("Office31", root)
    (root / "office31" / "dslr" / "car").rmdir()
    with pytest.raises(UsageError, match=r"class folders of .*dslr differ .*\(missing: car; extra: none\)"):
        load("Office31", root)
    import shutil

    shutil.rmtree(root / "office31" / "webcam")
    shutil.rmtree(root / "office31" / "dslr")
    with pytest.raises(UsageError, match=f"domain folder {root / 'office31' / 'dslr'} is missing"):
        load("Office31", root)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_names_its_path(tmp_path, workers):
    root = build_tree(tmp_path, "PACS")
    broken = root / "PACS" / "cartoon" / "car" / "1.png"
    dataset = load("PACS", root, workers=workers)
    broken.write_bytes(b"\x89PNG not really")  # broken after the up-front check: found when decoded
    with pytest.raises(UsageError) as e:
        dataset.domains[1].batch(torch.arange(4))
    dataset.close()
    assert str(e.value).startswith(f"unreadable image {broken} (") and "\n" not in str(e.value)


@pytest.mark.slow
def test_erm_resnet18_from_scratch_trains_20_steps_at_64px(pacs_root, tmp_path):
    out = tmp_path / "run"
    result = run_cli("--algorithm", "ERM", "--dataset", "PACS", "--data-dir", str(pacs_root), "--steps", "20",
                     "--checkpoint-freq", "20", "--hparams", '{"resnet18": true, "image_size": 64, "batch_size": 4}',
                     "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 20 and record["loss"] == record["loss"]  # finite (not NaN)
    assert record["hparams"]["image_size"] == 64 and record["hparams"]["resnet18"] is True
    assert all(0 <= record[f"env{e}_in_acc"] <= 1 for e in range(4))
    assert (out / "done").exists()
