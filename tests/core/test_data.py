"""Dataset readers, transforms and the disjoint subset logic."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from compress.data.datasets import LabelledImages, SubsetRequest, select_subsets
from compress.data.idx import read_idx
from compress.data.imagefolder import list_image_folder, load_images
from compress.data.transforms import Preprocess
from compress.errors import ConfigError


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip_and_bad_files(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "x.gz", data)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), data)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ConfigError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(ConfigError, match="IDX file not found"):
        read_idx(tmp_path / "nope.gz")


def test_real_fashion_mnist_header(fashion_mnist: Path) -> None:
    labels = read_idx(fashion_mnist / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced


def _labelled(n: int) -> LabelledImages:
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1).repeat(4, 1).repeat(4, 2)
    return LabelledImages(images, np.arange(n) % 3, "train", np.arange(n), ("a", "b", "c"))


def test_evaluation_never_overlaps_train_or_calibration() -> None:
    full = _labelled(200)
    reqs = [
        SubsetRequest("evaluation", "train", 50),
        SubsetRequest("train", "train", 150),
        SubsetRequest("calibration", "train", 20),
    ]
    sets = select_subsets({"train": full}, reqs, seed=1)
    ev = set(sets["evaluation"].indices.tolist())
    assert len(ev) == 50
    assert not ev & set(sets["train"].indices.tolist())
    assert not ev & set(sets["calibration"].indices.tolist())
    # calibration may reuse training images, but both come from the non-evaluation pool
    assert set(sets["calibration"].indices.tolist()) <= set(sets["train"].indices.tolist())


def test_too_many_samples_is_a_config_error() -> None:
    full = _labelled(100)
    with pytest.raises(ConfigError, match="data.train.samples = 80: split 'train' has 50 images left"):
        select_subsets(
            {"train": full}, [SubsetRequest("evaluation", "train", 50), SubsetRequest("train", "train", 80)], 0
        )


def test_hash_follows_content() -> None:
    a = _labelled(10)
    same = LabelledImages(a.images.copy(), a.labels.copy(), "train", a.indices, a.classes)
    assert a.sha256 == same.sha256
    images = a.images.copy()
    images[3, 0, 0] += 1
    assert a.sha256 != LabelledImages(images, a.labels, "train", a.indices, a.classes).sha256
    labels = a.labels.copy()
    labels[0] = 2
    assert a.sha256 != LabelledImages(a.images, labels, "train", a.indices, a.classes).sha256


def test_preprocess_grey_to_normalised_rgb() -> None:
    grey = np.full((2, 28, 28), 255, dtype=np.uint8)
    out = Preprocess(size=56)(grey)
    assert out.shape == (2, 3, 56, 56) and out.dtype == np.float32
    # white pixels -> (1 - mean) / std per channel, exactly
    expected = [(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    np.testing.assert_allclose(out[0, :, 10, 10], expected, rtol=1e-6)


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(tmp_path / cls / f"{i}.png")
    files, labels, classes = list_image_folder(tmp_path)
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 1, 1]
    images = load_images(files, 16)
    assert images.shape == (4, 16, 16, 3)
    assert images[0, 8, 8].tolist() == [255, 0, 0] and images[3, 8, 8].tolist() == [0, 0, 255]
    with pytest.raises(ConfigError, match="no class sub-folders"):
        list_image_folder(tmp_path / "cat")
