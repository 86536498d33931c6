"""--val-split: a fixed, seeded, class-balanced hold-out of the training split that every in-training
check and the budget steps' loss probe read, while the test split is measured once at the end."""

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, invoke

from mpq_cli.data import VAL_SPLIT_SEED, DataConfig, TensorBatches, load_splits, split_holdout
from mpq_cli.errors import MpqError
from mpq_cli.rundir import fingerprint

TRAIN_PER_CLASS, CLASSES = 5, 10


def _write_idx(path: Path, array: torch.Tensor) -> None:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + dims + array.numpy().tobytes())


@pytest.fixture
def mnist_ids(tmp_path):
    """A tiny MNIST in idx files whose every training image carries its index in its first pixel (its id):
    50 training images, 5 per class; 10 test images with ids from 200 on."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    n = TRAIN_PER_CLASS * CLASSES
    for prefix, ids in (("train", torch.arange(n)), ("t10k", torch.arange(200, 210))):
        images = torch.zeros(len(ids), 4, 4, dtype=torch.uint8)
        images[:, 0, 0] = ids.to(torch.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", (ids % CLASSES).to(torch.uint8))
    return tmp_path


def _ids(batches: TensorBatches) -> list[int]:
    """The first-pixel ids of what ``batches`` yields (normalised back to pixels), in order."""
    mean, std = batches.mean.flatten()[0], batches.std.flatten()[0]
    return [round(float(v)) for x, _ in batches for v in (x[:, 0, 0, 0] * std + mean) * 255]


# -- the split itself ---------------------------------------------------------------------------------
@pytest.mark.parametrize("val_split", [7, 0.25], ids=["count", "fraction-floored"])
def test_split_holdout_is_class_balanced_with_the_remainder_to_the_lowest_classes(val_split):
    labels = torch.tensor([0] * 10 + [1] * 12 + [2] * 8)[torch.randperm(30, generator=torch.Generator().manual_seed(3))]
    train, held = split_holdout(labels, val_split, 3)
    # 7 images (0.25 * 30 = 7.5, floored): 7 // 3 = 2 per class, the remainder one to class 0
    assert torch.bincount(labels[held], minlength=3).tolist() == [3, 2, 2]
    assert sorted(train.tolist() + held.tolist()) == list(range(30))
    assert train.tolist() == sorted(train.tolist())
    again_train, again_held = split_holdout(labels, val_split, 3)
    assert torch.equal(held, again_held) and torch.equal(train, again_train)
    assert not torch.equal(split_holdout(labels, val_split, 3, seed=VAL_SPLIT_SEED + 1)[1], held)


@pytest.mark.parametrize(
    "val_split,fragment",
    [
        (30, "must leave some"),
        (0.05, "at least one per class (3)"),
        (2, "at least one per class (3)"),
        (25, "class 2 has 8 training images"),
    ],
    ids=["all", "fraction-too-small", "fewer-than-classes", "class-too-small"],
)
def test_split_holdout_refuses_what_it_cannot_hold_out(val_split, fragment):
    labels = torch.tensor([0] * 10 + [1] * 12 + [2] * 8)
    with pytest.raises(MpqError) as err:
        split_holdout(labels, val_split, 3)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_hold_out_is_the_same_images_whatever_the_seed_and_never_trained_on(mnist_ids):
    cfg = DataConfig("mnist", data_dir=str(mnist_ids), batch_size=8, val_split=20)
    first = load_splits(cfg, seed=0)
    other = load_splits(cfg, seed=7)
    held = _ids(first.val)
    assert first.val_images == len(held) == 20 and _ids(other.val) == held
    assert torch.bincount(first.val.labels, minlength=CLASSES).tolist() == [2] * CLASSES
    trained = _ids(first.train)
    assert sorted(trained + held) == list(range(TRAIN_PER_CLASS * CLASSES))  # disjoint, and nothing lost
    assert sorted(_ids(other.train)) == sorted(trained)  # another --seed shuffles the same training images
    assert _ids(first.test) == list(range(200, 210))
    # the hold-out is read like the test split: in one fixed order, unaugmented
    assert first.val.split == "holdout" and not first.val.shuffle and first.val.crop_padding == 0
    assert not first.val.flip and first.checks is first.val


def test_every_rank_reads_its_share_of_the_same_hold_out(mnist_ids):
    cfg = DataConfig("mnist", data_dir=str(mnist_ids), batch_size=4, val_split=0.4)
    whole = _ids(load_splits(cfg).val)
    shards = [_ids(load_splits(cfg, seed=rank).val.shard(rank, 2)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(whole) and not set(shards[0]) & set(shards[1])


def _write_images(root: Path, sizes: dict[str, tuple[int, int]], per_class: int) -> None:
    from PIL import Image

    for split, count in (("train", per_class), ("test", 1)):
        for c, (name, size) in enumerate(sizes.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", size, (40 * c, i, 0)).save(root / split / name / f"{i}.png")


@pytest.mark.parametrize("mixed", [False, True], ids=["cached", "streamed"])
def test_image_folders_hold_out_class_balanced_unaugmented_images(tmp_path, mixed):
    sizes = {"a": (12, 12), "b": (12, 12), "c": (16, 16) if mixed else (12, 12)}
    _write_images(tmp_path / "imgs", sizes, per_class=4)
    cfg = DataConfig(f"imagefolder:{tmp_path / 'imgs'}", batch_size=4, input_size=(3, 12, 12), workers=0, val_split=3)
    splits = load_splits(cfg)
    assert splits.val_images == 3 and splits.val.split == "holdout"
    if mixed:  # the streaming path: subsets of the training folder, the hold-out through the evaluation transform
        train_idx, held_idx = splits.train.dataset.indices, splits.val.dataset.indices
        assert not set(train_idx) & set(held_idx) and len(train_idx) + len(held_idx) == 12
        names = {type(t).__name__ for t in splits.val.dataset.dataset.transform.transforms}
        assert not any(n.startswith("Random") for n in names)
        labels = [y for _, ys in splits.val for y in ys.tolist()]
    else:
        assert len(splits.train.labels) == 9 and not splits.val.flip and splits.val.crop_padding == 0
        labels = splits.val.labels.tolist()
    assert sorted(labels) == [0, 1, 2]


# -- the record -----------------------------------------------------------------------------------
OLD_DATA = {
    "name": "synthetic",
    "data_dir": "data",
    "batch_size": 32,
    "input_size": [1, 8, 8],
    "limit_train_batches": 3,
    "limit_val_batches": None,
    "augment": True,
    "workers": 4,
}


def test_a_config_without_the_field_loads_and_keeps_its_fingerprint():
    cfg = DataConfig(**OLD_DATA)
    assert cfg.val_split is None and load_splits(cfg).val is None
    restored = json.loads(json.dumps(cfg.to_dict()))
    assert restored == {**OLD_DATA} and fingerprint({"data": restored}) == fingerprint({"data": OLD_DATA})


def test_a_split_is_recorded_with_its_seed_and_round_trips():
    cfg = DataConfig(**OLD_DATA, val_split="0.1")
    saved = cfg.to_dict()
    assert saved["val_split"] == 0.1 and saved["val_split_seed"] == VAL_SPLIT_SEED
    assert DataConfig(**json.loads(json.dumps(saved))) == cfg
    assert fingerprint({"data": saved}) != fingerprint({"data": OLD_DATA})


@pytest.mark.parametrize("value", ["0", "1.0", "-3", "ten", "1.5", "600"], ids=str)
def test_bad_values_are_refused_in_one_line(tmp_path, value):
    result = invoke(
        "train", "--model", "lenet5", *SMALL, "--epochs", "1", "--val-split", value, "--out", tmp_path / "r"
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "--val-split" in result.output


# -- what reads it ------------------------------------------------------------------------------------
def _accuracy(model: torch.nn.Module, batches) -> float:
    """Top-1 in percent by hand (argmax over every batch), apart from the engine's evaluate."""
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(1) == y).float() for x, y in batches]
    return 100.0 * float(torch.cat(hits).mean())


