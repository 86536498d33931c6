"""CIFAR-10 as a first-class dataset: JPEG folders and archives decoded once into a cache,
torchvision's python batches read without unpickling code, image folders with test/."""

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke

from mpq_cli.data import CIFAR10_CLASSES, DataConfig, load_data
from mpq_cli.errors import MpqError

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def _image(seed: int, size=(32, 32)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8)


def _write_folder(root: Path, per_class=(3, 2), classes=CIFAR10_CLASSES, size=(32, 32), held_out="test"):
    """PNG files (lossless, so decoding returns the exact pixels): ``train/<class>/i.png``, ``<held_out>/...``."""
    from PIL import Image

    expected = {}
    for split, count in zip(("train", held_out), per_class, strict=True):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = _image(hash((split, c, i)) % 2**31, size)
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split / name / f"{i:04d}.png")
                expected[(split, name, i)] = img
    return expected


def test_a_cifar10_image_folder_is_decoded_once_into_a_cache(tmp_path, monkeypatch):
    expected = _write_folder(tmp_path / "cifar10")
    info, train, val = load_data(DataConfig("cifar10", data_dir=str(tmp_path), batch_size=8))
    assert info.num_classes == 10 and info.input_size == (32, 32) and info.in_channels == 3
    assert train.images.shape == (30, 3, 32, 32) and val.images.shape == (20, 3, 32, 32)
    # the labels follow CIFAR-10's class order (airplane 0 ... truck 9); the images are stored in a fixed
    # shuffled order, so that the first batches (--limit-val-batches) are not all airplanes
    assert sorted(train.labels.tolist()) == [c for c in range(10) for _ in range(3)]
    assert train.labels[:10].unique().numel() > 3
    for (split, name, _), img in expected.items():
        images, labels = (train, val)[split == "test"].images, (train, val)[split == "test"].labels
        match = [i for i in range(len(labels)) if torch.equal(images[i], img)]
        assert len(match) == 1 and labels[match[0]] == CIFAR10_CLASSES.index(name)
    caches = list((tmp_path / "cifar10" / ".mpq-cache").glob("*.safetensors"))
    assert len(caches) == 1
    import mpq_cli.datasets as datasets

    monkeypatch.setattr(datasets, "_decode_all", lambda *a: pytest.fail("decoded again instead of reading the cache"))
    _, again, _ = load_data(DataConfig("cifar10", data_dir=str(tmp_path), batch_size=8))
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


def test_a_changed_dataset_replaces_its_cache_and_leaves_other_datasets_caches(tmp_path):
    """Each cache is a full copy of the dataset: a dataset whose files changed gets a new cache, and its old one
    goes; a cache of another source with the same file name stays."""
    _write_folder(tmp_path / "cifar10")
    load_data(DataConfig("cifar10", data_dir=str(tmp_path), batch_size=8))
    folder = tmp_path / "cifar10" / ".mpq-cache"
    (first,) = folder.glob("*.safetensors")
    from mpq_cli.rundir import save_safetensors

    elsewhere = folder / "cifar10.0123456789abcdef.mpq-cache.safetensors"  # same name, another source
    save_safetensors(elsewhere, {"x": torch.zeros(1)}, {"mpq.source": str(tmp_path / "other" / "cifar10")})
    _write_folder(tmp_path / "cifar10", per_class=(4, 2))  # one more training image per class: a new key
    _, train, _ = load_data(DataConfig("cifar10", data_dir=str(tmp_path), batch_size=8))
    assert train.images.shape[0] == 40
    remaining = sorted(folder.glob("*.safetensors"))
    assert first not in remaining and elsewhere in remaining and len(remaining) == 2


def test_an_archive_of_the_folders_reads_the_same(tmp_path):
    _write_folder(tmp_path / "src")
    archive = tmp_path / "data" / "cifar10-images.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tmp_path / "src" / split, arcname=split)
    _, train, val = load_data(DataConfig("cifar10", data_dir=str(archive.parent), batch_size=8))
    _, folder_train, folder_val = load_data(DataConfig("cifar10", data_dir=str(tmp_path / "src"), batch_size=8))
    assert torch.equal(train.images, folder_train.images) and torch.equal(val.labels, folder_val.labels)


