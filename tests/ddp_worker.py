"""Run under torchrun by tests/test_distributed.py (not a test module): every method's search on a
small lenet5 run, a sharded evaluation, and a forced disagreement; each rank writes what it saw to
``OUT/rank-N.json``."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from mpq_cli import api, distributed, engine
from mpq_cli.data import DataConfig
from mpq_cli.errors import MpqError

# one per method; budgets each method can meet on lenet5 (BMPQ counts the sign)
METHODS = {
    "uniform": {"target_bits": 2},
    # PACT's first-batch clip is agreed across ranks. The exact budget probe: on this model at chance every option
    # is within +-0.004 of the base loss, and the screen's finalists are chosen on estimates, a discrete choice
    # that the last bits by which one and two processes differ can flip (features.3 at 3 bits in one process and
    # 1 in two, both schemes lowering the probe loss); BSQ runs the screen under torchrun and matches
    "csq": {"target_bits": 3, "act_bits": 4, "budget_probe": "exact"},
    "bsq": {"target_bits": 3},
    "bmpq": {"target_bits": 3, "bits": [2, 4]},
    "alq": {"target_bits": 2, "act_bits": 2},  # and ALQ's basis activations fit on every rank's batch
}
PER_RANK_BATCH = 16
VAL_SPLIT = 64  # the FP run's hold-out (--val-split)
TRAIN = {"epochs": 2, "seed": 0, "device": "cpu"}


def data(batch_size: int) -> DataConfig:
    return DataConfig("synthetic", batch_size=batch_size, limit_train_batches=4, augment=False)


def main(out: Path) -> None:
    with distributed.session() as here:
        seen: dict = {"rank": here.rank, "size": here.size, "runs": {}}
        for method, config in METHODS.items():
            options = api.SearchOptions(method, config, probe_batches=2)
            summary = api.search(
                api.ModelOptions("lenet5"), data(PER_RANK_BATCH), TRAIN, options, out=str(out / method)
            )
            _, _, saved, _, _ = api.load_run(out / method)  # the run rank 0 wrote, read back on every rank
            seen["runs"][method] = {**summary, "saved_sha256": distributed.digest(saved.agreement_tensors())}
        seen["eval"] = api.evaluate_run(str(out / "uniform"))
        seen["finetune"] = api.finetune(str(out / "bmpq"), {"epochs": 1, "device": "cpu"}, out=str(out / "bmpq-ft"))
        # with a hold-out: every rank must hold out the same images (a different one would train apart)
        held = replace(data(PER_RANK_BATCH), val_split=VAL_SPLIT)
        seen["train"] = api.train(api.ModelOptions("lenet5"), held, TRAIN, out=str(out / "fp"))
        try:
            distributed.check_agreement({"value": str(here.rank)}, "a value that differs on purpose")
        except MpqError as exc:
            seen["disagreement"] = str(exc)
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        torch.nn.init.zeros_(model[0].weight)
        with torch.no_grad():
            model[1].bias.fill_(here.rank)  # one parameter differs between the ranks
        try:
            engine.check_ranks_agree(model, engine.PlainTraining(), epoch=2)
        except MpqError as exc:
            seen["epoch_disagreement"] = str(exc)
        (out / f"rank-{here.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
