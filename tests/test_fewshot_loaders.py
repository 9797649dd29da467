"""tieredImageNet, CUB-200-2011, CIFAR-FS and FC100 on tiny trees / fakes written in the real layouts: the
published class splits, shapes, labels and normalisation, a training episode drawn through the CLI's sampler, and
the one-line messages for missing or malformed files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from dg_meta.datasets.cifar_fewshot import CIFARFS, FC100
from dg_meta.datasets.cub import CUB
from dg_meta.datasets.tieredimagenet import TieredImageNet
from PIL import Image
from torchvision import transforms

from dg_meta.errors import UsageError
from dg_meta.train import Trainer, parse_args, resolve_run

# CIFAR-100's taxonomy, superclasses in coarse-label order (restated here, independently of the loaders)
SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
FINE_NAMES = sorted(name for names in SUPERCLASSES.values() for name in names)  # CIFAR-100 numbers them a-z
COARSE_OF = {name: c for c, names in enumerate(SUPERCLASSES.values()) for name in names}
# r2d2's CIFAR-FS split files (splits/bertinetto/val.txt, test.txt); train.txt holds the other 64 classes
CIFAR_FS_VAL = {"otter", "motorcycle", "television", "lamp", "crocodile", "shark", "butterfly", "beaver", "beetle",
                "tractor", "flatfish", "maple_tree", "camel", "crab", "sea", "cattle"}
CIFAR_FS_TEST = {"baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
                 "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm"}
# TADAM's FC100 split (Oreshkin et al. 2018, Appendix)
FC100_VAL = ["large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"]
FC100_TEST = ["aquatic_mammals", "insects", "medium_mammals", "people"]
# MetaOptNet's data/CIFAR_FS.py and data/FC100.py normalisation
MEAN = np.array([129.37731888, 124.10583864, 112.47758569]) / 255
STD = np.array([68.20947949, 65.43124043, 70.45866994]) / 255
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 1


def cifar_pixel(fine: int, k: int) -> int:
    """The value every pixel of example ``k`` of class ``fine`` holds in the fake: the class and the example
    are read back from a fetched image."""
    return fine + 100 * (k % 2)


def write_cifar100(root: Path) -> None:
    """A fake ``cifar-100-python`` in torchvision's layout: 3 ``train`` and 1 ``test`` image per class, shuffled;
    ``train`` pickled with str keys (the release read as latin-1), ``test`` with bytes keys."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class, offset in (("train", TRAIN_PER_CLASS, 0), ("test", TEST_PER_CLASS, TRAIN_PER_CLASS)):
        examples = [(fine, offset + k) for fine in range(100) for k in range(per_class)]
        order = rng.permutation(len(examples))
        fine = [examples[i][0] for i in order]
        data = np.stack([np.full(3072, cifar_pixel(*examples[i]), dtype=np.uint8) for i in order])
        content = {"data": data, "fine_labels": fine, "coarse_labels": [COARSE_OF[FINE_NAMES[f]] for f in fine]}
        if name == "test":
            content = {k.encode(): v for k, v in content.items()}
        (folder / name).write_bytes(pickle.dumps(content))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": FINE_NAMES,
                                                "coarse_label_names": list(SUPERCLASSES)}))


def class_names(domain) -> set[str]:
    return {FINE_NAMES[c] for c in domain.labels.unique().tolist()}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root)
    return root


def test_cifar_fs_is_bertinettos_64_16_20_partition(cifar_root):
    data = CIFARFS(str(cifar_root), {})
    assert [d.name for d in data.domains] == ["train", "val", "test"] and data.DEFAULT_TEST_ENVS == [1, 2]
    assert data.EPISODE_PROTOCOL == "per_domain" and data.num_classes == 100 and data.input_shape == (3, 32, 32)
    train, val, test = (class_names(d) for d in data.domains)
    assert (len(train), len(val), len(test)) == (64, 16, 20)
    assert val == CIFAR_FS_VAL and test == CIFAR_FS_TEST and train == set(FINE_NAMES) - val - test
    assert [len(d) for d in data.domains] == [64 * 4, 16 * 4, 20 * 4]  # every image of a class: train + test


