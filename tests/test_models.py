import pickle

import pytest
import torch
from safetensors.torch import save_file

from mpq_cli.errors import MpqError
from mpq_cli.models import ModelSpec, build_model, load_checkpoint
from mpq_cli.models.loading import read_state_dict


@pytest.mark.parametrize("in_channels,size", [(1, (28, 28)), (3, (32, 32))], ids=["mnist", "cifar"])
def test_lenet5_adapts_to_input(in_channels, size):
    model = build_model(ModelSpec("lenet5", None, 10, in_channels, size))
    assert model(torch.zeros(2, in_channels, *size)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [20, 50]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [l.out_features for l in linears] == [500, 10]  # noqa: E741


def test_lenet5_is_the_deep_compression_lenet():
    model = build_model(ModelSpec("lenet5", None, 10, 1, (28, 28)))
    assert sum(p.numel() for p in model.parameters()) == 431080


def test_resnet20_has_the_paper_size():
    model = build_model(ModelSpec("resnet20", None, 100, 1, (28, 28)))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 100)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert weights == 276_368  # He et al.: 0.27M (here 1 input channel and 100 classes)


def test_torchvision_model_without_weights():
    model = build_model(ModelSpec("resnet18", None, 7, 3, (64, 64)))
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(MpqError, match="unknown model"):
        build_model(ModelSpec("no_such_net"))


def test_user_factory_from_file(tiny_factory_file):
    model = build_model(ModelSpec(tiny_factory_file, None, 5, 1, (8, 8)))
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 5)


def test_user_factory_missing_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    with pytest.raises(MpqError, match="no callable"):
        build_model(ModelSpec(f"{f}:make"))


@pytest.fixture
def state(tiny):
    return {k: v.clone() for k, v in tiny.state_dict().items()}


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module-prefix"])
def test_pt_checkpoint_variants_load(tiny, state, tmp_path, wrap):
    obj = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state},
        "module-prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "ck.pt"
    torch.save(obj, path)
    fresh = type(tiny)()
    load_checkpoint(fresh, path)
    assert torch.equal(fresh.conv.weight, tiny.conv.weight)


def test_safetensors_checkpoint_loads(tiny, state, tmp_path):
    path = tmp_path / "ck.safetensors"
    save_file(state, str(path), metadata={"mpq.top1": "90.0"})
    fresh = type(tiny)()
    loaded = load_checkpoint(fresh, path)
    assert (loaded.metadata, loaded.initialised, loaded.replaced) == ({"mpq.top1": "90.0"}, [], {})
    assert torch.equal(fresh.fc.weight, tiny.fc.weight)


def test_missing_and_unexpected_keys(tiny, state, tmp_path):
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "ck.pt"
    torch.save(state, path)
    with pytest.raises(MpqError, match=r"missing keys fc\.bias.*unexpected keys extra\.weight"):
        load_checkpoint(type(tiny)(), path)


def test_shape_mismatch(tiny, state, tmp_path):
    state["fc.weight"] = torch.zeros(3, 24)
    path = tmp_path / "ck.pt"
    torch.save(state, path)
    with pytest.raises(MpqError, match=r"shape mismatch fc\.weight \(3, 24\)"):
        load_checkpoint(type(tiny)(), path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tiny, tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(MpqError, match="cannot be loaded safely"):
        read_state_dict(path)
    torch.save({"w": torch.zeros(1), "evil": Evil()}, tmp_path / "evil2.pt")
    with pytest.raises(MpqError, match="cannot be loaded safely"):
        read_state_dict(tmp_path / "evil2.pt")


def test_garbage_safetensors_and_missing_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(MpqError, match="not a readable safetensors"):
        read_state_dict(bad)
    with pytest.raises(MpqError, match="not found"):
        read_state_dict(tmp_path / "nope.pt")


def test_a_backbone_without_the_classifier_loads_with_a_new_head(tiny, state, tmp_path):
    del state["fc.weight"], state["fc.bias"]
    path = tmp_path / "backbone.safetensors"
    save_file(state, str(path))
    fresh = type(tiny)()
    head = fresh.fc.weight.detach().clone()
    assert load_checkpoint(fresh, path).initialised == ["fc.weight", "fc.bias"]
    assert torch.equal(fresh.conv.weight, tiny.conv.weight) and torch.equal(fresh.fc.weight, head)


@pytest.mark.parametrize("drop", [["fc.bias"], ["fc.weight", "fc.bias", "bn.weight"], ["conv.weight"]])
def test_anything_but_exactly_the_classifier_missing_stays_an_error(tiny, state, tmp_path, drop):
    for key in drop:
        del state[key]
    path = tmp_path / "ck.safetensors"
    save_file(state, str(path))
    with pytest.raises(MpqError, match="missing keys"):
        load_checkpoint(type(tiny)(), path)


def test_the_cli_says_in_one_line_which_head_it_initialised(tmp_path):
    from conftest import invoke

    from mpq_cli.models.loading import ModelSpec, build_model

    model = build_model(ModelSpec("lenet5", None, 10, 1, (16, 16)))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.3.")}
    save_file(state, str(tmp_path / "backbone.safetensors"))
    result = invoke(
        "train",
        "--model",
        "lenet5",
        "--data",
        "synthetic",
        "--input-size",
        "1,16,16",
        "--epochs",
        "1",
        "--limit-train-batches",
        "1",
        "--device",
        "cpu",
        "--checkpoint",
        tmp_path / "backbone.safetensors",
        "--out",
        tmp_path / "run",
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "backbone" in line]
    assert lines == [
        f"checkpoint {tmp_path / 'backbone.safetensors'} is a backbone without the classifier: "
        "classifier.3.weight, classifier.3.bias initialised for 10 classes"
    ]


# -- --new-head: a full checkpoint whose classifier has another shape ------------------------------
@pytest.fixture
def imagenet_head_checkpoint(tiny, state, tmp_path):
    """``tiny``'s tensors with a 1000-class classifier, as an ImageNet checkpoint brings."""
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 24), torch.randn(1000)
    path = tmp_path / "imagenet.safetensors"
    save_file(state, str(path))
    return path, state


