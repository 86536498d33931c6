import pytest
import torch

from mpq_cli.data import DataConfig, TensorBatches, _random_crop, load_data, normalisation, parse_normalize
from mpq_cli.errors import MpqError


def test_synthetic_is_shaped_for_the_model_and_learnable():
    info, train, val = load_data(DataConfig("synthetic", batch_size=64), default_input=(1, 28, 28), seed=0)
    x, y = next(iter(train))
    assert x.shape == (64, 1, 28, 28) and info.synthetic and info.num_classes == 10
    assert len(torch.unique(train.labels)) > 5  # labels come from a fixed projection, not one class


def test_shuffling_is_seeded_by_epoch():
    imgs = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    batches = TensorBatches(imgs, torch.arange(10), 10, (0.0,), (1.0,), shuffle=True, seed=1)
    first = next(iter(batches))[1].tolist()
    assert next(iter(batches))[1].tolist() == first
    batches.set_epoch(1)
    assert next(iter(batches))[1].tolist() != first
    assert sorted(first) == list(range(10))


def test_random_crop_keeps_shape_and_content_window():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(32, 1, 1, 1)
    out = _random_crop(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x[0, 0], (1, 1, 1, 1))
    offsets = set()
    for img in out:  # each crop is exactly a 4x4 window of the zero-padded image, at one of its 9 offsets
        found = [
            (dy, dx) for dy in range(3) for dx in range(3) if torch.equal(img[0], padded[dy : dy + 4, dx : dx + 4])
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) >= 5  # random per image, not one offset for the batch


def test_limit_batches():
    _, train, _ = load_data(DataConfig("synthetic", batch_size=16, limit_train_batches=3), default_input=(1, 8, 8))
    assert len(train) == 3 and sum(1 for _ in train) == 3


# -- --normalize -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("imagenet", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
        ("none", ((0.0,), (1.0,))),
        ("0.50196,0.50196", ((0.50196,), (0.50196,))),
        ("0.5/0.25", ((0.5,), (0.25,))),
        ("0.485,0.456,0.406/0.229,0.224,0.225", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
        ("0.1,0.2,0.3/0.5", ((0.1, 0.2, 0.3), (0.5,))),
        (" ImageNet ", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
        ("cifar10", ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    ],
    ids=["imagenet", "none", "mean-comma-std", "slash", "per-channel", "one-std", "case", "dataset"],
)
def test_normalize_parses(text, expected):
    assert parse_normalize(text) == expected
    assert DataConfig("synthetic", normalize=text).normalize == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("0.5", "expects MEAN/STD"),
        ("0.1,0.2,0.3", "expects MEAN/STD"),
        ("a/b", "expects MEAN/STD"),
        ("0.5/0.5/0.5", "expects MEAN/STD"),
        ("", "expects MEAN/STD"),
        ("0.5/0", "must be positive"),
        ("0.5/-0.2", "must be positive"),
        ("nan/1", "finite"),
        ("0.1,0.2/0.1,0.2,0.3", "2 means and 3 standard deviations"),
    ],
    ids=["one-value", "three-values", "words", "three-sides", "empty", "zero-std", "negative-std", "nan", "lengths"],
)
def test_bad_normalize_is_one_line_error(text, message):
    with pytest.raises(MpqError, match=message) as exc:
        DataConfig("synthetic", normalize=text)
    assert "\n" not in str(exc.value)


def test_normalize_needs_one_value_or_one_per_channel():
    with pytest.raises(MpqError, match="gives 3 values but the model takes 1 input channel: give 1 value"):
        load_data(DataConfig("synthetic", normalize="imagenet"), default_input=(1, 8, 8))
    assert normalisation("synthetic", 3, ((0.5,), (0.25,))) == ((0.5,) * 3, (0.25,) * 3)
    assert normalisation("mnist", 3) == ((0.1307,) * 3, (0.3081,) * 3)  # no --normalize: the dataset's


def test_the_batches_use_the_given_statistics():
    """Synthetic images are normalised like pixels when --normalize is given: (x - mean) / std per channel."""
    stats = ((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    cfg = DataConfig("synthetic", batch_size=8, augment=False)
    info, _, plain = load_data(cfg, default_input=(3, 4, 4))
    info_n, _, normed = load_data(DataConfig("synthetic", batch_size=8, normalize=stats), default_input=(3, 4, 4))
    assert (info.mean, info.std) == ((0.0,) * 3, (1.0,) * 3) and (info_n.mean, info_n.std) == stats
    x, _ = next(iter(plain))
    y, _ = next(iter(normed))
    for c in range(3):  # per channel, written out
        assert torch.allclose(y[:, c], (x[:, c] - stats[0][c]) / stats[1][c])


def test_uint8_images_are_scaled_then_normalised():
    imgs = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    x, _ = next(iter(TensorBatches(imgs, torch.arange(3), 3, (0.50196,), (0.50196,))))
    expected = (torch.tensor([0.0, 51.0, 255.0]) - 128) / 128  # (x * 255 - 128) / 128 in pixel units
    assert torch.allclose(x.flatten(), expected, atol=1e-4)
