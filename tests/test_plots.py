"""Charts (issue 17): bits per layer and training curves, written as PNGs beside report.md and by inspect --plot."""

import pytest
from conftest import invoke

from mpq_cli.plots import bits_chart, layer_type, training_chart

PNG = b"\x89PNG\r\n\x1a\n"


def _image_size(path):
    from matplotlib.image import imread

    height, width = imread(path).shape[:2]
    return width, height


def test_layer_types():
    assert layer_type("linear", [10, 84]) == "linear"
    assert layer_type("conv2d", [64, 32, 1, 1]) == "pointwise conv"
    assert layer_type("conv2d", [32, 1, 3, 3]) == "depthwise conv"
    assert layer_type("conv2d", [20, 1, 5, 5], first=True) == "conv"  # a grayscale stem, not depthwise
    assert layer_type("conv2d", [64, 3, 7, 7]) == "conv"


def test_search_run_draws_its_charts_and_report_embeds_them(csq_run):
    run_dir = csq_run[0]
    report = (run_dir / "report.md").read_text()
    for name in ("bits.png", "training.png"):
        assert (run_dir / name).read_bytes().startswith(PNG)
        assert f"]({name})" in report
    assert not list(run_dir.glob(".*.tmp"))


def test_bits_chart_grows_with_the_layer_count(tmp_path):
    def layers(n):
        return [
            {
                "name": f"layer{i}.conv",
                "kind": "conv2d",
                "shape": [64, 64, 3, 3],
                "params": 36864,
                "bits": 2 + i % 4,
                "stored_bits": 3 + i % 4,
            }
            for i in range(n)
        ]

    small = bits_chart(layers(4), tmp_path / "small.png", "4 layers")
    large = bits_chart(layers(54) + [{**layers(1)[0], "name": "fc", "bits": None}], tmp_path / "large.png", "55")
    # resnet50's 54 layers keep a readable bar each: at least 20 px per layer
    assert _image_size(large)[0] >= 55 * 20 > _image_size(small)[0]


def test_training_chart_needs_an_epoch(tmp_path):
    assert training_chart([{"stage": "final", "top1": 1.0}], tmp_path / "t.png", "none") is None
    assert not (tmp_path / "t.png").exists()
    records = [
        {
            "stage": "search",
            "epoch": e,
            "val_top1": 50 + e,
            "train_acc": 40 + e,
            "val_loss": 1 / (e + 1),
            "train_loss": 1.2 / (e + 1),
            "avg_bits": 8 - e,
        }
        for e in range(3)
    ] + [{"stage": "finetune", "epoch": 0, "val_top1": 60, "train_acc": 55, "val_loss": 0.2, "train_loss": 0.3}]
    assert training_chart(records, tmp_path / "t.png", "curves").read_bytes().startswith(PNG)


def test_inspect_plot_of_a_file(csq_run, tmp_path):
    from conftest import run_json

    packed = tmp_path / "m.safetensors"
    run_json("export", csq_run[0], "-o", packed)
    out = tmp_path / "bits.png"
    result = invoke("inspect", packed, "--plot", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG)


@pytest.mark.parametrize("name", ["bits.txt", "missing/bits.png"])
def test_inspect_plot_refuses_a_bad_path(csq_run, tmp_path, name):
    result = invoke("inspect", csq_run[0], "--plot", tmp_path / name)
    assert result.exit_code != 0
    assert "--plot" in result.output and "Traceback" not in result.output
    assert not (tmp_path / name).exists()
