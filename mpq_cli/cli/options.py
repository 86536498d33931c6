"""The options several commands share, each declared once (its type, flag and help), the groups a command takes
whole (:data:`MODEL`, :data:`DATA`, :data:`TRAINING`, with :func:`with_groups`), and the parsers of option text."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer

from ..dataconfig import DATASETS, default_data_dir
from ..errors import MpqError
from ..rundir import loads

# the methods mpq ships (`--method`'s help names them without importing torch; tests/test_cli.py keeps it true)
METHOD_NAMES = "alq, bmpq, bsq, csq, uniform"


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
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


def parse_sets(items: list[str]) -> dict:
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


def parse_method_options(args: list[str], *methods: str, own: tuple[str, ...] = ()) -> dict:
    """``--field-name VALUE`` / ``--field-name=VALUE`` pairs left over by Typer -> config fields of any of
    ``methods`` (search passes one; a sweep its methods, each run taking those its method has). ``own``:
    the command's own options, offered too when a name is mistyped (``--epoch`` -> ``--epochs``)."""
    import dataclasses

    from ..methods import METHODS

    fields = set().union(*({f.name for f in dataclasses.fields(METHODS[m].config_class)} for m in methods))
    fields -= {"version"}
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

            # compared without the leading dashes, which every name shares
            candidates = sorted({f.replace("_", "-") for f in fields} | {o[2:] for o in own})
            near = difflib.get_close_matches(key, candidates, n=1)
            if near:
                raise MpqError(f"no such option --{key}; did you mean --{near[0]}? (`mpq methods`)")
            options = ", ".join("--" + f.replace("_", "-") for f in sorted(fields))
            whose = f"method {methods[0]} also takes" if len(methods) == 1 else f"methods {', '.join(methods)} take"
            raise MpqError(f"no such option --{key} ({whose}: {options})")
        try:
            out[name] = loads(value)
        except ValueError:
            out[name] = value
        i += 1
    return out


def own_options(ctx: typer.Context) -> tuple[str, ...]:
    """The command's own long option names (for a mistyped one's suggestion)."""
    return tuple(o for p in ctx.command.params for o in p.opts if o.startswith("--"))


def method_settings(ctx: typer.Context, methods: list[str], given: dict):
    """The method fields and layer selection of a search, or of every run of a sweep, from the METHOD group's
    options (``given``) and the --FIELD-NAME options Typer left over: parsed once for both commands."""
    from ..layers import LayerSelection

    method_config = {
        "act_bits": given["act_bits"],
        **parse_method_options(ctx.args, *methods, own=own_options(ctx)),
        **parse_sets(given["set_"] or []),
    }
    selection = LayerSelection(
        keep_fp=given["keep_fp"] or [],
        fix_bits=LayerSelection.parse_fix_bits(given["fix_bits"] or []),
        edge_bits=given["edge_bits"],
        scheme=None if given["scheme"] is None else str(given["scheme"]),
    )
    return method_config, selection


# a scheme further than this under its ceiling gets a note: the search left bits unused


def float_list(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise MpqError(f"{option} expects numbers separated by commas, e.g. 2,3,4; got {text!r}") from None
    if not values:
        raise MpqError(f"{option} needs at least one value")
    return values


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise MpqError(f"{option} expects integers separated by commas, e.g. 0,1,2; got {text!r}") from None
    if not values:
        raise MpqError(f"{option} needs at least one value")
    return values


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
KeepFpOpt = Annotated[list[str] | None, typer.Option(help="Keep layers matching this glob in FP32 (repeatable).")]
FixBitsOpt = Annotated[list[str] | None, typer.Option(help="NAME=BITS: fix a layer's bits, NAME a glob (repeatable).")]
ActBitsOpt = Annotated[
    int | None,
    typer.Option(
        help="Quantize layer inputs to N bits with PACT (first layer: 8; ALQ: N binary bases with a reference, the image FP). Default: FP activations."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="FIELD=VALUE for the method's config (see `mpq methods`), repeatable."),
]
EdgeBitsOpt = Annotated[
    int | None,
    typer.Option(
        help="Fix the first and last Conv2d/Linear layer at N bits (the papers' 8), for every method, counted in "
        "the average like --fix-bits (which wins on a layer it matches); BMPQ: replaces its edge_bits (16). "
        "Default: off.",
    ),
]
SchemeOpt = Annotated[
    str | None,
    typer.Option(
        help="Train under another run's per-layer bits (a run directory or its scheme.json): the scheme "
        "transplant, e.g. uniform's quantizer under CSQ's scheme, to tell a better scheme from better training. "
        "Bits are converted between counts (BMPQ's include the sign); the method's own choice is skipped.",
    ),
]
RecipeOpt = Annotated[
    str,
    typer.Option(
        help="Training defaults: paper (the method's paper's schedule, for training from scratch), checkpoint "
        "(measured from trained references) or auto (checkpoint with --checkpoint or pretrained --weights).",
    ),
]
ProbeOpt = Annotated[
    int,
    typer.Option(help="Batches the loss-aware budget step measures: of the --val-split hold-out, else of training."),
]


@dataclass(frozen=True)
class OptionGroup:
    """Options several commands take together, declared once: ``options`` are ``(name, Annotated type, default)``
    and ``build`` turns their values into the one object the command receives as its ``key`` parameter."""

    key: str
    options: tuple[tuple[str, object, object], ...]
    build: Callable[[dict], object]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.options)