def test_a_search_checks_and_probes_on_the_hold_out_and_measures_the_test_split_once(
    tmp_path, tiny_factory_file, monkeypatch
):
    from mpq_cli import api, engine

    evaluated = {"fit": [], "api": []}
    probed = []

    def recording(where, real):
        def evaluate(model, batches, **kwargs):
            evaluated[where].append(batches.split)
            return real(model, batches, **kwargs)

        return evaluate

    def probe(model, batches, max_batches):
        probed.append((batches.split, max_batches))
        return engine.loss_probe(model, batches, max_batches)

    monkeypatch.setattr(engine, "evaluate", recording("fit", engine.evaluate))
    from mpq_cli.commands import context, search

    for command in (context, search):  # every command module that measures outside the training loop
        monkeypatch.setattr(command, "evaluate", recording("api", command.evaluate))
    monkeypatch.setattr(context, "loss_probe", probe)
    data = DataConfig("synthetic", batch_size=32, input_size=(1, 8, 8), limit_train_batches=2, val_split=40)
    summary = api.search(
        api.ModelOptions(tiny_factory_file),
        data,
        {"epochs": 2, "device": "cpu"},
        api.SearchOptions("csq", {"target_bits": 3}, probe_batches=1),
        out=str(tmp_path / "run"),
    )
    assert evaluated["fit"] == ["holdout", "holdout"] and probed == [("holdout", 1)]
    assert evaluated["api"] == ["test", "holdout"]  # the test split once, at the end
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_set"] for r in records if r["stage"] == "search"] == ["holdout", "holdout"]
    assert summary["val_images"] == 40
    # top1 is the test split's and val_top1 the hold-out's, each measured again here by hand
    _, ctx, _, _, _ = api.load_run(tmp_path / "run", model=tiny_factory_file)
    splits = load_splits(data, default_input=(1, 8, 8))
    assert summary["top1"] == pytest.approx(_accuracy(ctx.model, splits.test))
    assert summary["val_top1"] == pytest.approx(_accuracy(ctx.model, splits.val))
    assert len(ctx.train.labels) == 512 - 40  # a finetune of the run trains without the hold-out too
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["val_split"] == 40