def test_another_head_is_refused_with_a_message_that_names_new_head(imagenet_head_checkpoint, tiny):
    path, _ = imagenet_head_checkpoint
    with pytest.raises(MpqError, match=r"classifier.*fc\.weight \(1000, 24\) vs model \(10, 24\).*--new-head") as exc:
        load_checkpoint(type(tiny)(), path)
    assert "\n" not in str(exc.value)


def test_new_head_reinitialises_only_the_classifier(imagenet_head_checkpoint, tiny):
    path, state = imagenet_head_checkpoint
    torch.manual_seed(1)
    fresh = type(tiny)()
    initial_head = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("fc.")}
    loaded = load_checkpoint(fresh, path, new_head=True)
    assert loaded.initialised == ["fc.weight", "fc.bias"]
    assert loaded.replaced == {"fc.weight": [1000, 24], "fc.bias": [1000]}
    after = fresh.state_dict()
    for key, value in after.items():
        if key.startswith("fc."):  # the model's own initialisation, with the model's shape
            assert torch.equal(value, initial_head[key]), key
        else:
            assert torch.equal(value, state[key]), key
    assert after["fc.weight"].shape == (10, 24)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.update({"conv.weight": torch.zeros(6, 1, 5, 5)}), r"shape mismatch conv\.weight"),
        (lambda s: s.pop("bn.running_mean"), r"missing keys bn\.running_mean"),
        (lambda s: s.update({"extra.weight": torch.zeros(1)}), r"unexpected keys extra\.weight"),
    ],
    ids=["shape-elsewhere", "missing", "unexpected"],
)
def test_new_head_leaves_every_other_mismatch_an_error(imagenet_head_checkpoint, tiny, tmp_path, edit, message):
    _, state = imagenet_head_checkpoint
    edit(state)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(MpqError, match=message):
        load_checkpoint(type(tiny)(), path, new_head=True)


def test_new_head_with_a_fitting_head_loads_it(tiny, state, tmp_path):
    path = tmp_path / "ck.safetensors"
    save_file(state, str(path))
    fresh = type(tiny)()
    loaded = load_checkpoint(fresh, path, new_head=True)
    assert loaded.replaced == {} and loaded.initialised == []
    assert torch.equal(fresh.fc.weight, tiny.fc.weight)


def test_weights_bring_their_own_input_statistics():
    from mpq_cli.models.loading import weights_normalisation

    # torchvision's ImageNet preset, read from the weights' transforms (nothing is downloaded)
    assert weights_normalisation("resnet18", "DEFAULT") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert weights_normalisation("resnet18", None) is None
    assert weights_normalisation("lenet5", None) is None


class _TwoNamedHead(torch.nn.Module):
    """A classifier registered under two names, as some zoos alias ``fc`` and ``classifier``."""

    def __init__(self, classes):
        super().__init__()
        self.features = torch.nn.Linear(6, 5)
        self.fc = torch.nn.Linear(5, classes)
        self.classifier = self.fc

    def forward(self, x):
        return self.classifier(self.features(x))


def test_new_head_replaces_a_classifier_registered_under_two_names(tmp_path):
    source = _TwoNamedHead(1000)
    path = tmp_path / "imagenet-head.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("classifier.")}, path)
    model = _TwoNamedHead(10)
    with pytest.raises(MpqError, match="--new-head"):
        load_checkpoint(model, path)
    loaded = load_checkpoint(model, path, new_head=True)
    assert sorted(loaded.replaced) == ["classifier.bias", "classifier.weight", "fc.bias", "fc.weight"]
    assert torch.equal(model.features.weight, source.features.weight)
    assert model.fc.weight.shape == (10, 5)
