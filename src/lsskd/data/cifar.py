"""CIFAR-10 / CIFAR-100 from the official python-format archives.

``data.root`` may be the ``.tar.gz`` archive itself, a folder holding it, the
extracted folder (``cifar-100-python/`` or ``cifar-10-batches-py/``), or a folder
holding that. Archives are read in memory (nothing is extracted unless the loader
downloaded the archive itself). The batches are pickled dicts of numpy arrays
and lists; they are loaded with an unpickler that can only rebuild numpy arrays,
so a tampered file cannot run code.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..registry import DATASETS
from .base import ArrayDataset, DataBundle
from ..errors import DataError
from .download import download, extract_folder, parse_checksum, verify_file


@dataclass(frozen=True)
class CifarSpec:
    name: str
    archive: str
    folder: str
    url: str
    md5: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


CIFAR10 = CifarSpec(
    "cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
    "labels", "label_names",
    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarSpec(
    "cifar100", "cifar-100-python.tar.gz", "cifar-100-python",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
    ("train",), ("test",), "meta",
    "fine_labels", "fine_label_names",
    (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
)


def _numpy_globals() -> Dict[Tuple[str, str], object]:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    import codecs

    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # python 3 pickles of bytes at protocol <= 2 go through codecs.encode
        ("_codecs", "encode"): codecs.encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for plain containers of numpy arrays: any other global is refused."""

    def __init__(self, f, source: str):
        super().__init__(f, encoding="bytes")
        self.source = source
        self.allowed = _numpy_globals()

    def find_class(self, module, name):
        obj = self.allowed.get((module, name))
        if obj is None:
            raise DataError(f"{self.source}: refusing to unpickle global {module}.{name} "
                            "(CIFAR batches only contain numpy arrays and lists)")
        return obj


def load_pickle(data: bytes, source: str):
    try:
        return _ArrayUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{source} is not a valid CIFAR pickle: {e}") from None


def _get(d, key: str, source: str):
    if not isinstance(d, dict):
        raise DataError(f"{source}: expected a pickled dict, got {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
    raise DataError(f"{source}: missing key '{key}' (found {keys})")


class _Source:
    """Reads named batch files from an extracted folder or straight from the archive."""

    def __init__(self, spec: CifarSpec, folder: Optional[Path] = None, archive: Optional[Path] = None):
        self.spec, self.folder, self.archive = spec, folder, archive
        self._tar = None
        self._members: Dict[str, tarfile.TarInfo] = {}

    def __enter__(self):
        if self.archive is not None:
            try:
                self._tar = tarfile.open(self.archive, "r:*")
                for m in self._tar.getmembers():
                    parts = [p for p in m.name.split("/") if p not in ("", ".")]
                    if m.isfile() and len(parts) == 2 and parts[0] == self.spec.folder:
                        self._members[parts[1]] = m
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"cannot read archive {self.archive}: {e}") from None
        return self

    def __exit__(self, *exc):
        if self._tar is not None:
            self._tar.close()

    def read(self, fname: str):
        if self._tar is not None:
            source = f"{self.archive}:{self.spec.folder}/{fname}"
            m = self._members.get(fname)
            if m is None:
                raise DataError(f"archive {self.archive} has no member {self.spec.folder}/{fname}; "
                                f"is it the official {self.spec.archive}?")
            try:
                data = self._tar.extractfile(m).read()
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"cannot read {source}: {e}") from None
        else:
            path = self.folder / fname
            source = str(path)
            if not path.is_file():
                raise DataError(f"CIFAR file missing: {path}; point data.root at the official "
                                f"{self.spec.archive} or set data.download=true")
            data = path.read_bytes()
        return load_pickle(data, source), source


