"""Real-data robustness of the image-folder datasets: PACS's official split lists with their quirks (a wrong
label, a duplicate line, a test-only image; the real lists on a full-size tree of links), absent and
unlisted images, and unreadable images found up front (refused in one line, or left out and listed with
``--skip-bad-images``). Trees are built here from tiny PIL images."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from dg_meta.datasets import image_folder
from dg_meta.datasets.image_folder import PACS, image_problem
from PIL import Image

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.train import main, parse_args, resolve_run

DOMAINS = PACS.DOMAIN_DIRS
CLASSES = ("dog", "elephant")
SKIP_HINT = "replace or delete it, or pass --skip-bad-images to leave out every unreadable image (they are listed)"


def build_pacs(root: Path, per_class: int = 3, fmt: str = "JPEG") -> Path:
    """``root/PACS/<domain>/<class>/pic_00i.jpg``, tiny images (JPEG, or PNG named .jpg as PACS's sketches)."""
    for d, domain in enumerate(DOMAINS):
        for c, cls in enumerate(CLASSES):
            (root / "PACS" / domain / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (60 * d, 120 * c, 50 * i)).save(
                    root / "PACS" / domain / cls / f"pic_{i:03d}.jpg", fmt)
    return root


def write_lists(root: Path, per_class: int = 3) -> dict[str, list[str]]:
    """Official-style lists: train = images 0-1, crossval = image 2, test = every image; 1-based labels."""
    lists = {}
    for domain in DOMAINS:
        for part, images in (("train", range(min(2, per_class))), ("crossval", range(2, per_class)),
                             ("test", range(per_class))):
            lines = [f"{domain}/{cls}/pic_{i:03d}.jpg {c + 1}" for c, cls in enumerate(CLASSES) for i in images]
            lists[f"{domain}_{part}_kfold.txt"] = lines
    save_lists(root, lists)
    return lists


def save_lists(root: Path, lists: dict[str, list[str]]) -> None:
    (root / "pacs_splits").mkdir(exist_ok=True)
    for name, lines in lists.items():
        (root / "pacs_splits" / name).write_text("".join(f"{line}\n" for line in lines))


def load(root: Path, skip_bad_images: bool = False, **overrides) -> PACS:
    hparams = resolve(declared_hparams(PACS), 0, {"image_size": 8, **overrides})
    if skip_bad_images:  # as --skip-bad-images adds it
        hparams["skip_bad_images"] = True
    return PACS(str(root), hparams, num_workers=0)


def rel_files(dataset: PACS, env: int, idx: torch.Tensor) -> list[str]:
    return [Path(dataset.files[env][i]).relative_to(dataset.base).as_posix() for i in idx.tolist()]


def jpeg_bytes(size: int = 48) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), torch.randint(0, 256, (size * size * 3,), dtype=torch.uint8)
                    .numpy().tobytes()).save(out, "JPEG")
    return out.getvalue()


# ----- official split lists


def test_list_label_disagreeing_with_the_folder_warns_once_and_the_folder_wins(tmp_path, capsys):
    """The three quirks of the real art_painting lists: crossval line 1 labels a dog 0, a crossval line is
    repeated, and one image is in the test list only."""
    root = build_pacs(tmp_path, per_class=4)
    lists = write_lists(root, per_class=3)
    crossval = lists["art_painting_crossval_kfold.txt"]
    crossval[0] = "art_painting/dog/pic_002.jpg 0"
    crossval.append("art_painting/elephant/pic_002.jpg 2")
    for domain in DOMAINS:  # pic_003 of every class: in the test list only
        lists[f"{domain}_test_kfold.txt"] += [f"{domain}/{cls}/pic_003.jpg {c + 1}" for c, cls in enumerate(CLASSES)]
    save_lists(root, lists)
    dataset = load(root, pacs_splits=True)
    splits = dataset.split([0], trial_seed=0, holdout_fraction=0.2)
    again = dataset.split([1], trial_seed=5, holdout_fraction=0.5)
    assert capsys.readouterr().err == (
        "warning: PACS: art_painting_crossval_kfold.txt line 1 labels art_painting/dog/pic_002.jpg 0, but its "
        "folder dog is class 1 (1-based): using the folder's label\n")
    for env, domain in enumerate(DOMAINS):
        assert rel_files(dataset, env, splits.in_idx[env]) == [
            f"{domain}/{cls}/pic_{i:03d}.jpg" for cls in CLASSES for i in (0, 1)]
        assert rel_files(dataset, env, splits.out_idx[env]) == [f"{domain}/{cls}/pic_002.jpg" for cls in CLASSES]
        assert torch.equal(again.in_idx[env], splits.in_idx[env])
    assert splits.test_envs == [0] and again.test_envs == [1]
    dog = dataset.files[0].index(str(root / "PACS" / "art_painting" / "dog" / "pic_002.jpg"))
    assert dataset.domains[0].labels[dog] == 0  # the folder's dog, 0-based
    _, y = dataset.domains[0].batch(torch.tensor([dog]))
    assert y.tolist() == [0]


