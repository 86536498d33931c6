import torch

from mpq_cli.data import DataConfig, TensorBatches, _random_crop, load_data


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