def _batches(src: _Source, files, spec: CifarSpec, n_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for fname in files:
        d, source = src.read(fname)
        x = np.asarray(_get(d, "data", source))
        y = np.asarray(_get(d, spec.label_key, source), dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise DataError(f"{source}: key 'data' must be N x 3072 uint8, got "
                            f"{x.shape} {x.dtype}")
        if len(y) != len(x):
            raise DataError(f"{source}: {len(x)} images but {len(y)} '{spec.label_key}'")
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise DataError(f"{source}: label {int(y.max() if y.max() >= n_classes else y.min())} "
                            f"out of range for {n_classes} classes")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(xs))), torch.from_numpy(np.concatenate(ys))


def _locate(spec: CifarSpec, root: Path) -> Tuple[Optional[Path], Optional[Path]]:
    """(extracted folder, archive) found at ``root``; at most one is set."""
    if root.is_file():
        return None, root
    if root.is_dir():
        if (root / spec.meta_file).is_file():
            return root, None
        if (root / spec.folder).is_dir():
            return root / spec.folder, None
        if (root / spec.archive).is_file():
            return None, root / spec.archive
    return None, None


def _download(spec: CifarSpec, root: Path, cfg: Dict) -> Path:
    if root.is_file() or root.name.endswith((".tar.gz", ".tgz")):
        raise DataError(f"data.root={root} names an archive that does not exist; with "
                        "data.download=true set data.root to the folder to download into")
    url = cfg.get("url") or spec.url
    md5, sha256 = parse_checksum(cfg.get("checksum", ""))
    if not (md5 or sha256):
        md5 = spec.md5  # a mirror of the official archive has the official checksum
    archive = root / spec.archive
    if archive.is_file():
        verify_file(archive, md5, sha256)
    else:
        download(url, archive, md5=md5, sha256=sha256, progress=bool(cfg.get("progress", True)))
    return extract_folder(archive, root, spec.folder)


def load_cifar(spec: CifarSpec, cfg: Dict) -> DataBundle:
    root_s = cfg.get("root") or ""
    if not root_s:
        raise DataError(f"data.root must be set for dataset '{spec.name}' (a folder to read "
                        f"{spec.archive} from or download it into)")
    root = Path(root_s).expanduser()
    folder, archive = _locate(spec, root)
    if folder is None and archive is None:
        if not cfg.get("download", False):
            raise DataError(f"no CIFAR data at data.root={root} (expected {spec.archive} or "
                            f"{spec.folder}/); set data.download=true to fetch {spec.url}")
        folder = _download(spec, root, cfg)
    with _Source(spec, folder, archive) as src:
        meta, meta_src = src.read(spec.meta_file)
        names = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in _get(meta, spec.names_key, meta_src)]
        if len(set(names)) != len(names) or not names:
            raise DataError(f"{meta_src}: '{spec.names_key}' must be distinct class names")
        xtr, ytr = _batches(src, spec.train_files, spec, len(names))
        xte, yte = _batches(src, spec.test_files, spec, len(names))
    where = str(archive or folder)
    train = ArrayDataset(xtr, ytr, names, f"{spec.name}:{where}/train")
    test = ArrayDataset(xte, yte, names, f"{spec.name}:{where}/test")
    size = int(cfg.get("image_size", 0) or 0)
    if size and size != 32:
        train.x, test.x = _resize(train.x, size), _resize(test.x, size)
    return DataBundle(train, test, mean=list(spec.mean), std=list(spec.std),
                      info={"dataset": spec.name, "source": where})


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(x), 2048):
        xf = torch.nn.functional.interpolate(x[i:i + 2048].float(), size=(size, size),
                                             mode="bilinear", align_corners=False, antialias=True)
        out.append(xf.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


@DATASETS.register("cifar10")
def cifar10_dataset(cfg: Dict) -> DataBundle:
    """CIFAR-10 (50k train / 10k test, 32x32) from ``cifar-10-python.tar.gz``."""
    return load_cifar(CIFAR10, cfg)


@DATASETS.register("cifar100")
def cifar100_dataset(cfg: Dict) -> DataBundle:
    """CIFAR-100 fine labels (50k train / 10k test, 32x32) from ``cifar-100-python.tar.gz``."""
    return load_cifar(CIFAR100, cfg)
