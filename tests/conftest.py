import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LSSKD_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR100_FOLDER = SHARED_DATA / "cifar100"
HAPT_NPZ = SHARED_DATA / "hapt" / "hapt_windows.npz"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared dataset not available: {path}")
    return path


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    return need(CIFAR100_FOLDER)


@pytest.fixture(scope="session")
def cifar_bundle(cifar_root):
    """The shared CIFAR-100 folder data (10k train / 10k test), decoded once."""
    from lsskd.config import DEFAULTS
    from lsskd.data import build_data
    import copy

    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg["root"] = str(cifar_root)
    return build_data(cfg)


def run_lsskd(argv, capsys):
    """(exit status, stdout, stderr) of ``lsskd ARGV`` run in-process; argparse exits count
    as statuses, and torch's thread count is restored (train.threads would leak into later
    tests)."""
    from lsskd.cli import main

    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return rc, out.out, out.err
