"""The ``mpq`` command line: parse options, call one API function, print the result.

Results go to stdout (only the JSON object under ``--json``, strict RFC 8259 JSON);
progress, logs and errors go to stderr. A user error (bad option, bad input file, full
disk, ...) is one line and exit code 2; an unexpected failure one line and exit 1;
Ctrl-C or SIGTERM exit 130/143 after temporary files are removed.
"""

from __future__ import annotations

import enum
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import api
from .data import DATASETS, DataConfig, default_data_dir
from .engine import Reporter
from .errors import MpqError
from .layers import LayerSelection
from .methods import METHODS
from .rundir import dumps, loads

app = typer.Typer(
    name="mpq",
    help="Find mixed-precision weight quantization schemes for PyTorch vision models and ship them bit-packed. "
    "Several GPUs: torchrun --nproc-per-node N -m mpq_cli train|search|finetune|eval ... (README, Several GPUs).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
out_console = Console()
err_console = Console(stderr=True)

MethodName = enum.Enum("MethodName", {name: name for name in sorted(METHODS)}, type=str)


class RichReporter(Reporter):
    """Progress on stderr: on a terminal, a bar per epoch (steps, elapsed, ETA, loss, accuracy and the
    method's average bits) above one line per epoch; in a pipe, or with ``--json`` (whose stdout is
    the JSON alone), the epoch lines only; nothing with ``--quiet``."""

    def __init__(self, quiet: bool, bars: bool | None = None):
        self.quiet = quiet or _rank() != 0  # under torchrun, rank 0 speaks for every rank
        self.bars = err_console.is_terminal if bars is None else bars
        self.progress = None
        self.task = None

    def start(self, description, total):
        if self.quiet or not self.bars:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=err_console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="")

    def advance(self, steps=1, **fields):
        if self.progress is None:
            return
        info = " ".join(f"{k} {v:.3f}" if k != "beta" else f"β {v:.1f}" for k, v in fields.items())
        self.progress.update(self.task, advance=steps, info=info)

    def stop(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def log(self, message):
        if not self.quiet:
            err_console.print(message, highlight=False, markup=False, soft_wrap=True)


def _rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _json_error(message: str, exit_code: int, out=None) -> None:
    """Under ``--json`` a failure is still one object on stdout, so a script always has one to read:
    the message, the exit code, and the run directory or file it left, if any."""
    if _rank() != 0:
        return
    obj = {"error": message, "exit_code": exit_code}
    if out is not None and Path(out).exists():
        obj["out"] = str(out)
    sys.stdout.write(dumps(obj) + "\n")


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json, out = kwargs.get("as_json"), kwargs.get("out")

        def fail(message: str, code: int, prefix: str = "error: ") -> typer.Exit:
            err_console.print(f"{prefix}{message}", highlight=False, markup=False, soft_wrap=True)
            if as_json:
                _json_error(message, code, out)
            return typer.Exit(code)

        try:
            return fn(*args, **kwargs)
        except MpqError as exc:
            where = f"rank {_rank()}: " if _rank() else ""
            raise fail(f"{where}{exc}", 2) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130, prefix="") from None
        except _Terminated:
            raise fail("terminated", 143, prefix="") from None
        except typer.Exit:
            raise
        except OSError as exc:  # the disk is full or read-only, a path is not writable, ...: the user's to fix
            where = f"{exc.filename}: " if exc.filename else ""
            raise fail(f"{where}{exc.strerror or exc}", 2) from None
        except Exception as exc:  # an unexpected failure still ends in one line; MPQ_DEBUG=1 shows the traceback
            if os.environ.get("MPQ_DEBUG"):
                raise
            if _out_of_memory(exc):  # a resource the user chose (batch, input size, model), not a bug
                raise fail(
                    f"out of memory ({_first_line(exc)[:160]}); use a smaller --batch-size, input or model", 2
                ) from None
            raise fail(
                f"{exc.__class__.__name__}: {_first_line(exc)} (MPQ_DEBUG=1 shows the traceback)",
                1,
                prefix="internal error: ",
            ) from None

    return wrapper


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        raise MpqError(f"--input-size expects C,H,W (or H,W / H), got {text!r}") from None
    if len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    elif len(parts) == 2:
        parts = [3, *parts]
    if len(parts) != 3 or min(parts) < 1:
        raise MpqError(f"--input-size expects C,H,W (or H,W / H), got {text!r}")
    return tuple(parts)


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise MpqError(f"--set expects FIELD=VALUE, got {item!r}")
        if key.strip() == "version":
            raise MpqError("--set version: a config's version is mpq's to set, not an option")
        try:
            out[key.strip()] = loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _parse_method_options(args: list[str], method: str) -> dict:
    """``--field-name VALUE`` / ``--field-name=VALUE`` pairs left over by Typer -> the method's config fields."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(METHODS[method].config_class)} - {"version"}
    out, i = {}, 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise MpqError(f"unexpected argument {token!r}")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise MpqError(f"option --{key} needs a value")
            value, i = args[i + 1], i + 1
        name = key.replace("-", "_")
        if name not in fields:
            import difflib

            near = difflib.get_close_matches(name, sorted(fields), n=1)
            if near:
                raise MpqError(f"no such option --{key}; did you mean --{near[0].replace('_', '-')}? (`mpq methods`)")
            options = ", ".join("--" + f.replace("_", "-") for f in sorted(fields))
            raise MpqError(f"no such option --{key} (method {method} also takes: {options})")
        try:
            out[name] = loads(value)
        except ValueError:
            out[name] = value
        i += 1
    return out


# a scheme further than this under its ceiling gets a note: the search left bits unused
UNUSED_BITS_NOTE = 0.1


def _counted(summary: dict) -> str:
    """The summary key ``--target-bits`` caps (``--budget-on``)."""
    return "avg_counted_bits" if "avg_counted_bits" in summary else "avg_bits"


def _unit(summary: dict) -> str:
    return "stored bits" if summary.get("budget_on") == "stored" else "bits"


def _exit_if_over_budget(summary: dict) -> None:
    """``--target-bits`` is a ceiling. A finished search whose scheme is over it is written and reported,
    and the command still fails (exit 2): a script must not take "within budget: NO" for success. One
    that ends well under it succeeds and says how far under."""
    if summary.get("budget_met") is False and _rank() != 0:
        raise typer.Exit(2)  # rank 0 says why
    under = summary.get("bits_under_budget")
    if summary.get("budget_met") and under is not None and under > UNUSED_BITS_NOTE and _rank() == 0:
        err_console.print(
            f"note: the scheme ends at {summary[_counted(summary)]:.4f} average {_unit(summary)}, {under:.4f} "
            f"under the ceiling of "
            f"{summary['target_bits']:g} (see report.md for what the budget step could reach)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if summary.get("budget_met") is False:
        over = (
            f"over the ceiling of {summary['target_bits']:g}"
            if under is not None and under < 0
            else "outside the method's budget (its stored bits, or its byte budget)"
        )
        err_console.print(
            f"error: the scheme ends at {summary.get(_counted(summary), float('nan')):.4f} average "
            f"{_unit(summary)}, {over}; "
            f"the run is in {summary['out']} (budget_met false)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)


def _print_json(obj) -> None:
    if _rank() == 0:
        sys.stdout.write(dumps(obj) + "\n")


def _emit(summary: dict, as_json: bool, title: str) -> None:
    if _rank() != 0:  # under torchrun, rank 0 prints the result
        return
    if as_json:
        _print_json(summary)
        return
    from .report import rich_summary_table

    if "avg_bits" in summary:
        out_console.print(rich_summary_table(summary))
        out_console.print(f"run directory: {summary['out']}", highlight=False)
        return
    from .report import measured_on

    acc = f"top-1 {summary['top1']:.2f} %{measured_on(summary)}"
    if summary.get("top5") is not None:
        acc += f", top-5 {summary['top5']:.2f} %"
    if summary.get("val_top1") is not None:
        acc += f" on the test split; hold-out top-1 {summary['val_top1']:.2f} % ({summary['val_images']} images)"
    if summary.get("synthetic"):
        acc += "  (synthetic data: for smoke tests only)"
    out_console.print(f"{title}: {acc}", highlight=False)
    if summary.get("command") != "eval":
        out_console.print(f"written: {summary['out']}", highlight=False)


# Shared option types -------------------------------------------------------------------------
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Built-in (lenet5, resnet20, ...), torchvision name "
        "(resnet18, mobilenet_v2, ...), or package.module:factory / file.py:factory.",
    ),
]
WeightsOpt = Annotated[
    str | None, typer.Option(help="torchvision weights: DEFAULT, an enum name (IMAGENET1K_V1), or none.")
]
CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        help="State dict to start from: .safetensors, .pt/.pth "
        "(loaded with weights_only=True) or an `mpq train` run directory."
    ),
]
NewHeadOpt = Annotated[
    bool,
    typer.Option(
        "--new-head",
        help="Re-initialise the classifier (the last Linear) when the --checkpoint's has another shape "
        "(e.g. an ImageNet 1000-class head for 10 classes); every other tensor still loads strictly.",
    ),
]
DataOpt = Annotated[str, typer.Option("--data", "-d", help=f"Dataset: {', '.join(DATASETS)}.")]
NormalizeOpt = Annotated[
    str | None,
    typer.Option(
        help="Input statistics the model expects, on pixels scaled to [0, 1]: MEAN/STD, each one value or one per "
        "channel (0.485,0.456,0.406/0.229,0.224,0.225), MEAN,STD (0.50196,0.50196 is (x*255-128)/128), imagenet, "
        "none, or a dataset's name. Default: the dataset's; a torchvision model's --weights bring their own.",
    ),
]
DataDirOpt = Annotated[
    str | None,
    typer.Option(
        help="Dataset root folder (default: $MPQ_DATA_DIR or ./data; "
        "Fashion-MNIST is also found in /usr/share/datasets)."
    ),
]
InputSizeOpt = Annotated[str | None, typer.Option(help="C,H,W of synthetic inputs (default: the model's).")]
BatchOpt = Annotated[int, typer.Option(help="Batch size.")]
EpochsOpt = Annotated[int | None, typer.Option(help="Epochs (default: the command's).")]
LrOpt = Annotated[float | None, typer.Option(help="Peak learning rate (default: the method's).")]
OptimOpt = Annotated[str | None, typer.Option(help="sgd or adam (default: the method's).")]
SchedOpt = Annotated[str | None, typer.Option(help="cosine, step or constant (default: the method's).")]
WdOpt = Annotated[float | None, typer.Option(help="Weight decay (default: the method's).")]
WarmupOpt = Annotated[float, typer.Option("--lr-warmup-epochs", help="Linear learning-rate warm-up epochs.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for parameters, data order and augmentation.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
AmpOpt = Annotated[
    bool, typer.Option("--amp", help="bf16 autocast (CUDA, and the CPU: fast only on CPUs with bf16 units).")
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile CSQ's and BSQ's per-bit weight construction after a one-off compile (tens of "
        "seconds on a CPU): shorter CSQ steps on large models, BSQ's about the same. Off by default.",
    ),
]
LimitTrainOpt = Annotated[int | None, typer.Option(help="Stop each training epoch after N batches.")]
LimitValOpt = Annotated[int | None, typer.Option(help="Evaluate on at most N batches.")]
NoAugOpt = Annotated[bool, typer.Option("--no-augment", help="Turn off training augmentation.")]
ValSplitOpt = Annotated[
    str | None,
    typer.Option(
        help="Hold N training images (or a fraction in (0, 1), e.g. 0.1) out of training, the same number per "
        "class and the same images whatever --seed: every per-epoch check and the budget step's loss probe read "
        "them, and the test split is measured once at the end (top1; the hold-out's is val_top1). "
        "Default: no hold-out, the checks read the test split.",
    ),
]
OutOpt = Annotated[
    str | None, typer.Option("--out", "-o", help="Run directory to write (default: runs/COMMAND-MODEL-TIMESTAMP).")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object with the results on stdout.")]
ClipOpt = Annotated[
    float | None, typer.Option(help="Clip the global gradient norm (default: the method's; none for train).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]
EdgeBitsOpt = Annotated[
    int | None,
    typer.Option(
        help="Fix the first and last Conv2d/Linear layer at N bits (the papers' 8), for every method, counted in "
        "the average like --fix-bits (which wins on a layer it matches); BMPQ: replaces its edge_bits (16). "
        "Default: off.",
    ),
]
UserModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="The user factory (package.module:fn or "
        "file.py:fn) of a file or run made with one: mpq never runs code "
        "a file names, only code you name here.",
    ),
]


def _data_cfg(
    data, data_dir, batch_size, input_size, limit_train, limit_val, no_augment, normalize, val_split
) -> DataConfig:
    return DataConfig(
        name=data,
        data_dir=data_dir or default_data_dir(),
        batch_size=batch_size,
        input_size=_parse_input_size(input_size),
        limit_train_batches=limit_train,
        limit_val_batches=limit_val,
        augment=not no_augment,
        normalize=normalize,
        val_split=val_split,
    )


@app.command()
@_handle_errors
def train(
    model: ModelOpt = "lenet5",
    weights: WeightsOpt = None,
    checkpoint: CheckpointOpt = None,
    new_head: NewHeadOpt = False,
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    input_size: InputSizeOpt = None,
    normalize: NormalizeOpt = None,
    batch_size: BatchOpt = 128,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    optimizer: OptimOpt = None,
    schedule: SchedOpt = None,
    weight_decay: WdOpt = None,
    warmup_epochs: WarmupOpt = 0.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
    limit_train_batches: LimitTrainOpt = None,
    limit_val_batches: LimitValOpt = None,
    val_split: ValSplitOpt = None,
    no_augment: NoAugOpt = False,
    clip_grad: ClipOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train the FP32 baseline: the reference every search starts from and is measured against.

    Defaults: 12 epochs of Adam (lr 2e-3, cosine). Writes RUN/model.safetensors.
    """
    cfg = dict(
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        schedule=schedule,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        seed=seed,
        device=device,
        amp=amp,
        clip_grad=clip_grad,
    )
    summary = api.train(
        api.ModelOptions(model, weights, checkpoint, new_head),
        _data_cfg(
            data,
            data_dir,
            batch_size,
            input_size,
            limit_train_batches,
            limit_val_batches,
            no_augment,
            normalize,
            val_split,
        ),
        cfg,
        out=out,
        resume=resume,
        reporter=RichReporter(quiet, bars=False if as_json else None),
    )
    _emit(summary, as_json, "FP32")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_handle_errors
