"""Data: in-memory indexed datasets, stratified subsets, batch augmentation."""
from .base import ArrayDataset, BatchIterator, DataBundle, stratified_indices, stratified_split  # noqa: F401
from .augment import BatchAugment, MixInfo  # noqa: F401
from .registry import build_data, build_run_data  # noqa: F401
from . import cifar, digits, tiny_imagenet  # noqa: F401,E402  (register datasets)
from . import sensors  # noqa: F401,E402  (hapt, uci_har)
