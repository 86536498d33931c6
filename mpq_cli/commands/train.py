"""``mpq train``: the FP32 reference every search starts from."""

from __future__ import annotations

import json
from pathlib import Path

from .. import distributed
from ..data import DataConfig
from ..engine import (
    Reporter,
    TrainConfig,
    fit,
)
from ..models import unique_state_dict
from ..record import RunRecord
from ..rundir import (
    save_safetensors,
    versions,
    write_json,
)
from .context import Context, ModelOptions, final_eval, in_session, new_head_record, setup, training, val_record
from .runs import claim_run_dir, resume_state

# --------------------------------------------------------------------------------------- train
# The FP32 baseline's schedule (``mpq train``'s defaults).
FP_DEFAULTS = {"epochs": 12, "optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "schedule": "cosine"}


@in_session
def train(
    model: ModelOptions,
    data: DataConfig,
    train_cfg: TrainConfig | dict | None = None,
    *,
    out: str | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Train the FP32 baseline and write ``RUN/model.safetensors`` (the reference for every search).

    ``train_cfg``: a TrainConfig, or a dict of settings over :data:`FP_DEFAULTS` (12 epochs of Adam 2e-3).
    """
    reporter = reporter or Reporter()
    train_cfg = training(train_cfg, FP_DEFAULTS)
    ctx = setup(model, data, train_cfg, reporter)
    record = RunRecord.for_train(
        model=ctx.spec.to_dict(),
        checkpoint=model.checkpoint,
        head=new_head_record(model, ctx),
        data=ctx.data,
        train=train_cfg,
    )
    with claim_run_dir(out, "train", model.name, resume) as run_dir:
        state = resume_state(run_dir, resume, "train", record.fingerprint, reporter)
        if distributed.world().is_main:
            record.save(run_dir)
        fit(
            ctx.model,
            ctx.train,
            ctx.val,
            train_cfg,
            run_dir=run_dir,
            stage="train",
            reporter=reporter,
            resume=state,
            fingerprint=record.fingerprint,
        )
        return _finish_train(run_dir, ctx, model, data, train_cfg, reporter)


def _finish_train(
    run_dir: Path, ctx: Context, model: ModelOptions, data: DataConfig, train_cfg: TrainConfig, reporter: Reporter
) -> dict:
    final, held = final_eval(ctx, train_cfg.amp, reporter)
    if not distributed.world().is_main:
        return {**distributed.broadcast_object(None), "rank": distributed.world().rank}  # once rank 0 wrote it
    metadata = {
        "mpq.model": json.dumps(ctx.spec.to_dict()),
        "mpq.data": data.name,
        "mpq.top1": f"{final['top1']:.4f}",
        "mpq.version": versions()["mpq"],
    }
    save_safetensors(run_dir / "model.safetensors", unique_state_dict(ctx.model), metadata)
    summary = {
        "command": "train",
        "model": model.name,
        "data": data.name,
        "synthetic": ctx.info.synthetic,
        "top1": final["top1"],
        "top5": final.get("top5"),
        "samples": final.get("samples"),
        "split_samples": final.get("split_samples"),
        "loss": final["loss"],
        **val_record(ctx, held),
        "params": sum(p.numel() for p in ctx.model.parameters()),
        "checkpoint": str(run_dir / "model.safetensors"),
        "out": str(run_dir),
    }
    write_json(run_dir / "summary.json", summary)
    return distributed.broadcast_object(summary)  # the other ranks return when the run is written