def test_listed_image_that_is_absent_is_refused(tmp_path):
    root = build_pacs(tmp_path)
    write_lists(root)
    (root / "PACS" / "cartoon" / "elephant" / "pic_001.jpg").unlink()
    dataset = load(root, pacs_splits=True)
    with pytest.raises(UsageError) as e:
        dataset.split([0], 0, 0.2)
    assert str(e.value) == (
        f"PACS: cartoon/elephant/pic_001.jpg, listed in cartoon_train_kfold.txt line 4, is missing from "
        f"{root / 'PACS'}: restore the PACS folder (python -m dg_meta.datasets.download PACS --data-dir "
        f"DATA_DIR) or delete the lines of missing images from the lists in {root / 'pacs_splits'}")
    (root / "PACS" / "photo" / "dog" / "pic_000.jpg").unlink()
    with pytest.raises(UsageError, match=r"^PACS: cartoon/elephant/pic_001.jpg, listed in cartoon_train_kfold.txt "
                                         r"line 4, is missing from .* \(and 1 more listed images\): restore"):
        load(root, pacs_splits=True).split([0], 0, 0.2)


def test_a_subset_of_pacs_uses_the_lists_restricted_to_its_images(tmp_path, capsys):
    root = build_pacs(tmp_path)
    write_lists(root)
    for domain in DOMAINS:  # every class folder lacks its crossval image, as PACS_small lacks most images
        for cls in CLASSES:
            (root / "PACS" / domain / cls / "pic_002.jpg").unlink()
    dataset = load(root, pacs_splits=True)
    splits = dataset.split([0], 0, 0.2)
    assert capsys.readouterr().err == (
        f"warning: PACS: {root / 'PACS'} is a subset of the official split lists (it holds 16 of the 24 images "
        "they name, and every class folder lacks some): the splits are the lists restricted to the images present\n")
    assert [len(i) for i in splits.in_idx] == [4] * 4 and [len(o) for o in splits.out_idx] == [0] * 4


def test_image_in_no_list_or_in_train_and_crossval_is_refused(tmp_path):
    root = build_pacs(tmp_path)
    lists = write_lists(root)
    lists["sketch_train_kfold.txt"].append("sketch/dog/pic_002.jpg 1")
    save_lists(root, lists)
    with pytest.raises(UsageError) as e:
        load(root, pacs_splits=True).split([0], 0, 0.2)
    assert str(e.value) == ("PACS: sketch/dog/pic_002.jpg is in both sketch_train_kfold.txt (line 5) and "
                            "sketch_crossval_kfold.txt (line 1): delete one line")
    lists = write_lists(root)
    Image.new("RGB", (8, 8)).save(root / "PACS" / "photo" / "elephant" / "extra.jpg")
    with pytest.raises(UsageError) as e:
        load(root, pacs_splits=True).split([0], 0, 0.2)
    assert str(e.value) == (f"PACS: {root / 'PACS' / 'photo' / 'elephant' / 'extra.jpg'} is in none of the split "
                            f"lists photo_{{train,crossval,test}}_kfold.txt of {root / 'pacs_splits'}: add it to one, "
                            "or move it out of the PACS folder")


def test_malformed_or_missing_list(tmp_path):
    root = build_pacs(tmp_path)
    lists = write_lists(root)
    lists["photo_crossval_kfold.txt"][1] = "cartoon/elephant/pic_002.jpg 2"  # another domain's image
    save_lists(root, lists)
    with pytest.raises(UsageError) as e:
        load(root, pacs_splits=True).split([0], 0, 0.2)
    assert str(e.value) == (f"{root / 'pacs_splits' / 'photo_crossval_kfold.txt'} line 2 is malformed "
                            "('cartoon/elephant/pic_002.jpg 2'): expected 'photo/<class>/<file> <1-based label>'")
    write_lists(root)
    (root / "pacs_splits" / "sketch_test_kfold.txt").unlink()
    with pytest.raises(UsageError, match=r"sketch_test_kfold.txt not found: expected the lists "
                                         r"<domain>_\{train,crossval,test\}_kfold.txt in "):
        load(root, pacs_splits=True).split([0], 0, 0.2)


