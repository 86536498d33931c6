"""``mpq eval``: the accuracy of a packed file, of a run's exact model or of an FP32 run."""

from __future__ import annotations

from pathlib import Path

from ..data import DataConfig, default_data_dir, load_splits
from ..engine import (
    Reporter,
    resolve_device,
)
from ..errors import MpqError
from ..models.loading import recorded_model
from ..packing.format import PackedFile, load_packed
from ..record import RunRecord
from .context import ModelOptions, check_forward, final_eval, in_session, place, setup, val_record
from .search import load_run


@in_session
def evaluate_run(
    target: str,
    data_overrides: dict | None = None,
    *,
    device: str | None = None,
    reporter: Reporter | None = None,
    model: str | None = None,
    verify: bool = True,
) -> dict:
    """Accuracy of a packed file, of a run's exactly quantized model, or of an ``mpq train`` run's FP model.

    On the whole validation (test) split, unless ``data_overrides`` sets ``limit_val_batches``.
    ``model`` names the user factory of a file or run made with one (never taken from the file).
    """
    overrides = {"device": device} if device else {}
    run_path = Path(target)
    if run_path.is_file():
        return evaluate_packed(run_path, data_overrides, device=device, reporter=reporter, model=model, verify=verify)
    # the whole split unless asked: a run's --limit-val-batches bounded its in-training checks, not this measurement
    data_overrides = {"limit_val_batches": None, **(data_overrides or {})}
    if not (run_path / "config.json").is_file():
        raise MpqError(
            f"{target} not found"
            if not run_path.exists()
            else f"{target} is neither a packed file nor an mpq run directory (no config.json)"
        )
    record = RunRecord.load(run_path)
    if record.is_quantized:
        _, ctx, _, data, train_cfg = load_run(target, data_overrides, overrides, model=model)  # exact weights
    else:
        data, train_cfg = record.data(data_overrides), record.training(overrides)
        spec = record.model_spec(model)
        ctx = setup(ModelOptions(spec.name, None, str(run_path / "model.safetensors")), data, train_cfg)
    result, held = final_eval(ctx, train_cfg.amp, reporter, "eval")
    return {
        "command": "eval",
        "run": str(target),
        "data": data.name,
        "synthetic": ctx.info.synthetic,
        **result,
        **val_record(ctx, held),
        "out": str(target),
    }


@in_session
def evaluate_packed(
    path: str | Path,
    data_overrides: dict | None = None,
    *,
    device: str | None = None,
    reporter: Reporter | None = None,
    model: str | None = None,
    verify: bool = True,
) -> dict:
    """Top-1 (and top-5) of the model decoded from a packed file, on the data recorded in it by default.

    The whole validation (test) split unless ``data_overrides`` sets ``limit_val_batches``; the result's
    ``top1_at_export`` was measured on the run's ``limit_val_batches_at_export`` batches (``None``: all).

    ``model`` names the user factory of a file made with one (never taken from the file).
    """
    packed = PackedFile.open(path)
    spec = recorded_model(packed.header["model"], str(path), model)
    net = load_packed(path, model=model, verify=verify)
    header = packed.header
    recorded = header.get("eval") if isinstance(header.get("eval"), dict) else {}
    recorded_data = recorded.get("data") if isinstance(recorded.get("data"), dict) else {}
    fields = {
        "name": (header.get("data") or {}).get("name", "fashion-mnist"),
        **{k: v for k, v in recorded_data.items() if k in _REPLAYED_DATA_FIELDS},
        "data_dir": default_data_dir(),
        **(data_overrides or {}),
    }
    try:
        data = DataConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise MpqError(f"{path}: malformed eval record in the header ({exc})") from None
    if data.input_size is not None and tuple(data.input_size) != (spec.in_channels, *spec.input_size):
        raise MpqError(
            f"{path}: the eval record's input size {list(data.input_size)} is not the model's "
            f"{[spec.in_channels, *spec.input_size]}"
        )
    seed = recorded.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MpqError(f"{path}: malformed eval record in the header (seed {seed!r})")
    splits = load_splits(data, channels=spec.in_channels, default_input=(spec.in_channels, *spec.input_size), seed=seed)
    if splits.info.num_classes != spec.num_classes:
        raise MpqError(f"{data.name} has {splits.info.num_classes} classes; the packed model has {spec.num_classes}")
    ctx = place(net, spec, splits, resolve_device(device or "auto"))
    check_forward(ctx.model, ctx.test, spec)
    result, held = final_eval(ctx, False, reporter, "eval")
    return {
        "command": "eval",
        "file": str(path),
        "data": data.name,
        "synthetic": splits.info.synthetic,
        **result,
        **val_record(ctx, held),
        "top1_at_export": (header.get("source") or {}).get("top1"),
        "limit_val_batches_at_export": _recorded_limit(recorded_data.get("limit_val_batches")),
        "out": str(path),
    }


def _recorded_limit(value) -> int | None:
    """A file's record of its run's --limit-val-batches, for display: a positive int, else None (all, or unreadable)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


_REPLAYED_DATA_FIELDS = ("name", "batch_size", "input_size", "augment", "normalize", "val_split", "val_split_seed")