def with_groups(*groups: OptionGroup):
    """Give a command every option of ``groups``: each group's parameter in the command's signature (e.g.
    ``model: ModelOptions``) becomes the group's options, in its place, for Typer to parse; the command is
    called with the object the group builds from them. So ``train``, ``search`` and ``sweep`` declare and
    resolve the model, data and training options in one place."""

    def wrap(fn):
        signature = inspect.signature(fn, eval_str=True)
        by_key = {g.key: g for g in groups}
        missing = set(by_key) - set(signature.parameters)
        if missing:
            raise TypeError(f"{fn.__name__} has no parameter for option group(s) {sorted(missing)}")
        parameters = []
        for p in signature.parameters.values():
            group = by_key.get(p.name)
            if group is None:
                parameters.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
                continue
            for name, annotation, default in group.options:
                parameters.append(
                    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                )

        def command(**kwargs):
            for group in groups:
                kwargs[group.key] = group.build({name: kwargs.pop(name) for name in group.names})
            return fn(**kwargs)

        command.__name__, command.__qualname__, command.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        command.__module__ = fn.__module__
        command.__signature__ = signature.replace(parameters=parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return wrap


def _model_options(v: dict):
    from ..api import ModelOptions

    return ModelOptions(v["model"], v["weights"], v["checkpoint"], v["new_head"])


def _data_config(v: dict):
    from ..dataconfig import DataConfig

    return DataConfig(
        name=v["data"],
        data_dir=v["data_dir"] or default_data_dir(),
        batch_size=v["batch_size"],
        input_size=parse_input_size(v["input_size"]),
        limit_train_batches=v["limit_train_batches"],
        limit_val_batches=v["limit_val_batches"],
        augment=not v["no_augment"],
        normalize=v["normalize"],
        val_split=v["val_split"],
    )


def _training(v: dict) -> dict:
    """The training settings given (``None``: the command's or the method's default, resolved by the API)."""
    return {("compile" if k == "compile_kernels" else k): x for k, x in v.items()}


MODEL = OptionGroup(
    "model",
    (
        ("model", ModelOpt, "lenet5"),
        ("weights", WeightsOpt, None),
        ("checkpoint", CheckpointOpt, None),
        ("new_head", NewHeadOpt, False),
    ),
    _model_options,
)
DATA = OptionGroup(
    "data",
    (
        ("data", DataOpt, "fashion-mnist"),
        ("data_dir", DataDirOpt, None),
        ("input_size", InputSizeOpt, None),
        ("normalize", NormalizeOpt, None),
        ("batch_size", BatchOpt, 128),
        ("limit_train_batches", LimitTrainOpt, None),
        ("limit_val_batches", LimitValOpt, None),
        ("val_split", ValSplitOpt, None),
        ("no_augment", NoAugOpt, False),
    ),
    _data_config,
)
_TRAINING_OPTIONS = (
    ("epochs", EpochsOpt, None),
    ("lr", LrOpt, None),
    ("optimizer", OptimOpt, None),
    ("schedule", SchedOpt, None),
    ("weight_decay", WdOpt, None),
    ("warmup_epochs", WarmupOpt, 0.0),
    ("seed", SeedOpt, 0),
    ("device", DeviceOpt, "auto"),
    ("amp", AmpOpt, False),
    ("clip_grad", ClipOpt, None),
)
TRAINING = OptionGroup("training", _TRAINING_OPTIONS, _training)
# a search also takes --compile (CSQ's and BSQ's per-bit kernels); mpq train has nothing to compile
SEARCH_TRAINING = OptionGroup("training", (*_TRAINING_OPTIONS, ("compile_kernels", CompileOpt, False)), _training)
# what search and sweep pass to every run besides the method fields: the layer selection, input quantization,
# --set, and the budget step's probe (the command receives them as one dict; method_settings parses them)
METHOD = OptionGroup(
    "method_options",
    (
        ("keep_fp", KeepFpOpt, None),
        ("fix_bits", FixBitsOpt, None),
        ("edge_bits", EdgeBitsOpt, None),
        ("scheme", SchemeOpt, None),
        ("act_bits", ActBitsOpt, None),
        ("set_", SetOpt, None),
        ("probe_batches", ProbeOpt, 8),
        ("recipe", RecipeOpt, "auto"),
    ),
    dict,
)