def test_real_official_lists_on_the_full_pacs(shared_data, tmp_path, capsys, monkeypatch):
    """The real lists on a stand-in for the full PACS: its 28 class folders, whose listing is stubbed to the
    9,991 listed images (creating that many files takes ~10 s here) and whose images all pass the check.
    They load with exactly one warning, and the splits hold the lists' distinct images."""
    lists_dir = shared_data / "pacs_splits"
    if not lists_dir.is_dir():
        pytest.skip("pacs_splits not found")
    root = tmp_path / "root"
    root.mkdir()
    (root / "pacs_splits").symlink_to(lists_dir)
    listed: dict[str, set[str]] = {}
    for path in sorted(lists_dir.glob("*_kfold.txt")):
        listed[path.name] = {line.split()[0] for line in path.read_text().splitlines() if line.strip()}
    by_folder: dict[Path, list[str]] = {}
    for rel in sorted(set().union(*listed.values())):
        by_folder.setdefault(root / "PACS" / rel.rsplit("/", 1)[0], []).append(str(root / "PACS" / rel))
    for folder in by_folder:
        folder.mkdir(parents=True)
    monkeypatch.setattr(PACS, "_images", staticmethod(lambda folder: by_folder[folder]))
    monkeypatch.setattr(image_folder, "image_problem", lambda path: None)
    dataset = load(root, pacs_splits=True)
    splits = dataset.split([0], 0, 0.2)
    assert capsys.readouterr().err == (
        "warning: PACS: art_painting_crossval_kfold.txt line 1 labels art_painting/dog/pic_225.jpg 0, but its "
        "folder dog is class 1 (1-based): using the folder's label\n")
    assert sum(len(files) for files in dataset.files) == 9991
    for env, domain in enumerate(DOMAINS):
        assert len(splits.in_idx[env]) == len(listed[f"{domain}_train_kfold.txt"])
        assert len(splits.out_idx[env]) == len(listed[f"{domain}_crossval_kfold.txt"])
    assert [len(i) + len(o) for i, o in zip(splits.in_idx, splits.out_idx)] == [2047, 2344, 1670, 3929]
    used = set(rel_files(dataset, 0, splits.in_idx[0])) | set(rel_files(dataset, 0, splits.out_idx[0]))
    assert "art_painting/dog/pic_249.jpg" not in used  # in the test list only


# ----- unreadable images