def _write_batches(folder: Path, payload=None):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 5)]:
        batch = payload or {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, count).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_torchvisions_python_batches_are_read_without_unpickling_code(tmp_path):
    _write_batches(tmp_path / "ok" / "cifar-10-batches-py")
    info, train, val = load_data(DataConfig("cifar10", data_dir=str(tmp_path / "ok"), batch_size=8))
    assert train.images.shape == (20, 3, 32, 32) and val.images.shape == (5, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and info.num_classes == 10

    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    _write_batches(tmp_path / "evil" / "cifar-10-batches-py", payload={"data": Evil(), "labels": [0]})
    with pytest.raises(MpqError, match="refused global"):
        load_data(DataConfig("cifar10", data_dir=str(tmp_path / "evil"), batch_size=8))
    assert not marker.exists()


def test_a_missing_cifar_says_where_to_put_it(tmp_path, monkeypatch):
    from torchvision.datasets import utils

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    result = invoke(
        "train", "--model", "resnet20", "--data", "cifar10", "--data-dir", tmp_path, "--out", tmp_path / "r"
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "cifar-10-batches-py" in result.output and "train/<class>" in result.output


def test_an_image_folder_with_test_and_one_image_size_is_cached_and_batched_in_memory(tmp_path):
    _write_folder(tmp_path / "imgs", per_class=(2, 1), classes=("cats", "dogs", "owls"), size=(24, 24))
    info, train, val = load_data(DataConfig(f"imagefolder:{tmp_path / 'imgs'}", batch_size=4))
    assert info.num_classes == 3 and info.input_size == (24, 24)
    assert train.images.shape == (6, 3, 24, 24) and sorted(val.labels.tolist()) == [0, 1, 2]
    x, _ = next(iter(train))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32


def test_an_empty_cifar_folder_is_one_line(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
    with pytest.raises(MpqError, match="no images"):
        load_data(DataConfig("cifar10", data_dir=str(tmp_path), batch_size=8))


@pytest.mark.realdata
def test_the_real_cifar10_jpegs_train_a_resnet20_on_a_slice(tmp_path):
    """A few hundred of the shipped JPEGs (the first 30 of each class in train/, 10 in test/), decoded and
    trained on for one short epoch: the real files, the real path, under a minute."""
    if not SHARED_CIFAR.is_file():
        if os.environ.get("MPQ_REQUIRE_REALDATA"):
            pytest.fail(f"{SHARED_CIFAR} missing")
        pytest.skip("the shared CIFAR-10 archive is not here")
    counts: dict[tuple[str, str], int] = {}
    wanted = {"train": 30, "test": 10}
    with tarfile.open(SHARED_CIFAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and counts.get(parts[:2], 0) < wanted[parts[0]]:
                counts[parts[:2]] = counts.get(parts[:2], 0) + 1
                target = tmp_path / "slice" / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    info, train, val = load_data(DataConfig("cifar10", data_dir=str(tmp_path / "slice"), batch_size=32))
    assert train.images.shape == (300, 3, 32, 32) and val.images.shape == (100, 3, 32, 32)
    assert train.labels.bincount().tolist() == [30] * 10
    mean = (train.images.float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.06)  # CIFAR-10's, on 300 images
    result = invoke(
        "train",
        "--model",
        "resnet20",
        "--data",
        "cifar10",
        "--data-dir",
        tmp_path / "slice",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
        "--json",
    )
    assert result.exit_code == 0, result.output


def test_input_size_resizes_a_small_image_dataset(tmp_path):
    """MobileNetV2's strides leave 1 px of a 32-px image: --input-size 3,96,96 upsamples CIFAR to 96 px, in the
    batches (after the crop and flip), and the model spec records 96 so a packed file rebuilds the same input."""
    _write_folder(tmp_path / "cifar10", per_class=(1, 1))
    info, train, val = load_data(DataConfig("cifar10", data_dir=str(tmp_path), batch_size=4, input_size=(3, 96, 96)))
    assert info.input_size == (96, 96) and train.images.shape[2:] == (32, 32)  # stored at 32, served at 96
    x, _ = next(iter(val))
    assert x.shape == (4, 3, 96, 96)
    plain = next(iter(load_data(DataConfig("cifar10", data_dir=str(tmp_path), batch_size=4))[2]))[0]
    expected = torch.nn.functional.interpolate(plain, size=(96, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(x, expected)


@pytest.mark.realdata
def test_the_shared_mobilenet_v2_backbone_loads_with_a_new_head():
    from mpq_cli.models.loading import ModelSpec, build_model, load_checkpoint

    path = SHARED_CIFAR.with_name("mobilenet_v2-imagenet-features.safetensors")
    if not path.is_file():
        if os.environ.get("MPQ_REQUIRE_REALDATA"):
            pytest.fail(f"{path} missing")
        pytest.skip("the shared MobileNetV2 backbone is not here")
    model = build_model(ModelSpec("mobilenet_v2", None, 10, 3, (96, 96)))
    initialised = load_checkpoint(model, path).initialised
    assert initialised == ["classifier.1.weight", "classifier.1.bias"]
    from safetensors.torch import load_file

    backbone = load_file(str(path))
    assert torch.equal(model.state_dict()["features.0.0.weight"], backbone["features.0.0.weight"])
    assert sum(v.numel() for v in backbone.values()) == 2_257_984  # every features.* tensor, as its README says
