"""Layers the way users write them: each quantized layer runs its module's own ``forward``.

A Conv2d subclass that pads in its forward (TensorFlow's SAME padding), a weight-standardised
conv, one conv applied twice under two names, grouped/depthwise/dilated convs with reflect and
circular padding, a Linear on 3-D input, and two models from PyPI zoos (timm, EfficientNet-PyTorch).
Each is checked at 8 bits against its FP model, and through export -> ``load_packed`` against the
run's own exact model, logit for logit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mpq_cli
from mpq_cli import api
from mpq_cli.data import DataConfig
from mpq_cli.layers import LayerSelection
from mpq_cli.methods import get_method
from mpq_cli.models import ModelSpec, build_model

USER_LAYERS = Path(__file__).with_name("userlayers.py")
OWN = ["same_padding", "weight_standardised", "shared", "conv_kinds", "linear_3d"]
ZOO = ["timm_same_padding", "efficientnet_pytorch_b0"]


def _spec(factory: str) -> ModelSpec:
    size = (32, 32) if factory in ZOO else (16, 16)
    return ModelSpec(f"{USER_LAYERS}:{factory}", None, 10, 3 if factory in ZOO else 1, size)


def _input(spec: ModelSpec) -> torch.Tensor:
    return torch.randn(4, spec.in_channels, *spec.input_size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("factory", OWN + ZOO)
def test_at_8_bits_every_layer_computes_its_own_forward(factory):
    torch.manual_seed(0)
    spec = _spec(factory)
    model = build_model(spec).eval()
    x = _input(spec)
    with torch.no_grad():
        fp = model(x)
    method = get_method("uniform")
    method = method(method.config_class.from_dict({"target_bits": 8}), LayerSelection())
    method.prepare(model)
    assert method.layers, "no layer was quantized"
    with torch.no_grad():
        quantized = model.eval()(x)
    assert quantized.shape == fp.shape
    # 8 bits + sign per weight: the logits move by far less than their spread (a skipped padding or
    # standardisation moves them by about their spread, or fails on shapes)
    assert (quantized - fp).abs().max() <= 0.05 * fp.std() + 1e-6, (quantized - fp).abs().max()


def test_a_module_registered_twice_is_one_quantized_layer():
    model = build_model(_spec("shared"))
    method = get_method("csq")
    method = method(method.config_class.from_dict({"target_bits": 3}), LayerSelection())
    method.prepare(model)
    assert model.shared is model.alias
    assert list(method.layers) == ["stem", "shared", "head.fc"]


def _search_export_load(tmp_path, factory: str, method: str, config: dict):
    spec = _spec(factory)
    run = tmp_path / "run"
    data = DataConfig(
        "synthetic",
        batch_size=8,
        input_size=(spec.in_channels, *spec.input_size),
        limit_train_batches=2,
        limit_val_batches=1,
    )
    summary = api.search(
        api.ModelOptions(spec.name),
        data,
        {"epochs": 1, "seed": 0, "device": "cpu", "lr": 0.01},
        api.SearchOptions(method, config, probe_batches=1),
        out=str(run),
    )
    api.export(run, tmp_path / "model.safetensors")
    _, ctx, _, _, _ = api.load_run(run, model=spec.name)
    packed = mpq_cli.load_packed(tmp_path / "model.safetensors", model=spec.name)
    # the run's model computes in channels_last, as mpq places every conv model (`mpq eval FILE` too)
    packed.to(memory_format=torch.channels_last)
    x = _input(spec).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return summary, ctx.model.eval()(x), packed(x), run


METHODS = {
    "uniform": {"target_bits": 3},
    "csq": {"target_bits": 3},
    "bsq": {"target_bits": 3},
    "bmpq": {"target_bits": 5, "bits": [2, 4, 6]},  # its sign included, and 16-bit edges
    "alq": {"target_bits": 2},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_searches_and_exports_a_conv_that_pads_in_its_forward(tmp_path, method):
    _, run_logits, file_logits, _ = _search_export_load(tmp_path, "same_padding", method, METHODS[method])
    assert torch.equal(run_logits, file_logits)


@pytest.mark.parametrize("factory", [f for f in OWN if f != "same_padding"] + ZOO)
def test_the_packed_file_computes_the_run_exactly(tmp_path, factory):
    summary, run_logits, file_logits, run = _search_export_load(tmp_path, factory, "uniform", {"target_bits": 4})
    assert torch.equal(run_logits, file_logits)
    measured = api.evaluate_packed(
        tmp_path / "model.safetensors", {"limit_val_batches": 1}, model=_spec(factory).name, device="cpu"
    )
    assert measured["top1"] == summary["top1"]


class _Attention(torch.nn.Module):
    def __init__(self, num_classes=10, in_channels=1, input_size=(16, 16)):
        super().__init__()
        self.embed = torch.nn.Conv2d(in_channels, 8, 4, stride=4)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(tokens, tokens, tokens)[0].mean(1))


def test_a_linear_whose_parent_reads_its_weight_stays_fp_and_the_model_still_runs():
    """MultiheadAttention passes out_proj.weight to its functional form instead of calling out_proj."""
    from mpq_cli.layers import quantizable_layers

    model = _Attention()
    assert list(quantizable_layers(model)) == ["embed", "head"]
    method = get_method("uniform")
    method = method(method.config_class.from_dict({"target_bits": 8}), LayerSelection())
    method.prepare(model)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_a_state_that_names_a_shared_tensor_once_loads_under_any_of_its_names():
    """unique_state_dict keeps the first name; other writers (safetensors' save_model) keep another."""
    from mpq_cli.models import unique_state_dict, with_aliases

    model = build_model(_spec("shared"))
    state = unique_state_dict(model)
    assert "shared.weight" in state and "alias.weight" not in state
    other = {("alias" + k[len("shared") :] if k.startswith("shared.") else k): v for k, v in state.items()}
    for saved in (state, other):
        fresh = build_model(_spec("shared"))
        fresh.load_state_dict(with_aliases(fresh, saved))
        assert torch.equal(fresh.shared.weight, model.shared.weight)


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


class _TakesArguments(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = _ScaledLinear(4, 3)

    def forward(self, x):
        return self.fc(x, scale=2.0)


def test_a_layer_whose_forward_takes_more_than_its_input_gets_it():
    torch.manual_seed(0)
    model, x = _TakesArguments(), torch.randn(2, 4)
    with torch.no_grad():
        fp = model(x)
    method = get_method("uniform")
    method = method(method.config_class.from_dict({"target_bits": 8}), LayerSelection())
    method.prepare(model)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), fp, atol=0.05 * fp.abs().max().item())


def test_a_layer_registered_twice_is_selected_by_either_name():
    for patterns in ({"keep_fp": ["alias"]}, {"keep_fp": ["shared"]}):
        model = build_model(_spec("shared"))
        method = get_method("csq")
        method = method(method.config_class.from_dict({"target_bits": 3}), LayerSelection(**patterns))
        method.prepare(model)
        assert list(method.layers) == ["stem", "head.fc"]
    model = build_model(_spec("shared"))
    method = get_method("uniform")
    method = method(method.config_class.from_dict({"target_bits": 3}), LayerSelection(fix_bits={"alias": 5}))
    method.prepare(model)
    assert method.layer_bits() == {"stem": 3, "shared": 5, "head.fc": 3}
