"""Reading datasets from disk: MNIST-style IDX files, CIFAR's pickled batches (read without unpickling code)
and JPEG/PNG image folders decoded once into a uint8 cache."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from .dataconfig import DEBIAN_FASHION_MNIST
from .errors import MpqError

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_tensor_dataset(name: str, root: Path):
    if name in ("mnist", "fashion-mnist"):
        folder = _find_idx_folder(name, root)
        return tuple(_read_idx_pair(folder, *_IDX_FILES[split]) for split in ("train", "test"))
    return _read_cifar(name, root)


def _find_idx_folder(name: str, root: Path) -> Path:
    tv_name = "MNIST" if name == "mnist" else "FashionMNIST"
    candidates = [root / tv_name / "raw", root / name, root]
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        if all(_idx_path(folder, f) for pair in _IDX_FILES.values() for f in pair):
            return folder
    try:  # online: let torchvision fetch the files into data_dir
        from torchvision import datasets

        getattr(datasets, tv_name)(str(root), train=True, download=True)
        getattr(datasets, tv_name)(str(root), train=False, download=True)
        return root / tv_name / "raw"
    except Exception:  # no network: fall through to a message that says where the files go
        hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
        raise MpqError(
            f"{name} not found and could not be downloaded (offline?): put the four idx files "
            f"(train-images-idx3-ubyte.gz, ...) in {root / tv_name / 'raw'}{hint}"
        ) from None


def _idx_path(folder: Path, stem: str) -> Path | None:
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MpqError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise MpqError(f"{path}: truncated idx file")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _read_idx_pair(folder: Path, images: str, labels: str):
    x = torch.from_numpy(_read_idx(_idx_path(folder, images)).copy()).unsqueeze(1)
    y = torch.from_numpy(_read_idx(_idx_path(folder, labels)).astype(np.int64))
    return x, y


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _read_cifar(name: str, root: Path):
    """CIFAR from, in this order: a folder of JPEG/PNG images (``train/<class>/*``, ``test/<class>/*``,
    also under ``ROOT/cifar10``), a ``cifar10*.tar*`` archive of that layout in ``ROOT``, or torchvision's
    python batches (``cifar-10-batches-py`` / ``cifar-100-python``, read without unpickling code),
    downloaded there when online. Images are decoded once into a uint8 cache."""
    if name == "cifar10":
        for folder in (root, root / "cifar10", root / "cifar-10"):
            if (folder / "train").is_dir() and (folder / "test").is_dir():
                return _cached_image_splits(folder, ("train", "test"), CIFAR10_CLASSES)
        archives = sorted(root.glob("cifar10*.tar*")) if root.is_dir() else []
        if archives:
            return _cached_image_splits(archives[0], ("train", "test"), CIFAR10_CLASSES)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if not folder.is_dir():
        _download_cifar(name, root, folder)
    return _read_cifar_batches(name, folder)


def _download_cifar(name: str, root: Path, folder: Path) -> None:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:  # online: the official archive, checked against its MD5
        datasets.utils.download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception:  # no network: a message that says where the files go
        hint = (
            f", or the JPEG folders {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg"
            if name == "cifar10"
            else ""
        )
        raise MpqError(
            f"{name} not found and could not be downloaded (offline?): extract the python version so "
            f"that {folder} exists{hint}"
        ) from None


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles of numpy arrays: only the globals those need are allowed, so a
    batch file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batches(name: str, folder: Path):
    files = (
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        if name == "cifar10"
        else {"train": ["train"], "test": ["test"]}
    )
    label_key = "labels" if name == "cifar10" else "fine_labels"
    out = []
    for split in ("train", "test"):
        images, labels = [], []
        for file in files[split]:
            try:
                with open(folder / file, "rb") as f:
                    batch = _BatchUnpickler(f, encoding="latin1").load()
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(v) for v in batch[label_key])
            except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
                raise MpqError(
                    f"{folder / file}: not a readable CIFAR batch ({exc.__class__.__name__}: {exc})"
                ) from None
        out.append((torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)))
    return tuple(out)


MAX_CACHED_IMAGE_BYTES = 2 << 30  # an image folder decoded whole into memory, at most
_CACHE_ORDER_SEED = 0  # the fixed order a decoded image set is stored in


def _small_uniform_images(root: Path, splits: tuple[str, str]) -> tuple[int, int] | None:
    """``(H, W)`` when every image under ``root/SPLIT/CLASS/`` has that one size and all of them decoded fit in
    :data:`MAX_CACHED_IMAGE_BYTES` (read from the files' headers); else ``None``."""
    from PIL import Image

    paths = [p for split in splits for p in (root / split).glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        return None
    sizes = set()
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.add(img.size)
        except OSError:
            return None
        if len(sizes) > 1:
            return None
    w, h = sizes.pop()
    return (h, w) if len(paths) * 3 * h * w <= MAX_CACHED_IMAGE_BYTES else None


# -- image folders and archives, decoded once into a uint8 cache -------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _image_members(source: Path, splits: tuple[str, ...]) -> dict[str, list[tuple[str, str]]]:
    """Per split, ``(class, member)`` of every image in a folder or a tar archive, sorted."""
    found: dict[str, list[tuple[str, str]]] = {split: [] for split in splits}
    if source.is_dir():
        for split in splits:
            for path in sorted((source / split).glob("*/*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    found[split].append((path.parent.name, str(path.relative_to(source))))
        return found
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if (
                member.isfile()
                and len(parts) >= 3
                and parts[-3] in found
                and Path(member.name).suffix.lower() in IMAGE_SUFFIXES
            ):
                found[parts[-3]].append((parts[-2], member.name))
    return {split: sorted(items) for split, items in found.items()}


def _cache_path(source: Path, fingerprint: str) -> Path:
    """``source``'s cache file: beside the data when that folder is writable, else in ``$MPQ_CACHE_DIR``
    (default ``~/.cache/mpq``)."""
    name = f"{source.name}.{fingerprint}.mpq-cache.safetensors"
    beside = source.parent if source.is_file() else source
    # the folder's write bits, not only access(): root may write anywhere, but a folder shipped read-only
    # (a shared dataset) is not the place for a cache
    if beside.stat().st_mode & 0o222 and os.access(beside, os.W_OK):
        return beside / ".mpq-cache" / name
    return Path(os.environ.get("MPQ_CACHE_DIR", Path.home() / ".cache" / "mpq")) / name


def _cached_image_splits(source: Path, splits: tuple[str, str], classes: tuple[str, ...] | None = None):
    """``((x_train, y_train), (x_test, y_test))`` as uint8 ``(N, 3, H, W)`` and int64 labels, from a folder
    or archive of ``SPLIT/CLASS/IMAGE`` files. The first call decodes every image and writes a cache
    (safetensors, keyed by the files' names, sizes and times); later calls read only the cache."""
    from safetensors.torch import load_file

    from .rundir import save_safetensors

    # the cache key: an archive's path, size and time (listing it means decompressing it); a folder's files
    archive = source.is_file()
    members = None if archive else _image_members(source, splits)
    stat = source.stat()
    key = [str(source.resolve()), list(splits), list(classes or []), f"order-{_CACHE_ORDER_SEED}"]
    if archive:
        key += [stat.st_size, stat.st_mtime_ns]
    else:
        key.append(
            [
                (m, (source / m).stat().st_size, (source / m).stat().st_mtime_ns)
                for items in members.values()
                for _, m in items
            ]
        )
    cache = _cache_path(source, hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16])
    if cache.is_file():
        try:
            tensors = load_file(str(cache))
            return tuple((tensors[f"{s}.images"], tensors[f"{s}.labels"]) for s in splits)
        except Exception:  # a damaged cache is rebuilt
            cache.unlink(missing_ok=True)
    members = members or _image_members(source, splits)
    if not members[splits[0]] or not members[splits[1]]:
        raise MpqError(f"{source}: no images under {splits[0]}/<class>/ and {splits[1]}/<class>/")
    found_classes = sorted({c for items in members.values() for c, _ in items})
    classes = classes or tuple(found_classes)
    unknown = sorted(set(found_classes) - set(classes))
    if unknown:
        raise MpqError(f"{source}: unexpected class folders {unknown[:3]} (expected {', '.join(classes)})")
    index = {c: i for i, c in enumerate(classes)}
    tensors = {}
    for split in splits:
        images = _decode_all(source, [m for _, m in members[split]])
        labels = torch.tensor([index[c] for c, _ in members[split]], dtype=torch.int64)
        # files come sorted by class; a fixed shuffle makes every prefix (--limit-val-batches) a fair sample
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_CACHE_ORDER_SEED))
        tensors[f"{split}.images"], tensors[f"{split}.labels"] = images[order].contiguous(), labels[order]
    try:
        save_safetensors(cache, tensors, {"mpq.classes": ",".join(classes), "mpq.source": str(source.resolve())})
    except OSError:  # no writable cache folder: decode again next time
        pass
    else:
        _drop_stale_caches(cache, source)
    return tuple((tensors[f"{s}.images"], tensors[f"{s}.labels"]) for s in splits)