def test_fc100_splits_by_superclass_12_4_4(cifar_root):
    data = FC100(str(cifar_root), {})
    splits = [class_names(d) for d in data.domains]
    assert [len(s) for s in splits] == [60, 20, 20]
    supers = [{s for s, names in SUPERCLASSES.items() if set(names) & split} for split in splits]
    for split, chosen in zip(splits, supers):  # whole superclasses only
        assert split == {name for s in chosen for name in SUPERCLASSES[s]}
    assert supers[1] == set(FC100_VAL) and supers[2] == set(FC100_TEST)
    assert supers[0] == set(SUPERCLASSES) - set(FC100_VAL) - set(FC100_TEST) and len(supers[0]) == 12
    assert class_names(data.domains[2]) >= {"baby", "boy", "girl", "man", "woman", "whale", "bee"}


def test_cifar_images_labels_and_normalisation(cifar_root):
    data = CIFARFS(str(cifar_root), {})
    test = data.domains[2]
    idx = torch.arange(len(test))
    x, y = test.batch(idx)
    assert x.shape == (80, 3, 32, 32) and x.dtype == torch.float32 and torch.equal(test.fetch(idx), x)
    assert torch.equal(x.amin((2, 3)), x.amax((2, 3)))  # a fake image is one value per channel
    value = x[:, :, 0, 0].double() * torch.tensor(STD) + torch.tensor(MEAN)  # undo MetaOptNet's normalisation
    pixel = (value * 255).round()
    assert torch.allclose(value * 255, pixel, atol=1e-3) and torch.equal(pixel[:, 0:1].expand(-1, 3), pixel)
    pixel = pixel[:, 0].long()
    assert torch.equal(pixel % 100, y)  # each image carries its own label
    for label in y.unique().tolist():
        of_class = pixel[y == label].tolist()  # the train pickle's 3 images (shuffled), then the test pickle's
        assert sorted(of_class[:3]) == [label, label, label + 100] and of_class[3] == label + 100


def cub_folder_names() -> list[str]:
    return [f"{i + 1:03d}.Bird_{i + 1:03d}" for i in range(200)]


def write_cub(root: Path, images_per_class: int = 3) -> Path:
    """The official archive's 200 class folders, each with tiny solid-colour JPEGs: red = the folder's index."""
    images = root / "CUB_200_2011" / "images"
    for i, name in enumerate(cub_folder_names()):
        (images / name).mkdir(parents=True)
        for k in range(images_per_class):
            Image.new("RGB", (10, 8), (i, 60 * k, 30)).save(images / name / f"{name[4:]}_{k:04d}.jpg", quality=100)
    return images


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cub")
    write_cub(root)
    return root


def test_cub_is_chens_split_by_index_mod_4(cub_root):
    data = CUB(str(cub_root), {})
    assert [d.name for d in data.domains] == ["train", "val", "test"] and data.DEFAULT_TEST_ENVS == [1, 2]
    labels = [set(d.labels.tolist()) for d in data.domains]
    assert labels[0] == set(range(0, 200, 2)) and labels[1] == set(range(1, 200, 4))
    assert labels[2] == set(range(3, 200, 4))
    assert [len(s) for s in labels] == [100, 50, 50] and data.num_classes == 200
    x, y = data.domains[1].batch(torch.tensor([0, 3, 149]))
    assert x.shape == (3, 3, 84, 84) and y.tolist() == [1, 5, 197]
    red = x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert torch.allclose(red * 255, y[:, None, None].float(), atol=2.0)  # the image of the labelled folder