def test_image_check_is_cheap_and_refuses_only_what_cannot_be_decoded(tmp_path, monkeypatch):
    decoded = []
    full_decode = image_folder.decode
    monkeypatch.setattr(image_folder, "decode", lambda path: decoded.append(path) or full_decode(path))
    good = jpeg_bytes()
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png, "PNG")
    files = {"good.jpg": good, "png_named.jpg": png.getvalue(), "trailing.jpg": good + b"\0\0\0\0",
             "no_iend.png": png.getvalue()[:-12], "truncated.jpg": good[: len(good) // 2],
             "garbage.jpg": b"this is not an image" * 4, "empty.jpg": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    problems = {name: image_problem(str(tmp_path / name)) for name in files}
    assert problems["good.jpg"] is problems["png_named.jpg"] is None
    assert problems["trailing.jpg"] is problems["no_iend.png"] is None  # flagged by the cheap checks, decodable
    assert problems["truncated.jpg"].startswith("OSError: image file is truncated (")
    assert problems["garbage.jpg"] == problems["empty.jpg"] == "not an image format PIL can identify"
    # only the files failing the cheap checks were decoded in full
    assert sorted(Path(p).name for p in decoded) == ["empty.jpg", "garbage.jpg", "no_iend.png", "trailing.jpg",
                                                      "truncated.jpg"]


def test_unreadable_image_is_refused_up_front_naming_it(tmp_path):
    root = build_pacs(tmp_path)
    garbage = root / "PACS" / "cartoon" / "elephant" / "pic_001.jpg"
    garbage.write_bytes(b"GIF89a but not really")
    with pytest.raises(UsageError) as e:
        load(root)
    assert str(e.value) == f"PACS: unreadable image {garbage} (not an image format PIL can identify): {SKIP_HINT}"
    truncated = root / "PACS" / "art_painting" / "dog" / "pic_002.jpg"
    truncated.write_bytes(jpeg_bytes()[:1000])
    with pytest.raises(UsageError) as e:
        load(root)
    assert str(e.value).startswith(f"PACS: unreadable image {truncated} (OSError: image file is truncated")
    assert str(e.value).endswith(f") (and 1 more): {SKIP_HINT}") and "\n" not in str(e.value)


def test_skip_bad_images_lists_them_once_and_leaves_them_out(tmp_path, capsys):
    root = build_pacs(tmp_path)
    write_lists(root)
    bad = [root / "PACS" / "art_painting" / "elephant" / "pic_000.jpg",
           root / "PACS" / "sketch" / "dog" / "pic_002.jpg"]
    for path in bad:
        path.write_bytes(b"\xff\xd8\xff garbage")
    dataset = load(root, skip_bad_images=True, pacs_splits=True)
    splits = dataset.split([0], 0, 0.2)
    assert capsys.readouterr().err == (
        f"warning: PACS: --skip-bad-images leaves out 2 unreadable image(s): {bad[0]}, {bad[1]}\n")
    assert dataset.left_out == [str(p) for p in bad]
    assert [len(d) for d in dataset.domains] == [5, 6, 6, 5]
    assert all(str(p) not in files for p in bad for files in dataset.files)
    assert dataset.domains[0].labels.tolist() == [0, 0, 0, 1, 1]
    assert dataset.domains[3].labels.tolist() == [0, 0, 1, 1, 1]
    x, _ = dataset.domains[0].batch(torch.arange(5))
    assert x.shape == (5, 3, 8, 8)
    # a skipped image is listed but not "absent": the lists are used, without it
    assert rel_files(dataset, 0, splits.in_idx[0]) == ["art_painting/dog/pic_000.jpg", "art_painting/dog/pic_001.jpg",
                                                       "art_painting/elephant/pic_001.jpg"]
    assert rel_files(dataset, 3, splits.out_idx[3]) == ["sketch/elephant/pic_002.jpg"]


def test_skipping_every_image_of_a_class_folder_is_refused(tmp_path):
    root = build_pacs(tmp_path, per_class=1)
    (root / "PACS" / "photo" / "dog" / "pic_000.jpg").write_bytes(b"")
    with pytest.raises(UsageError) as e:
        load(root, skip_bad_images=True)
    assert str(e.value) == (f"PACS: class folder {root / 'PACS' / 'photo' / 'dog'} holds no readable image: "
                            "replace its images")


def test_image_broken_after_the_check_is_one_line_at_decode_time(tmp_path):
    root = build_pacs(tmp_path, fmt="PNG")
    dataset = load(root)
    broken = root / "PACS" / "cartoon" / "elephant" / "pic_001.jpg"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(UsageError) as e:
        dataset.domains[1].batch(torch.arange(6))
    assert str(e.value) == (f"unreadable image {broken} (not an image format PIL can identify): "
                            "replace or delete the file")


# ----- python -m dg_meta.train


def test_cli_refuses_an_unreadable_image_in_one_line(tmp_path, capsys):
    root = build_pacs(tmp_path / "data")
    garbage = root / "PACS" / "photo" / "dog" / "pic_000.jpg"
    garbage.write_bytes(b"nope")
    code = main(["--algorithm", "ERM", "--dataset", "PACS", "--data-dir", str(root), "--device", "cpu",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: PACS: unreadable image {garbage} (not an image format PIL can identify): {SKIP_HINT}\n")


def test_skip_bad_images_flag_is_recorded_only_when_given():
    base = ["--algorithm", "ERM", "--dataset", "PACS"]
    assert "skip_bad_images" not in resolve_run(parse_args(base))["hparams"]
    assert resolve_run(parse_args([*base, "--skip-bad-images"]))["hparams"]["skip_bad_images"] is True
    with pytest.raises(UsageError) as e:
        resolve_run(parse_args(["--algorithm", "ERM", "--dataset", "RotatedDigits", "--skip-bad-images"]))
    assert str(e.value) == ("--skip-bad-images: only image-folder datasets (PACS, VLCS, ...) can leave out "
                            "unreadable images, not RotatedDigits; drop the flag")
