"""Construction identity of the model zoo (issue 19.6).

For every registered model (100 classes, or the family's default input), built right
after ``torch.manual_seed(0)``: a SHA-256 of its state_dict (names, dtypes, shapes,
bytes), of the global RNG state after construction (so the order and amount of
random draws is pinned too), and of the branch trunks ``branch_trunk(l, last="block")``
built in sequence for every level. The golden values in ``data/model_hashes.json`` were
recorded at commit 1a4a326, before the zoo was rewritten to one registration line per
name, so a refactor that changes one parameter bit or one random draw fails here.

Re-record (only when a change of construction is intended):
    PYTHONPATH=src python tests/test_model_identity.py --record
"""
from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "data" / "model_hashes.json"
# Models above ~10M parameters take seconds each to initialise on CPU.
HEAVY = {"preact_resnet34", "preact_resnet50", "preact_resnet101", "resnet34", "resnet50",
         "resnext29", "resnext29_8x64d", "wrn_28_10"}


def _digest(sd) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _trunk(model, level):
    if "last" in inspect.signature(model.branch_trunk).parameters:
        return model.branch_trunk(level, last="block")
    return model.branch_trunk(level)  # the code at 1a4a326: one extra block, always


def fingerprint(name: str) -> dict:
    from lsskd.registry import MODELS
    import lsskd.models  # noqa: F401

    torch.manual_seed(0)
    model = MODELS.build(name, num_classes=100)
    out = {"model": _digest(model.state_dict()),
           "rng_after_model": hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()}
    trunks = [_digest(_trunk(model, l).state_dict()) for l in range(model.num_stages)]
    out["trunks_block"] = hashlib.sha256("".join(trunks).encode()).hexdigest()
    out["rng_after_trunks"] = hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()
    return out


def _names():
    """The library's own registered models (tests and plugins may register others)."""
    from lsskd.registry import MODELS
    import lsskd.models  # noqa: F401

    return [n for n in MODELS.names() if MODELS.get(n).__module__.startswith("lsskd.models.")]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in sorted(json.loads(GOLDEN.read_text()))])
def test_construction_is_bit_identical_to_1a4a326(name):
    assert fingerprint(name) == json.loads(GOLDEN.read_text())[name]


def test_every_library_model_has_a_fingerprint():
    assert sorted(json.loads(GOLDEN.read_text())) == sorted(_names())


if __name__ == "__main__" and "--record" in sys.argv:
    table = {}
    for n in _names():
        t = time.time()
        table[n] = fingerprint(n)
        print(f"{n}: {time.time() - t:.1f}s", flush=True)
    GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
