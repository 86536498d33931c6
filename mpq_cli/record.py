"""The run record, ``RUN/config.json``: what a run was made with, and the one reader and writer of that file.

A record keeps the JSON object exactly as it was written, because its fingerprint (what ``--resume`` and
``mpq sweep`` compare) is a hash of it: a field never appears, disappears or changes meaning behind a run's
back. Everything else reads it through typed views (:meth:`RunRecord.data`, :meth:`RunRecord.training`,
:meth:`RunRecord.method_config`, :meth:`RunRecord.selection`, :meth:`RunRecord.model_spec`), each of which
turns a malformed record into one :class:`MpqError` naming the file. The commands build records with
:meth:`RunRecord.for_train`, :meth:`RunRecord.for_search` and :meth:`RunRecord.finetuned`.

Layout of the object, by command (``[...]``: present only when set):

- ``train``: command, model, checkpoint, [new_head, head_reinitialised], data, train, versions, fingerprint
- ``search``: command, model, checkpoint, checkpoint_sha256, [new_head, head_reinitialised], data, train,
  method, method_config, selection, probe_batches, fp_top1, fingerprint, checkpoint_bytes, versions
- ``finetune``: the search's, with command ``finetune``, ``parent`` (the search run) and its own data and
  train (and model, when a user factory was named again)

The fingerprint covers every field but ``fingerprint``, ``checkpoint_bytes`` (a file size, for the
export's comparison) and ``versions``. Nothing here imports torch: the typed views import what they build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .dataconfig import DataConfig
from .errors import MpqError
from .rundir import fingerprint, read_json, versions, write_json

if TYPE_CHECKING:
    from .layers import LayerSelection
    from .methods.base import MethodConfig
    from .models import ModelSpec
    from .trainconfig import TrainConfig

COMMANDS = ("train", "search", "finetune")
NAME = "config.json"
_OUTSIDE_FINGERPRINT = ("fingerprint", "checkpoint_bytes", "versions")
DEFAULT_PROBE_BATCHES = 8  # the probe length of runs recorded before the setting existed, and the default


@dataclass(frozen=True)
class RunRecord:
    """A run's ``config.json``: ``fields`` as written, ``source`` where it was read (for messages)."""

    fields: dict
    source: str = NAME

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def for_train(cls, *, model: dict, checkpoint: str | None, head: dict, data: DataConfig, train) -> RunRecord:
        """The record of ``mpq train``; ``head`` is the ``--new-head`` record (empty without the option)."""
        fields = {
            "command": "train",
            "model": model,
            "checkpoint": checkpoint,
            **head,
            "data": data.to_dict(),
            "train": train.to_dict(),
            "versions": versions(),
        }
        return cls(fields).fingerprinted()

    @classmethod
    def for_search(
        cls,
        *,
        model: dict,
        checkpoint: str | None,
        checkpoint_sha256: str | None,
        head: dict,
        data: DataConfig,
        train,
        method: str,
        method_config: MethodConfig,
        selection: LayerSelection,
        probe_batches: int,
        fp_top1: float | None,
    ) -> RunRecord:
        """The record of ``mpq search`` (fingerprinted; :meth:`finished` adds the file size and versions)."""
        fields = {
            "command": "search",
            "model": model,
            "checkpoint": checkpoint,
            "checkpoint_sha256": checkpoint_sha256,
            **head,
            "data": data.to_dict(),
            "train": train.to_dict(),
            "method": method,
            "method_config": method_config.to_dict(),
            "selection": selection.to_dict(),
            "probe_batches": probe_batches,
            "fp_top1": fp_top1,
        }
        return cls(fields).fingerprinted()

    def finetuned(self, *, parent: str, data: DataConfig, train, model: dict | None) -> RunRecord:
        """The record of ``mpq finetune`` of this search: its settings, with its own data and training (and
        ``model`` when the user factory was named again), the checkpoint's size carried over."""
        fields = {k: v for k, v in self.fields.items() if k not in _OUTSIDE_FINGERPRINT}
        fields.update({"command": "finetune", "parent": parent, "train": train.to_dict(), "data": data.to_dict()})
        if model is not None:
            fields["model"] = model
        return RunRecord(fields).fingerprinted().finished(self.fields.get("checkpoint_bytes"))

    def fingerprinted(self) -> RunRecord:
        """This record with its ``fingerprint``: a hash of every field it covers."""
        covered = {k: v for k, v in self.fields.items() if k not in _OUTSIDE_FINGERPRINT}
        return RunRecord({**self.fields, "fingerprint": fingerprint(covered)}, self.source)

    def finished(self, checkpoint_bytes: int | None) -> RunRecord:
        """This record as a run writes it: the FP32 checkpoint's size (for the export's comparison) and the
        versions of mpq, torch and torchvision, outside the fingerprint."""
        return RunRecord({**self.fields, "checkpoint_bytes": checkpoint_bytes, "versions": versions()}, self.source)

    # -- reading and writing --------------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: str | Path, *, quantized: bool = False) -> RunRecord:
        """The record of ``run_dir``; ``quantized``: it must be a search or finetune run (not ``mpq train``'s)."""
        run_dir = Path(run_dir)
        path = run_dir / NAME
        if not path.is_file():
            if not run_dir.exists():
                raise MpqError(f"{run_dir} not found")
            raise MpqError(f"{run_dir} is not an mpq run directory (no {NAME})")
        fields = read_json(path)
        source = f"{run_dir}/{NAME}"
        if not isinstance(fields, dict):
            raise MpqError(f"{source}: malformed run record (not a JSON object)")
        record = cls(fields, source)
        if "method" in fields and not isinstance(fields["method"], str):
            raise MpqError(f"{source}: malformed run record (method {str(fields['method'])[:40]})")
        if quantized and not record.is_quantized:
            raise MpqError(f"{run_dir} is an FP training run; `mpq search --checkpoint {run_dir}` quantizes it")
        return record

    def save(self, run_dir: Path) -> None:
        write_json(Path(run_dir) / NAME, self.fields)

    # -- typed views ----------------------------------------------------------------------------
    @property
    def command(self) -> str | None:
        return self.fields.get("command")

    @property
    def is_quantized(self) -> bool:
        """A search or finetune run (it has a method), not an FP32 ``mpq train`` run."""
        return "method" in self.fields

    @property
    def fingerprint(self) -> str | None:
        return self.fields.get("fingerprint")

    @property
    def method(self) -> str:
        return self.fields["method"]

    @property
    def probe_batches(self) -> int:
        return self.fields.get("probe_batches", DEFAULT_PROBE_BATCHES)

    @property
    def fp_top1(self) -> float | None:
        return self.fields.get("fp_top1")

    @property
    def checkpoint_bytes(self) -> int | None:
        return self.fields.get("checkpoint_bytes")

    @property
    def checkpoint(self) -> str | None:
        return self.fields.get("checkpoint")

    @property
    def seed(self) -> int:
        return self._section("train").get("seed", 0)

    def model_dict(self) -> dict:
        """The recorded model spec as written (name, classes, channels, input size)."""
        return self._section("model")

    def data_dict(self) -> dict:
        return self._section("data")

    def model_spec(self, model: str | None = None) -> ModelSpec:
        """The recorded model, its user factory replaced by ``model`` (mpq never runs code a file names)."""
        from .models.loading import recorded_model

        return recorded_model(self.fields.get("model"), self.source, model)

    def data(self, overrides: dict | None = None) -> DataConfig:
        """The recorded data settings, ``overrides`` on top."""
        return self._build("data", DataConfig, overrides)

    def training(self, overrides: dict | None = None) -> TrainConfig:
        """The recorded training settings, ``overrides`` on top."""
        from .trainconfig import TrainConfig

        return self._build("train", TrainConfig, overrides)

    def method_config(self) -> MethodConfig:
        from .methods import get_method

        try:
            return get_method(self.method).config_class.from_dict(self.fields["method_config"])
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise self._malformed(exc) from None

    def selection(self) -> LayerSelection:
        from .layers import LayerSelection

        try:
            return LayerSelection.from_dict(self.fields["selection"])
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise self._malformed(exc) from None

    def differences(self, other: RunRecord) -> list[str]:
        """The settings (``section`` or ``section.key``) in which two records differ, beyond what the
        fingerprint leaves out."""
        out = []
        for section in sorted(set(self.fields) | set(other.fields)):
            a, b = self.fields.get(section), other.fields.get(section)
            if section in _OUTSIDE_FINGERPRINT or a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            else:
                out.append(section)
        return out

    def _section(self, key: str) -> dict:
        value = self.fields.get(key)
        if not isinstance(value, dict):
            raise MpqError(f"{self.source}: malformed run record (no {key!r} object)")
        return value

    def _build(self, key: str, cls, overrides: dict | None):
        try:
            return cls(**{**self._section(key), **(overrides or {})})
        except MpqError:
            raise  # a setting's own check already names the setting
        except (TypeError, KeyError, ValueError) as exc:
            raise self._malformed(exc) from None

    def _malformed(self, exc: Exception) -> MpqError:
        return MpqError(f"{self.source}: malformed run record ({exc.__class__.__name__}: {exc})")