def _drop_stale_caches(kept: Path, source: Path) -> None:
    """Remove the caches of ``source`` that ``kept`` replaces: an archive copied again or a folder whose files
    changed gets a new key, and each stale cache is a full uint8 copy of the dataset (185 MB for CIFAR-10).
    Only caches that say they are of the same source go; another dataset of the same file name keeps its own."""
    from safetensors import safe_open

    for other in kept.parent.glob(f"{source.name}.*.mpq-cache.safetensors"):
        if other == kept:
            continue
        try:
            with safe_open(str(other), framework="pt") as f:
                recorded = (f.metadata() or {}).get("mpq.source")
            # older caches recorded the path as given (perhaps relative): resolved from here, or left alone
            if recorded is not None and Path(recorded).resolve() == source.resolve():
                other.unlink()
        except Exception:  # unreadable, or another process's: not ours to judge
            continue


def _decode_all(source: Path, names: list[str]) -> torch.Tensor:
    """Decode images (all of one size) into one uint8 ``(N, 3, H, W)`` tensor."""
    import io

    from PIL import Image, UnidentifiedImageError

    def decode(data: bytes, name: str) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data)) as img:
                return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        except (OSError, UnidentifiedImageError) as exc:
            raise MpqError(f"{source}: cannot decode {name} ({exc})") from None

    if source.is_dir():
        images = [decode((source / n).read_bytes(), n) for n in names]
    else:
        wanted = set(names)
        raw: dict[str, bytes] = {}
        with tarfile.open(source) as tar:
            for member in tar:
                if member.name in wanted:
                    raw[member.name] = tar.extractfile(member).read()
        images = [decode(raw[n], n) for n in names]
    sizes = {tuple(img.shape) for img in images}
    if len(sizes) != 1:
        raise MpqError(f"{source}: images of several sizes {sorted(sizes)[:3]}; resize them to one size first")
    return torch.stack(images)