def search(
    ctx: typer.Context,
    method: Annotated[MethodName, typer.Option(help="Search method (see `mpq methods`).")] = "csq",
    target_bits: Annotated[
        float | None,
        typer.Option(
            help="Average bits per weight as the method counts them (CSQ, "
            "BSQ, uniform: magnitude bits; BMPQ: two's complement width; "
            "ALQ: binary bases per weight, may be below 1), weighted by "
            "parameters (default: the method's; CSQ, uniform, BMPQ 3; ALQ 1; "
            "BSQ none: open loop with its alpha)."
        ),
    ] = None,
    model: ModelOpt = "lenet5",
    weights: WeightsOpt = None,
    checkpoint: CheckpointOpt = None,
    new_head: NewHeadOpt = False,
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    input_size: InputSizeOpt = None,
    normalize: NormalizeOpt = None,
    batch_size: BatchOpt = 128,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    optimizer: OptimOpt = None,
    schedule: SchedOpt = None,
    weight_decay: WdOpt = None,
    warmup_epochs: WarmupOpt = 0.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
    compile_kernels: CompileOpt = False,
    limit_train_batches: LimitTrainOpt = None,
    limit_val_batches: LimitValOpt = None,
    val_split: ValSplitOpt = None,
    no_augment: NoAugOpt = False,
    clip_grad: ClipOpt = None,
    keep_fp: Annotated[
        list[str] | None, typer.Option(help="Keep layers matching this glob in FP32 (repeatable).")
    ] = None,
    fix_bits: Annotated[
        list[str] | None, typer.Option(help="NAME=BITS: fix a layer's bits, NAME a glob (repeatable).")
    ] = None,
    edge_bits: EdgeBitsOpt = None,
    act_bits: Annotated[
        int | None,
        typer.Option(
            help="Quantize layer inputs to N bits with PACT (first layer: 8; ALQ: N binary bases with a reference, the image FP). Default: FP activations."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="FIELD=VALUE for the method's config (see `mpq methods`), repeatable."),
    ] = None,
    probe_batches: Annotated[
        int,
        typer.Option(
            help="Batches the loss-aware budget step measures: of the --val-split hold-out, else of training."
        ),
    ] = 8,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Search a mixed-precision scheme and write a run directory (state, scheme.json, report.md).

    Default epochs: 10. Training defaults (optimizer, lr, weight decay) are the method's paper's.

    Method options: every field of the method's config is also an option, --FIELD-NAME VALUE (e.g. bmpq: --bits 2,4 --warmup-epochs 2 --interval 2 --budget-bytes N; bsq: --alpha 0.02; alq: --max-bits 6 --prune-ratio 0.4 --rounds 4 --groups 'classifier.*=channel'). `mpq methods` lists them with their defaults.
    """
    method_name = method.value if isinstance(method, enum.Enum) else method
    cfg = dict(
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        schedule=schedule,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        seed=seed,
        device=device,
        amp=amp,
        clip_grad=clip_grad,
        compile=compile_kernels,
    )
    method_config = {"act_bits": act_bits, **_parse_method_options(ctx.args, method_name), **_parse_sets(set_ or [])}
    if target_bits is not None:
        method_config["target_bits"] = target_bits
    selection = LayerSelection(
        keep_fp=keep_fp or [], fix_bits=LayerSelection.parse_fix_bits(fix_bits or []), edge_bits=edge_bits
    )
    options = api.SearchOptions(method_name, method_config, selection, probe_batches)
    summary = api.search(
        api.ModelOptions(model, weights, checkpoint, new_head),
        _data_cfg(
            data,
            data_dir,
            batch_size,
            input_size,
            limit_train_batches,
            limit_val_batches,
            no_augment,
            normalize,
            val_split,
        ),
        cfg,
        options,
        out=out,
        resume=resume,
        reporter=RichReporter(quiet, bars=False if as_json else None),
    )
    _emit(summary, as_json, "search")
    _exit_if_over_budget(summary)


@app.command()
@_handle_errors
def finetune(
    run: Annotated[Path, typer.Argument(help="A search run directory.")],
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 5,
    lr: LrOpt = None,
    optimizer: OptimOpt = None,
    schedule: SchedOpt = None,
    weight_decay: WdOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the run's).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: the run's).")] = None,
    data_dir: DataDirOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: the run's).")] = None,
    limit_train_batches: LimitTrainOpt = None,
    limit_val_batches: LimitValOpt = None,
    compile_kernels: CompileOpt = False,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Run directory to write (default: RUN-finetune).")
    ] = None,
    model: UserModelOpt = None,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train a searched model further under its fixed scheme (CSQ: Alg. 1's second stage; ALQ: more basis and coordinate epochs at the fixed widths)."""
    train_overrides = {
        k: v
        for k, v in dict(
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            schedule=schedule,
            weight_decay=weight_decay,
            seed=seed,
            device=device,
            compile=compile_kernels or None,
        ).items()
        if v is not None
    }
    data_overrides = {
        k: v
        for k, v in dict(
            data_dir=data_dir,
            batch_size=batch_size,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
        ).items()
        if v is not None
    }
    summary = api.finetune(
        str(run),
        train_overrides,
        data_overrides,
        out=out,
        resume=resume,
        reporter=RichReporter(quiet, bars=False if as_json else None),
        model=model,
    )
    _emit(summary, as_json, "finetune")
    _exit_if_over_budget(summary)


def _float_list(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise MpqError(f"{option} expects numbers separated by commas, e.g. 2,3,4; got {text!r}") from None
    if not values:
        raise MpqError(f"{option} needs at least one value")
    return values


@app.command()
@_handle_errors
def sweep(
    method: Annotated[str, typer.Option(help="Methods, comma-separated (e.g. csq,uniform).")] = "csq,uniform",
    target_bits: Annotated[str, typer.Option(help="Budgets, comma-separated, as each method counts bits.")] = "2,3,4",
    model: ModelOpt = "lenet5",
    weights: WeightsOpt = None,
    checkpoint: CheckpointOpt = None,
    new_head: NewHeadOpt = False,
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    input_size: InputSizeOpt = None,
    normalize: NormalizeOpt = None,
    batch_size: BatchOpt = 128,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    limit_train_batches: LimitTrainOpt = None,
    limit_val_batches: LimitValOpt = None,
    val_split: ValSplitOpt = None,
    act_bits: Annotated[int | None, typer.Option(help="Quantize layer inputs to N bits (see search).")] = None,
    edge_bits: EdgeBitsOpt = None,
    probe_batches: Annotated[
        int,
        typer.Option(
            help="Batches the loss-aware budget step measures: of the --val-split hold-out, else of training."
        ),
    ] = 8,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Folder of the sweep's runs (reused: finished runs are skipped).")
    ] = "runs/sweep",
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Run again the rows whose runs were made with other settings (they are refused otherwise)."
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Search one model at several budgets and methods, export and evaluate each run, and chart accuracy against size.

    Each (method, budget) is its own run directory under --out (METHOD-Bbits); run again, a sweep reads back the finished runs made with the same settings (the fingerprint --resume checks) and resumes an interrupted one; a run made with other settings is refused as stale, or with --force run again. Writes sweep.json, sweep.md (the table, the Pareto front marked) and sweep.png (top-1 against stored bits). Optimizer, lr and weight decay are each method's unless given.
    """
    from .sweep import Sweep, run_sweep

    plan = Sweep(
        methods=[m for m in method.replace(" ", "").split(",") if m],
        targets=_float_list(target_bits, "--target-bits"),
        out=Path(out),
        model=api.ModelOptions(model, weights, checkpoint, new_head),
        data=_data_cfg(
            data, data_dir, batch_size, input_size, limit_train_batches, limit_val_batches, False, normalize, val_split
        ),
        train={"epochs": epochs, "lr": lr, "seed": seed, "device": device},
        method_config={"act_bits": act_bits},
        selection=LayerSelection(edge_bits=edge_bits),
        probe_batches=probe_batches,
        force=force,
    )
    result = run_sweep(plan, reporter=RichReporter(quiet, bars=False if as_json else None))
    if as_json:
        _print_json(result)
        return
    out_console.print(Path(out, "sweep.md").read_text(), highlight=False, markup=False, soft_wrap=True)


@app.command("eval")
@_handle_errors
def eval_(
    target: Annotated[Path, typer.Argument(help="A packed .safetensors file (from `mpq export`) or a run directory.")],
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Dataset (default: the one the file or run recorded).")
    ] = None,
    data_dir: DataDirOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: the recorded one).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: the run's; auto for files).")] = None,
    limit_val_batches: LimitValOpt = None,
    model: UserModelOpt = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Skip the SHA-256 check of each tensor of a packed "
            "file (about a tenth of the load time; the header is checked "
            "regardless).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Measure top-1 (and top-5 with more than 5 classes) of a packed file or a run, on its recorded dataset.

    The whole validation (test) split, unless --limit-val-batches is given.

    A packed file is decoded into a plain model (no run directory needed); a run evaluates its exact weights.
    """
    overrides = {
        k: v
        for k, v in dict(
            name=data, data_dir=data_dir, batch_size=batch_size, limit_val_batches=limit_val_batches
        ).items()
        if v is not None
    }
    summary = api.evaluate_run(
        str(target),
        overrides,
        device=device,
        reporter=RichReporter(quiet, bars=False if as_json else None),
        model=model,
        verify=not no_verify,
    )
    _emit(summary, as_json, "eval")
    if not as_json and summary.get("top1_at_export") is not None and _rank() == 0:
        limit = summary.get("limit_val_batches_at_export")
        on = f" on its first {limit} validation batches of each process (--limit-val-batches {limit})" if limit else ""
        out_console.print(
            f"the run measured {summary['top1_at_export']:.2f} %{on} at export", highlight=False, markup=False
        )


@app.command()
@_handle_errors
def export(
    run: Annotated[Path, typer.Argument(help="A search or finetune run directory.")],
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="File to write (default: RUN/packed.safetensors); FILE.report.json and FILE.report.md go beside it.",
        ),
    ] = None,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="packed (bit-packed safetensors) or onnx (opset 21, weights as INT4/INT8 codes with DequantizeLinear, checked with onnxruntime; needs pip install 'mpq-cli[onnx]').",
        ),
    ] = "packed",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Write bit-packed safetensors (format mpq.packed/1.1, docs/format.md) and a per-layer precision report, or an ONNX model.

    Every layer is checked to decode to the run's exact weights before the file is written; an ONNX model is checked against the packed model's logits with onnxruntime.
    """
    if format_ not in ("packed", "onnx"):
        raise MpqError(f"--format must be packed or onnx, got {format_!r}")
    if format_ == "onnx":
        from .onnx_export import export_onnx

        if out is None:
            raise MpqError("--format onnx needs -o NAME.onnx")
        summary = export_onnx(run, out)
        if as_json:
            _print_json(summary)
            return
        check = (
            f"onnxruntime against load_packed on {summary['checked_images']} images: top-1 equal on "
            f"{100 * summary['top1_agreement']:.1f} %, largest logit difference {summary['max_relative_difference']:.1e} "
            "of the largest logit"
        )
        if summary.get("quantizers_exact"):
            check += f"; {summary['quantizers_exact']} input quantizer(s) equal to PACT's bit for bit"
        out_console.print(
            f"written: {summary['out']} ({summary['onnx_bytes']:,} bytes; the packed file: {summary['packed_bytes']:,} "
            f"bytes); {check}; report: {summary['report']}",
            highlight=False,
        )
        for note in summary["notes"]:
            out_console.print(f"note: {note}", highlight=False)
        return
    summary = api.export(str(run), out)
    if as_json:
        _print_json(summary)
        return
    from rich.table import Table

    from .report import size_summary_lines

    table = Table(show_header=False, box=None)
    for k, v in size_summary_lines(summary):
        table.add_row(k, v)
    out_console.print(table)
    out_console.print(f"written: {summary['out']} (report: {summary['report']})", highlight=False)


class SortKey(enum.StrEnum):
    order = "order"
    size = "size"
    bits = "bits"
    name = "name"


@app.command()
@_handle_errors
def inspect(
    target: Annotated[Path, typer.Argument(help="A packed .safetensors file or a run directory.")],
    layers: Annotated[str | None, typer.Option(help="Only layers whose name matches this glob.")] = None,
    sort: Annotated[
        SortKey, typer.Option(help="Row order: module order, size (bytes, largest first), bits, name.")
    ] = SortKey.order,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also draw the bits per layer (in module order, the --layers selection) into this PNG."),
    ] = None,
    as_json: JsonOpt = False,
):
    """Show the layer bit table: bits, encoding, stored bytes and share of each layer, and the totals.

    A file is read from its header alone (no model is built); a run is encoded in memory as export would.
    """
    from .export import select_layers

    report = api.inspect(str(target))
    rows = select_layers(report, layers, sort.value if isinstance(sort, enum.Enum) else sort)
    if plot is not None:
        api.plot_layers(report, select_layers(report, layers, "order"), plot)
    if as_json:
        _print_json({**report, "layers": rows})
        return
    from rich.table import Table

    from .report import rich_size_table, size_summary_lines

    out_console.print(rich_size_table(report, rows, f"{target} ({report['source']})"))
    from .report import bits_convention

    out_console.print(
        f"bits: nominal ({bits_convention(report['method'])}); b/w: stored bits per weight measured on "
        "the file, sign, scales and tables included",
        highlight=False,
    )
    summary = Table(show_header=False, box=None)
    for k, v in size_summary_lines(report):
        summary.add_row(k, v)
    out_console.print(summary)


@app.command()
@_handle_errors
def methods(as_json: JsonOpt = False):
    """List the search methods and their configuration fields (set with --FIELD-NAME VALUE or --set FIELD=VALUE)."""
    listing = api.method_listing()
    if as_json:
        _print_json(listing)
        return
    for name, entry in listing.items():
        out_console.print(f"[bold]{name}[/bold]: {entry['summary']}")
        for field_name, field_info in entry["fields"].items():
            out_console.print(
                f"  --{field_name.replace('_', '-')} (default {field_info['default']}): {field_info['help']}",
                highlight=False,
                markup=False,
            )
        out_console.print(
            "  training: " + ", ".join(f"{k}={v}" for k, v in entry["training_defaults"].items()), highlight=False
        )


def _print_model_layers(model: str, found: dict) -> None:
    from rich.table import Table

    def shape(row):
        return "x".join(map(str, row["shape"]))

    rows = found["layers"]
    table = Table("layer", "kind", "shape", "params", title=f"{model}: {len(rows)} Conv2d/Linear layers (quantized)")
    for row in rows:
        table.add_row(row["name"], row["kind"], shape(row), f"{row['params']:,}")
    out_console.print(table)
    if found["fp_layers"]:
        title = f"{len(found['fp_layers'])} more layers with weights: {api.STAYS_FP}"
        table = Table("layer", "kind", "shape", "params", "tensors", title=title)
        for row in found["fp_layers"]:
            name = row["name"] or "(the model itself)"  # a parameter the top module owns, e.g. a class token
            table.add_row(name, row["kind"], shape(row), f"{row['params']:,}", ", ".join(row["tensors"]))
        out_console.print(table)
    norms = found["normalisation"]
    params = found["params"]
    if norms:
        kinds = sorted({n["kind"] for n in norms})
        out_console.print(
            f"normalisation layers: {len(norms)} ({', '.join(kinds)}), {params['normalisation']:,} params: stay FP",
            highlight=False,
        )
    total = params["quantizable"] + params["not_quantizable"]
    share = 100 * params["quantizable"] / total if total else 0.0
    out_console.print(
        f"params: {params['quantizable']:,} quantizable ({share:.1f} %), {params['not_quantizable']:,} stay FP "
        f"({params['fp_layers']:,} in other layers, {params['normalisation']:,} normalisation, "
        f"{params['biases']:,} biases)",
        highlight=False,
    )


@app.command()
@_handle_errors
def models(
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="List this model's Conv2d/Linear layers (the names "
            "--keep-fp and --fix-bits match) and the weights that stay FP, instead of the models.",
        ),
    ] = None,
    num_classes: Annotated[int, typer.Option(help="Classes of the model --layers builds.")] = 10,
    input_size: InputSizeOpt = None,
    as_json: JsonOpt = False,
):
    """List built-in and torchvision classification models, or one model's quantizable layers and
    the weights that stay FP (layers that are not Conv2d/Linear, normalisation, biases)."""
    from .models import list_models

    if layers is not None:
        found = api.model_layers(layers, num_classes, _parse_input_size(input_size))
        if as_json:
            _print_json(found)
            return
        _print_model_layers(layers, found)
        return
    listing = list_models()
    if as_json:
        _print_json(listing)
        return
    out_console.print("[bold]built-in[/bold] (small images): " + ", ".join(listing["builtin"]))
    out_console.print("[bold]torchvision[/bold]: " + ", ".join(listing["torchvision"]), highlight=False)
    out_console.print(
        "user models: package.module:factory or path/to/file.py:factory "
        "(called with num_classes, in_channels, input_size when it accepts them)"
    )
    out_console.print("a model's layer names: mpq models --layers MODEL", highlight=False)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary files are removed on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """The ``mpq`` entry point. Usage errors (Typer's own) are one line on stderr and exit 2, like
    every other user error."""
    import typer._click as click
    from typer.exceptions import Abort  # not in typer._click.exceptions: naming it there broke this handler

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(args=argv, standalone_mode=False)
    except click.exceptions.ClickException as exc:
        message = " ".join(exc.format_message().split())
        if not message:  # `mpq` alone: click printed the help
            return _exit(2, argv)
        command = f"mpq {exc.ctx.info_name} " if getattr(exc, "ctx", None) and exc.ctx.parent else "mpq "
        message = f"{message} (see `{command.strip()} --help`)"
        print(f"error: {message}", file=sys.stderr)
        code = 2
        if "--json" in (sys.argv[1:] if argv is None else argv):
            _json_error(message, code)
    except Abort:
        print("interrupted", file=sys.stderr)
        code = 130
    return _exit(code if isinstance(code, int) else 0, argv)


def _exit(code: int, argv) -> int:
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
