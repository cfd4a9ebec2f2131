"""What a new user meets at the command line (issue 20): no accidental default run,
stdout that is only the summary JSON, validation that names the key, plain words for
files that are not checkpoints, a word when a resumed run had already finished."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import run_lsskd as cli
from lsskd.config import RANGES, build_config, check_config, in_range
from lsskd.errors import ConfigError

# A real run in seconds: the bundled digits, two steps per epoch.
TINY = ["data.name=digits", "data.image_size=8", "data.augment.flip=false", "model.name=resnet8",
        "train.batch_size=32", "train.max_steps_per_epoch=2", "train.progress=false",
        "train.tensorboard=false", "train.device=cpu", "train.threads=1", "train.epochs=1"]


# --- 20.1: no --config ------------------------------------------------------------------

def test_train_without_config_or_data_stops_and_says_what_to_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["train"], ["train", "train.epochs=2", "seed=3"]):
        rc, out, err = cli(argv, capsys)
        assert rc == 2 and out == ""
        assert "no --config given" in err and "configs/quickstart.yaml" in err and "data.root=" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_train_without_config_runs_when_the_data_is_named(tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc, out, err = cli(["train", *TINY, f"out_dir={out_dir}"], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["dataset"] == "digits" and summary["epochs"] == 1
    assert (out_dir / "summary.json").is_file()


# --- 20.4: stdout is the summary JSON; notes on stderr with resolved values ---------------

def test_notes_go_to_stderr_with_resolved_values_and_resume_of_a_finished_run_says_so(tmp_path, capsys):
    out_dir = tmp_path / "gated"
    # gate=auto without a held-out split is the fit gate; two steps never reach 50% top-1.
    rc, out, err = cli(["train", *TINY, "method.name=lsskd_robust", f"out_dir={out_dir}"], capsys)
    assert rc == 0, err
    summary = json.loads(out)  # the whole of stdout is one JSON document
    assert summary["gate_max"] == 0.0
    assert "note: the lsskd_robust gate never opened" in err
    assert "method.gate_floor=0.5" in err and "None" not in err
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]

    rc, out2, err2 = cli(["train", "--resume", str(out_dir)], capsys)
    assert rc == 0
    assert "already finished all 1 epochs" in err2 and "nothing was trained" in err2
    again = json.loads(out2)
    assert again["test_top1"] == summary["test_top1"]  # same weights, same test images
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_summary_notes_hook():
    from lsskd.methods.base import Method
    from lsskd.methods.lsskd import LSSKD
    from lsskd.models import build_model

    bb = build_model("resnet8", 3)
    assert Method(bb).summary_notes({"gate_max": 0.0}) == []
    m = LSSKD(build_model("resnet8", 3), {"gate": "fit", "gate_floor": 0.3})
    notes = m.summary_notes({"method": "lsskd", "gate_max": 0.0})
    assert len(notes) == 1 and "method.gate_floor=0.3" in notes[0] and "gap_floor" not in notes[0]
    assert m.summary_notes({"method": "lsskd", "gate_max": 0.25}) == []
    assert m.summary_notes({"method": "lsskd"}) == []  # no gate logged (gate=none)


# --- 20.6: validation ---------------------------------------------------------------------

@pytest.mark.parametrize("override,needle", [
    ("data.train_fraction=1.5", "config key 'data.train_fraction' must be in (0, 1], got 1.5"),
    ("data.train_fraction=0", "'data.train_fraction' must be in (0, 1], got 0"),
    ("data.val_fraction=1.0", "'data.val_fraction' must be in [0, 1), got 1.0"),
    ("data.val_fraction=-0.1", "'data.val_fraction' must be in [0, 1), got -0.1"),
    ("data.augment.cutmix_prob=2", "'data.augment.cutmix_prob' must be in [0, 1], got 2"),
    ("data.augment.cutmix_alpha=0", "'data.augment.cutmix_alpha' must be > 0, got 0"),
    ("data.per_class=-1", "'data.per_class' must be >= 0, got -1"),
    ("optim.momentum=1.5", "'optim.momentum' must be in [0, 1], got 1.5"),
    ("optim.lr_decay=0", "'optim.lr_decay' must be in (0, 1], got 0"),
    ("optim.lr=.nan", "'optim.lr' must be a finite number >= 0, got nan"),
    ("optim.milestones=[10,-1]", "'optim.milestones' must be a list of epochs >= 0, got -1"),
    ("data.val_split=subject", "'data.val_split' must be stratified or group, got 'subject'"),
    ("train.epochs=0", "'train.epochs' must be >= 1, got 0"),
])
def test_ranges_are_checked_before_any_data_is_read(override, needle, tmp_path, capsys):
    cfg = build_config(None, ["data.name=digits", override])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert needle in str(e.value)
    # the same one-line error at the command line, and no run directory
    rc, out, err = cli(["train", "data.name=digits", override, f"out_dir={tmp_path / 'o'}"], capsys)
    assert rc == 2 and needle in err and not (tmp_path / "o").exists()


def test_every_default_lies_in_its_documented_range():
    flat = {}
    from lsskd.config import DEFAULTS, flatten

    flat = flatten(DEFAULTS)
    for key, spec in RANGES.items():
        assert key in flat, f"RANGES names {key}, which is not a config key"
        assert in_range(flat[key], spec), f"default {key}={flat[key]} outside {spec}"
    assert in_range(1.0, "(0, 1]") and not in_range(0.0, "(0, 1]") and in_range(0.0, "[0, 1)")
    assert not in_range(1.0, "[0, 1)") and in_range(3, ">= 3") and not in_range(3, "> 3")
    check_config(build_config(None, ["data.name=digits"]))  # the defaults pass


def test_config_file_not_found_names_the_path_once(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    rc, out, err = cli(["train", "--config", str(missing)], capsys)
    assert rc == 2 and "config file not found" in err
    assert err.count(str(missing)) == 1


class _Other:  # a picklable class that is no tensor container
    pass


@pytest.mark.parametrize("kind", ["text", "empty", "pickle", "json", "zip"])
def test_eval_on_a_file_that_is_not_a_checkpoint_says_so(kind, tmp_path, capsys):
    p = tmp_path / f"model.{kind}"
    if kind == "text":
        p.write_text("hello world\nnot a checkpoint\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "pickle":  # a real pickle, but not written by torch.save
        p.write_bytes(pickle.dumps({"a": [1, 2]}))
    elif kind == "json":
        p.write_text('{"method": {}, "config": {}}')
    else:
        import zipfile

        with zipfile.ZipFile(p, "w") as z:
            z.writestr("a.txt", "x")
    rc, out, err = cli(["eval", "--checkpoint", str(p)], capsys)
    assert rc == 2 and out == ""
    assert f"{p} is not a checkpoint" in err
    assert "--unsafe-load" not in err and "Traceback" not in err and "IndexError" not in err
    if kind == "empty":
        assert "(the file is empty)" in err


def test_eval_offers_unsafe_load_only_for_a_torch_file_with_other_objects(tmp_path, capsys):
    p = tmp_path / "objects.pt"
    torch.save({"method": {}, "config": {}, "x": _Other()}, p)
    rc, out, err = cli(["eval", "--checkpoint", str(p)], capsys)
    assert rc == 2 and "refusing to load checkpoint" in err and "--unsafe-load" in err
    q = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, q)  # a torch file, but not one of ours
    rc, out, err = cli(["eval", "--checkpoint", str(q)], capsys)
    assert rc == 2 and f"{q} is not an lsskd checkpoint" in err and "'config', 'method'" in err


# --- 19.8: provenance -----------------------------------------------------------------------

def test_runs_record_the_commit_and_torch_version_and_still_load(tmp_path, capsys):
    import subprocess
    from pathlib import Path

    import yaml

    import lsskd
    from lsskd.config import build_config, run_config

    out_dir = tmp_path / "run"
    rc, out, err = cli(["train", *TINY, f"out_dir={out_dir}"], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())
    pkg = Path(lsskd.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True)
    for prov in (summary["provenance"], saved["provenance"]):
        assert prov["torch"] == torch.__version__ and prov["lsskd"] == lsskd.__version__
        if head.returncode == 0:  # a checkout: the commit is recorded, and whether it was dirty
            assert prov["git_commit"] == head.stdout.strip() and isinstance(prov["git_dirty"], bool)
        else:
            assert prov["git_commit"] is None and prov["git_dirty"] is None
    # the record is not a setting: the run's config loads for a resume and as a --config file
    assert "provenance" not in run_config(out_dir)
    cfg = build_config(out_dir / "config.yaml", [f"out_dir={tmp_path / 'again'}"])
    assert "provenance" not in cfg and cfg["data"]["name"] == "digits"


def test_provenance_without_git_is_null_not_a_crash(monkeypatch, tmp_path):
    from lsskd.engine.rundir import provenance

    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable anywhere
    prov = provenance()
    assert prov["git_commit"] is None and prov["git_dirty"] is None
    assert prov["torch"] == torch.__version__


def test_sweep_does_not_call_a_different_commit_a_config_change(tmp_path):
    from lsskd.config import EXECUTION_KEYS, dump, is_execution_key
    from lsskd.sweep import config_drift, expand

    (tmp_path / "c.yaml").write_text("data: {name: digits}\ntrain: {epochs: 2}\n")
    spec = expand([str(tmp_path / "c.yaml")], [0], tmp_path / "out")[0]
    spec.out_dir.mkdir(parents=True)
    cfg = build_config(spec.config, spec.train_overrides())
    (spec.out_dir / "config.yaml").write_text(dump({**cfg, "train": {**cfg["train"], "threads": 3},
                                                    "provenance": {"git_commit": "abc", "git_dirty": True}}))
    assert config_drift(spec) == []
    (spec.out_dir / "config.yaml").write_text(dump({**cfg, "train": {**cfg["train"], "epochs": 3}}))
    assert config_drift(spec) == ["train.epochs"]
    assert is_execution_key("provenance.git_commit") and not is_execution_key("seed")
    assert "train.threads" in EXECUTION_KEYS and "seed" not in EXECUTION_KEYS


# --- 19.4: one errors module, library out of the commands ----------------------------------

def test_user_errors_are_defined_once():
    """Each user error is defined in lsskd.errors and nowhere else (modules import it from
    there: tests/test_layering.py)."""
    import ast
    from pathlib import Path

    import lsskd
    from lsskd import errors

    user = (errors.CLIError, errors.ConfigError, errors.DataError, errors.CheckpointError,
            errors.RunDirError, errors.NonFiniteError)
    assert errors.USER_ERRORS == user
    assert issubclass(errors.ResourceError, MemoryError) and errors.ResourceError not in user
    names = {cls.__name__ for cls in (*user, errors.ResourceError)}
    defined = [f"{f.name}:{node.lineno} {node.name}"
               for f in sorted(Path(lsskd.__file__).parent.rglob("*.py"))
               for node in ast.walk(ast.parse(f.read_text()))
               if isinstance(node, ast.ClassDef) and node.name in names]
    assert sorted(d.split(" ")[1] for d in defined) == sorted(names)
    assert all(d.startswith("errors.py:") for d in defined)


def test_no_module_imports_another_modules_private_names():
    import ast
    from pathlib import Path

    import lsskd

    bad = []
    for f in sorted(Path(lsskd.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                bad += [f"{f.name}:{node.lineno} {a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
    assert bad == []


def test_sweep_command_is_thin_and_the_library_importable():
    import lsskd.commands.sweep as cmd
    import lsskd.sweep as lib

    assert {"expand", "run_sweep", "format_table", "load_plan", "execute"} <= set(dir(lib))
    own = [n for n, v in vars(cmd).items() if callable(v) and getattr(v, "__module__", "") == cmd.__name__]
    assert sorted(own) == ["_split_tokens", "add_parser", "run", "specs_from_args"]


# --- 20.8: help on every option, every config key documented -------------------------------

def test_every_option_of_every_subcommand_has_a_help_line():
    import argparse

    from lsskd.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, sp in sub.choices.items()
               for a in sp._actions if not (a.help or "").strip()]
    assert missing == []
    assert {"train", "eval", "tune", "predict", "profile", "bench", "sweep", "report", "export"} <= set(sub.choices)


def test_train_help_points_to_the_config_key_list(capsys):
    rc, out, err = cli(["train", "--help"], capsys)
    assert rc == 0 and "docs/config.md" in out and "configs/quickstart.yaml" in out


def test_docs_config_md_lists_every_key_and_is_up_to_date():
    from pathlib import Path

    from lsskd.config import DEFAULTS, flatten
    from lsskd.configdoc import render
    from lsskd.registry import METHODS

    doc_path = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    doc = doc_path.read_text()
    assert doc == render(), "docs/config.md is stale: python -m lsskd.configdoc > docs/config.md"
    for key, default in flatten(DEFAULTS).items():
        assert f"| `{key}` | " in doc and f"`{json.dumps(default)}`" in doc, key
    assert "| `train.max_steps_per_epoch` | int | `0` | >= 0 | cap steps per epoch" in doc
    builtin = [n for n in METHODS.names() if METHODS.get(n).__module__.startswith("lsskd.")]
    assert {"ce", "lsskd", "lsskd_robust", "pskd", "kd", "byot"} <= set(builtin)
    for name in builtin:
        assert f"### `method.name: {name}`" in doc
        for key in METHODS.get(name).defaults:
            assert f"`method.{key}`" in doc, (name, key)
    # every common key has a meaning written beside its default in config.py
    rows = [ln for ln in doc.split("## Method keys")[0].splitlines() if ln.startswith("| `")]
    assert len(rows) == len(flatten(DEFAULTS))
    # key | type | default | allowed | meaning (a "|" inside a cell is escaped as "\\|")
    cells = [ln.rstrip().removesuffix("|").split(" | ") for ln in rows]
    assert all(len(c) == 5 for c in cells), [c for c in cells if len(c) != 5]
    assert [c[0] for c in cells if not c[4].strip()] == []


# --- 20.9: the documented first comparison actually runs ----------------------------------

def _doc_commands():
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "first_comparison.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", doc, re.S)
    return [shlex.split(b.replace("\\\n", " ")) for b in blocks]


def test_first_comparison_doc_runs_end_to_end(cifar_root, tmp_path, capsys, monkeypatch):
    import shutil
    from pathlib import Path

    cmds = _doc_commands()
    tune_cmd, final_cmd = cmds[0], cmds[-1]
    assert tune_cmd[:2] == ["lsskd", "tune"] and "method.name=[ce,lsskd_selfsup]" in tune_cmd
    # the CutMix variant between them: the same tune with a second grid (a product), not run here
    (cutmix_cmd,) = cmds[1:-1]
    assert cutmix_cmd[:2] == ["lsskd", "tune"] and "data.augment.cutmix_prob=[0.0,0.5]" in cutmix_cmd
    assert [a for a in cutmix_cmd if a != "--grid" and "cutmix" not in a] == [a for a in tune_cmd if a != "--grid"]
    assert final_cmd[:2] == ["lsskd", "train"]
    # a small folder of real images, laid out as the doc says
    images = tmp_path / "MY_IMAGES"
    for split, n in (("train", 12), ("test", 4)):
        for c in sorted(d.name for d in (cifar_root / "train").iterdir())[:3]:
            (images / split / c).mkdir(parents=True)
            for f in sorted((cifar_root / split / c).iterdir())[:n]:
                shutil.copy(f, images / split / c / f.name)
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    quick = ["train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=8", "train.progress=false",
             "train.tensorboard=false", "train.threads=1", "data.cache_dir=none"]

    rc, out, err = cli([*tune_cmd[1:], "--dry-run"], capsys)
    assert rc == 0 and out.count(" train ") == 6  # 2 methods x 3 seeds, nothing run
    assert not Path("runs/first_comparison/tune.json").exists()

    rc, out, err = cli([*tune_cmd[1:], *quick], capsys)
    assert rc == 0, err
    tune = json.loads(Path("runs/first_comparison/tune.json").read_text())
    assert [len(c["val_top1"]) for c in tune["candidates"]] == [3, 3]
    assert tune["val_fraction"] == 0.2
    loser = next(c for c in tune["candidates"] if c is not tune["chosen"] and c["group"] != tune["chosen"]["group"])
    d = [w - x for w, x in zip(tune["chosen"]["val_top1"], loser["val_top1"])]
    line = next(ln for ln in out.splitlines() if "below the winner, paired by seed" in ln)
    assert f"{sum(d) / 3:.2f} ± " in line
    for run in Path("runs/first_comparison").rglob("config.yaml"):
        assert "eval_on: val" in run.read_text()  # the test split was never the yardstick

    rc, out, err = cli([*final_cmd[1:], *quick], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["eval_on"] == "test" and summary["train_size"] == 36  # all training images


def test_a_truncated_checkpoint_is_called_truncated_not_a_stranger(tmp_path):
    from lsskd.engine.checkpoint import is_torch_file, load_checkpoint
    from lsskd.errors import CheckpointError

    p = tmp_path / "last.pt"
    torch.save({"method": {"w": torch.zeros(100)}, "config": {}}, p)
    assert is_torch_file(p)
    p.write_bytes(p.read_bytes()[:200])
    assert is_torch_file(p)
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(p)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert is_torch_file(legacy) and torch.equal(load_checkpoint(legacy)["w"], torch.ones(2))


def test_grayscale_images_in_a_class_folder_become_three_equal_channels(tmp_path):
    """docs/data.md says so; this is the check."""
    import numpy as np
    from PIL import Image

    from lsskd.data.folder import decode_image

    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    rgb = decode_image(tmp_path / "g.png")
    assert rgb.shape == (8, 8, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    """`lsskd sweep --dry-run | head`: when the reader stops early, lsskd exits with the
    shell's SIGPIPE status (141) and no traceback on stderr."""
    import subprocess
    import sys

    from pathlib import Path

    seeds = [str(k) for k in range(3000)]  # a listing far larger than a pipe's buffer
    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    p = subprocess.Popen([sys.executable, "-m", "lsskd", "sweep", "--configs", quickstart,
                          "--out-root", str(tmp_path), "--dry-run", "--seeds", *seeds],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().split()[:2] == [b"run", b"action"]
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


@pytest.mark.parametrize("overrides, needle", [
    (["method.name=lsskd", "method.gate=bogus"], "'method.gate' must be none or fit or gap or auto, got 'bogus'"),
    (["method.name=lsskd_selfsup", "method.alpha_T=1.5"], "'method.alpha_T' must be in [0, 1], got 1.5"),
    (["method.name=lsskd", "method.head_teacher=oracle"], "'method.head_teacher' must be none or deepest"),
    (["method.name=sad_ce", "method.tau=0"], "'method.tau' must be > 0, got 0"),
    (["method.name=lsskd", "method.gate=gap"], "method.gate=gap reads the held-out split"),
    (["method.name=lsskd", "method.branches_when_shut=skip"], "branches_when_shut=skip acts only behind a gate"),
    (["method.name=lsskd", "data.augment.cutmix_prob=1"], "store_mixed=skip keeps CutMix-ed batches"),
    (["method.name=ls", "method.epsilon=1"], "'method.epsilon' must be in [0, 1), got 1"),
    (["method.name=tfkd", "method.T=-1"], "'method.T' must be > 0, got -1"),
    (["method.name=cskd", "method.lambda=-0.5"], "'method.lambda' must be >= 0, got -0.5"),
    (["method.name=byot", "method.alpha=2"], "'method.alpha' must be in [0, 1], got 2"),
    (["method.name=kd"], "method.teacher_checkpoint must name a checkpoint"),
])
def test_method_keys_are_checked_before_any_data_is_read(overrides, needle, tmp_path, capsys):
    # data.root points nowhere: reading any data would fail with a DataError instead.
    args = ["data.name=folder", f"data.root={tmp_path / 'no-such-data'}", *overrides]
    with pytest.raises(ConfigError) as e:
        check_config(build_config(None, args))
    assert needle in str(e.value)
    rc, out, err = cli(["train", *args, f"out_dir={tmp_path / 'o'}"], capsys)
    assert rc == 2 and needle in err and not (tmp_path / "o").exists()


def test_every_method_default_lies_in_its_declared_range_and_choices():
    from lsskd.registry import METHODS

    for name in METHODS.names():
        cls = METHODS.get(name)
        for key, spec in cls.ranges.items():
            assert key in cls.defaults, f"{name}: ranges name {key}, not one of its keys"
            assert in_range(cls.defaults[key], spec), f"{name}: default {key} outside {spec}"
        for key, allowed in cls.choices.items():
            assert cls.defaults[key] in allowed, f"{name}: default {key} not in {allowed}"
