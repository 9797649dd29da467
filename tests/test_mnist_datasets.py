"""RotatedDigits, RotatedMNIST and ColoredMNIST match their definitions."""

import numpy as np
import pytest
import torch
from dg_meta.datasets.digits import RotatedDigits, bundled_digits
from dg_meta.datasets.mnist import ColoredMNIST, RotatedMNIST, load_mnist

from dg_meta.errors import UsageError


def test_rotated_digits_domains():
    ds = RotatedDigits(None, {})
    assert [len(d) for d in ds.domains] == [300, 300, 300, 299, 299, 299]
    assert ds.domains[0].x.shape[1:] == (1, 16, 16) and ds.num_classes == 10
    assert 0.0 <= float(ds.domains[3].x.min()) and float(ds.domains[3].x.max()) <= 1.0
    other = RotatedDigits(None, {})
    assert torch.equal(ds.domains[5].x, other.domains[5].x)  # the shuffle seed is fixed
    # rotation moves ink into the corners that upright digits leave empty
    corner = (slice(None), 0, slice(0, 2), slice(0, 2))
    assert ds.domains[0].x[corner].sum() < ds.domains[5].x[corner].sum()


def test_bundled_digits_are_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    images, labels = bundled_digits()
    digits = load_digits()
    assert images.dtype == digits.images.dtype and np.array_equal(images, digits.images)
    assert labels.dtype == np.int64 and np.array_equal(labels, digits.target)


def test_rotated_mnist(mnist_root):
    ds = RotatedMNIST(str(mnist_root), {})
    assert ds.ENVIRONMENTS == ["0°", "15°", "30°", "45°", "60°", "75°"]
    assert sum(len(d) for d in ds.domains) == 70000
    assert {len(d) for d in ds.domains} == {11666, 11667}
    images, labels = load_mnist(str(mnist_root))
    assert torch.equal(torch.bincount(torch.cat([d.labels for d in ds.domains])), torch.bincount(labels))
    # domain 0 is made of untouched MNIST images: each one occurs in the raw set
    raw = {bytes(img.numpy()) for img in images[:70000:7]}
    domain0 = (ds.domains[0].x * 255).round().to(torch.uint8).squeeze(1)
    assert sum(bytes(img.numpy()) in raw for img in domain0) > 1000
    assert ds.domains[0].x.shape[1:] == (1, 28, 28)


def test_colored_mnist_correlations(mnist_root):
    ds = ColoredMNIST(str(mnist_root), {})
    assert ds.input_shape == (2, 28, 28) and ds.num_classes == 2
    for domain, flip in zip(ds.domains, [0.1, 0.2, 0.9]):
        red = domain.x[:, 0].flatten(1).sum(1) > 0
        green = domain.x[:, 1].flatten(1).sum(1) > 0
        assert not (red & green).any()
        color = green.long()  # colour 1 keeps channel 1
        agreement = (color == domain.labels).float().mean().item()
        assert abs(agreement - (1 - flip)) < 0.01, (flip, agreement)
    # label noise: labels disagree with (digit < 5) 25% of the time overall
    images, digits = load_mnist(str(mnist_root))
    perm = torch.randperm(70000, generator=torch.Generator().manual_seed(0))
    clean = (digits[perm][0::3] < 5).long()
    assert abs((clean != ds.domains[0].labels).float().mean().item() - 0.25) < 0.01


def test_missing_mnist_names_the_layout(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(UsageError, match=r"^MNIST not found: expected train-labels-idx1-ubyte, t10k-images-idx3-ubyte"):
        load_mnist(str(tmp_path))