def test_cub_decoding_is_closerlooks_resize_and_centre_crop(tmp_path):
    images = write_cub(tmp_path, images_per_class=1)
    picture = images / cub_folder_names()[3] / "odd.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (100, 130, 3), dtype=np.uint8)).save(picture)
    data = CUB(str(tmp_path), {})
    test = data.domains[2]
    where = [i for i, p in enumerate(test.paths) if p.name == "odd.jpg"]
    expected = transforms.Compose([transforms.Resize([96, 96]), transforms.CenterCrop(84), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(picture) as image:
        assert torch.allclose(test.fetch(torch.tensor(where))[0], expected(image.convert("RGB")), atol=1e-5)


def test_cub_missing_files_and_wrong_class_count(tmp_path):
    with pytest.raises(UsageError, match=r"^CUB-200-2011 not found: expected CUB_200_2011/images/<class folder>/"
                                         r"<image>.jpg, the official archive's 200 class folders in "):
        CUB(str(tmp_path), {})
    images = write_cub(tmp_path, images_per_class=1)
    (images / cub_folder_names()[-1] / "Bird_200_0000.jpg").unlink()
    with pytest.raises(UsageError, match=r"class folder .*200.Bird_200 holds no images"):
        CUB(str(tmp_path), {})
    (images / cub_folder_names()[-1]).rmdir()
    with pytest.raises(UsageError, match=r"holds 199 class folders, not the 200 of the official archive"):
        CUB(str(tmp_path), {})


TIERED = {"train": ["n02", "n01", "n03"], "val": ["n11", "n10"], "test": ["n21", "n20"]}


def write_tiered(root: Path, per_class: int = 5) -> Path:
    base = root / "tiered-imagenet"
    rng = np.random.default_rng(0)
    for split, wnids in TIERED.items():
        for wnid in wnids:
            (base / split / wnid).mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 255, (84 + 6 * k, 84, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(base / split / wnid / f"{wnid}_{k}.jpg")
    return base


@pytest.fixture(scope="module")
def tiered_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiered")
    write_tiered(root)
    return root


def test_tiered_imagenet_folders_as_domains(tiered_root):
    data = TieredImageNet(str(tiered_root), {})
    assert [d.name for d in data.domains] == ["train", "val", "test"] and data.DEFAULT_TEST_ENVS == [1, 2]
    assert data.num_classes == 7 and data.input_shape == (3, 84, 84)
    # global ids: sorted wnids of train, then val, then test
    assert [sorted(set(d.labels.tolist())) for d in data.domains] == [[0, 1, 2], [3, 4], [5, 6]]
    val = data.domains[1]
    assert [p.parent.name for p in val.paths] == ["n10"] * 5 + ["n11"] * 5 and val.labels.tolist() == [3] * 5 + [4] * 5
    x, y = val.batch(torch.tensor([7]))
    expected = transforms.Compose([transforms.Resize((84, 84)), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(val.paths[7]) as image:
        assert torch.allclose(x[0], expected(image.convert("RGB")), atol=1e-5) and y.tolist() == [4]


def test_tiered_imagenet_missing_and_malformed_trees(tmp_path):
    with pytest.raises(UsageError, match=r"^tieredImageNet not found: expected \{train,val,test\}/<wnid>/<image>.jpg"
                                         r".*the pickled \*_images_png.pkl release is not read"):
        TieredImageNet(str(tmp_path), {})
    base = write_tiered(tmp_path, per_class=1)
    (base / "test" / "n02").mkdir()
    with pytest.raises(UsageError, match=r"class n02 is in both train/ and test/"):
        TieredImageNet(str(tmp_path), {})


@pytest.mark.parametrize("name", ["CIFARFS", "FC100", "CUB", "TieredImageNet"])
def test_a_training_episode_through_the_cli_sampler(name, cifar_root, cub_root, tiered_root, tmp_path):
    root = {"CIFARFS": cifar_root, "FC100": cifar_root, "CUB": cub_root, "TieredImageNet": tiered_root}[name]
    argv = ["--algorithm", "ProtoNet", "--dataset", name, "--data-dir", str(root), "--device", "cpu",
            "--hparams", json.dumps({"n_way": 3, "k_shot": 1, "n_query": 1, "meta_batch_size": 2})]
    run = resolve_run(parse_args(argv))
    assert run["test_envs"] == [1, 2] and run["episode_protocol"] == "per_domain"
    trainer = Trainer(run, str(root), tmp_path / "run", "cpu")
    batch = trainer.next_batch()
    train_classes = set(trainer.dataset.domains[0].labels.tolist())
    for episode in batch:
        assert episode.support_x.shape == (3, *trainer.dataset.input_shape) and episode.query_x.shape[0] == 3
        assert episode.domains.tolist() == [0, 0, 0] and set(episode.classes.tolist()) <= train_classes
    losses = trainer.algorithm.update(batch)
    assert torch.isfinite(torch.as_tensor(losses["loss"]))


def test_cifar_missing_files_name_the_layout(tmp_path):
    with pytest.raises(UsageError) as info:
        CIFARFS(str(tmp_path), {})
    message = str(info.value)
    assert "\n" not in message and message.startswith("CIFAR-100 not found: expected train, test, meta in ")
    assert str((tmp_path / "cifar-100-python").resolve()) in message and "torchvision's CIFAR-100 layout" in message
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(UsageError, match="missing: meta"):
        FC100(str(tmp_path), {})
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match=r"CIFAR-100 file .*meta cannot be read \(UnpicklingError\)"):
        FC100(str(tmp_path), {})
