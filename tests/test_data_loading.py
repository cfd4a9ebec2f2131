"""Image-file loading: subsets chosen before decoding (identical to subsetting after),
cache keys of subsets, parallel decoding, progress and cache messages, greyscale."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from lsskd.config import DEFAULTS
from lsskd.data import build_data, folder as folder_mod
from lsskd.data.base import DataBundle
from lsskd.data.folder import decode_images, decode_image, list_class_folder, load_class_folder
from lsskd.registry import DATASETS

COUNTS = {"ant": 7, "bee": 5, "cat": 9, "dog": 6}  # uneven, so per-class draws differ by class


def data_cfg(**kw):
    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg.update(name="folder", cache_dir="none", progress=False)
    cfg.update(kw)
    return cfg


def make_folder(root: Path, size=(6, 5)) -> Path:
    """train/ and test/ class folders of random-noise PNGs (every image distinct)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, scale in (("train", 1), ("test", 0.5)):
        for c, n in COUNTS.items():
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(max(2, int(n * scale))):
                a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{c}_{k:02d}.png")
    return root


_OLD = "test-folder-decode-everything"


@DATASETS.register(_OLD)
def _decode_everything(cfg):
    """Yesterday's folder factory: decode every file, let build_data subset the tensors."""
    root = Path(cfg["root"])
    train = load_class_folder(root / "train", cache_dir="none", name=f"{root}/train")
    test = load_class_folder(root / "test", classes=train.classes, cache_dir="none", name=f"{root}/test")
    return DataBundle(train, test)


SUBSETS = [
    {},
    {"classes": ["cat", "ant"], "per_class": 3},
    {"classes": 3, "train_fraction": 0.5, "subset_seed": 4},
    {"per_class": 4, "subset_seed": 1, "val_fraction": 0.25},
    {"classes": ["dog", "bee", "cat"], "train_fraction": 0.7, "val_fraction": 0.3, "subset_seed": 2},
]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "all")
def test_subset_before_decoding_equals_subset_after(tmp_path, subset):
    root = make_folder(tmp_path / "f")
    new = build_data(data_cfg(root=str(root), **subset))
    old = build_data(data_cfg(root=str(root), **dict(subset, name=_OLD)))
    assert new.classes == old.classes
    for split in ("train", "test", "val"):
        a, b = getattr(new, split), getattr(old, split)
        if b is None:
            assert a is None
            continue
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y), split
        assert torch.equal(a.source_index, b.source_index), split
        assert a.name == b.name and a.classes == b.classes
    assert new.mean == old.mean and new.std == old.std


def test_only_the_chosen_files_are_decoded(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f")
    seen = []
    real = folder_mod.decode_image

    def counting(path, size=None):
        seen.append(Path(path))
        return real(path, size)

    monkeypatch.setattr(folder_mod, "decode_image", counting)
    b = build_data(data_cfg(root=str(root), classes=["cat", "ant"], per_class=2))
    train_seen = [p for p in seen if p.parts[-3] == "train"]
    test_seen = [p for p in seen if p.parts[-3] == "test"]
    assert len(train_seen) == 4 and len(b.train) == 4
    assert {p.parent.name for p in seen} == {"cat", "ant"}
    assert len(test_seen) == len(b.test) == sum(max(2, int(COUNTS[c] * 0.5)) for c in ("cat", "ant"))


def test_subset_cache_does_not_collide_with_the_full_one(tmp_path):
    root = make_folder(tmp_path / "f")
    cache = tmp_path / "cache"
    sub = build_data(data_cfg(root=str(root), cache_dir=str(cache), classes=["bee", "ant"], per_class=2))
    assert len(list(cache.glob("folder-*.npz"))) == 2  # train subset, test subset
    full = build_data(data_cfg(root=str(root), cache_dir=str(cache)))
    assert len(list(cache.glob("folder-*.npz"))) == 4
    assert len(full.train) == sum(COUNTS.values()) and full.classes == sorted(COUNTS)
    # same subset again comes from its cache, identical
    again = build_data(data_cfg(root=str(root), cache_dir=str(cache), classes=["bee", "ant"], per_class=2))
    assert torch.equal(again.train.x, sub.train.x) and torch.equal(again.train.y, sub.train.y)
    assert torch.equal(again.train.source_index, sub.train.source_index)
    assert torch.equal(again.test.x, sub.test.x)
    # the same classes in another order are relabelled, so they get another cache file
    build_data(data_cfg(root=str(root), cache_dir=str(cache), classes=["ant", "bee"], per_class=2))
    assert len(list(cache.glob("folder-*.npz"))) == 6


def test_parallel_decoding_is_bit_identical_and_ordered(tmp_path):
    root = make_folder(tmp_path / "f")
    _, items = list_class_folder(root / "train")
    paths = [p for p, _ in items] * 30  # 810 files: more than one chunk per thread
    serial = decode_images(paths, workers=1)
    parallel = decode_images(paths, workers=3)
    assert len(serial) == len(parallel) == len(paths)
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel))
    assert all(np.array_equal(a, decode_image(p)) for a, p in zip(parallel[:40], paths[:40]))


def test_parallel_decoding_reports_the_first_bad_file_in_order(tmp_path):
    root = make_folder(tmp_path / "f")
    _, items = list_class_folder(root / "train")
    paths = [p for p, _ in items] * 30
    bad1, bad2 = tmp_path / "bad1.png", tmp_path / "bad2.png"
    bad1.write_bytes(b"not a png")
    bad2.write_bytes(b"nor this")
    paths[700:700] = [bad2]
    paths[300:300] = [bad1]
    with pytest.raises(folder_mod.DataError, match="cannot read image .*bad1.png"):
        decode_images(paths, workers=4)


def test_decode_workers(monkeypatch):
    monkeypatch.delenv("LSSKD_DECODE_WORKERS", raising=False)
    assert folder_mod.decode_workers(10) == 1  # small sets are decoded serially
    assert 1 <= folder_mod.decode_workers(10_000) <= 8
    monkeypatch.setenv("LSSKD_DECODE_WORKERS", "3")
    assert folder_mod.decode_workers(10) == 3
    monkeypatch.setenv("LSSKD_DECODE_WORKERS", "many")
    with pytest.raises(folder_mod.DataError, match="LSSKD_DECODE_WORKERS"):
        folder_mod.decode_workers(10)


def test_progress_bar_and_cache_line_on_stderr(tmp_path, capsys, monkeypatch):
    root = make_folder(tmp_path / "f")
    cache = tmp_path / "cache"
    # not a terminal (a log, a pipe): no bar, so an error stays one line; the cache line shows
    build_data(data_cfg(root=str(root), cache_dir=str(tmp_path / "c0"), progress=True))
    out, err = capsys.readouterr()
    assert out == "" and "decoding" not in err and err.count("cache written to") == 2
    monkeypatch.setattr(folder_mod, "_stderr_is_terminal", lambda: True)
    build_data(data_cfg(root=str(root), cache_dir=str(cache), progress=True))
    out, err = capsys.readouterr()
    assert out == ""
    assert "decoding " in err and "img" in err  # the tqdm bar
    written = [ln for ln in err.splitlines() if "cache written to" in ln]
    assert len(written) == 2
    files = sorted(cache.glob("folder-*.npz"))
    for f in files:
        kb = f.stat().st_size / 1024
        assert any(str(f) in ln and f"({kb:.1f} KB)" in ln for ln in written)
    build_data(data_cfg(root=str(root), cache_dir=str(cache), progress=True))
    err = capsys.readouterr().err
    assert sum("decoded images from cache" in ln for ln in err.splitlines()) == 2
    assert "decoding " not in err
    build_data(data_cfg(root=str(root), cache_dir=str(tmp_path / "c2"), progress=False))
    assert capsys.readouterr().err == ""


def test_train_progress_false_silences_data_decoding(tmp_path, capsys, monkeypatch):
    """train.progress reaches the data loaders (issue 20.2): with it off, decoding shows no
    bar and no cache line; with it on, both show. The saved config is unchanged (no data
    key is added) and the decoded data is the same either way."""
    from lsskd.config import build_config
    from lsskd.engine.trainer import Trainer

    monkeypatch.setattr(folder_mod, "_stderr_is_terminal", lambda: True)  # as at a terminal
    root = make_folder(tmp_path / "f")
    common = ["data.name=folder", f"data.root={root}", "model.name=resnet8", "train.device=cpu",
              "train.tensorboard=false", "train.batch_size=4"]
    seen = {}
    for on in (False, True):
        cfg = build_config(None, common + [f"out_dir={tmp_path / f'run{on}'}", f"train.progress={str(on).lower()}",
                                           f"data.cache_dir={tmp_path / f'cache{on}'}"])
        capsys.readouterr()
        tr = Trainer(cfg)
        err = capsys.readouterr().err
        assert ("decoding " in err, err.count("cache written to")) == ((True, 2) if on else (False, 0)), err
        assert "progress" not in cfg["data"]
        seen[on] = (tr.bundle.train.x, tr.bundle.test.x)
    assert all(torch.equal(a, b) for a, b in zip(seen[False], seen[True]))


def test_eval_and_deploy_follow_the_runs_train_progress(tmp_path, capsys, monkeypatch):
    """lsskd eval and the deploy commands build the run's data as training did: a run made
    with train.progress=false decodes silently there too (no bar, no cache line), and with
    the flag overridden on, both show."""
    from lsskd.config import build_config
    from lsskd.deploy import read_run
    from lsskd.engine.evaluation import evaluate_checkpoint
    from lsskd.engine.trainer import Trainer

    monkeypatch.setattr(folder_mod, "_stderr_is_terminal", lambda: True)
    root = make_folder(tmp_path / "f")
    cfg = build_config(None, ["data.name=folder", f"data.root={root}", "model.name=resnet8", "train.device=cpu",
                              "train.tensorboard=false", "train.batch_size=8", "train.epochs=1",
                              "train.progress=false", f"data.cache_dir={tmp_path / 'cache'}",
                              f"out_dir={tmp_path / 'run'}"])
    Trainer(cfg).fit()
    capsys.readouterr()
    ckpt = tmp_path / "run" / "last.pt"
    evaluate_checkpoint(ckpt)
    read_run(ckpt).bundle()
    err = capsys.readouterr().err
    assert "decoding " not in err and "cache" not in err, err
    evaluate_checkpoint(ckpt, overrides=["train.progress=true", f"data.cache_dir={tmp_path / 'cache2'}"])
    err = capsys.readouterr().err
    assert "decoding " in err and err.count("cache written to") == 2, err


def test_greyscale_and_palette_images_become_three_equal_channels(tmp_path):
    """docs/data.md: a 1-channel (L) image in a class folder is copied to R, G and B."""
    from PIL import Image

    root = tmp_path / "g"
    for split in ("train", "test"):
        for c, v in (("a", 40), ("b", 200)):
            d = root / split / c
            d.mkdir(parents=True)
            Image.new("L", (4, 4), v).save(d / "0.png")
            Image.new("RGB", (4, 4), (v, v // 2, 7)).save(d / "1.png")
    b = build_data(data_cfg(root=str(root)))
    assert b.train.x.shape == (4, 3, 4, 4)
    assert b.train.x[0].unique().tolist() == [40] and b.train.x[2].unique().tolist() == [200]
    assert b.train.x[1, :, 0, 0].tolist() == [40, 20, 7]


def test_flip_is_on_by_default_and_data_augment_flip_false_turns_it_off(tmp_path):
    """docs/data.md: horizontal flip is on by default; data.augment.flip=false turns it off
    in the trainer's augmentation (here with crops off, so only a flip could change x)."""
    from lsskd.config import build_config
    from lsskd.engine.trainer import Trainer

    root = make_folder(tmp_path / "f", size=(8, 8))
    common = [f"out_dir={tmp_path / 'run'}", "data.name=folder", f"data.root={root}", "data.cache_dir=none",
              "data.augment.crop_padding=0", "model.name=resnet8", "train.device=cpu",
              "train.progress=false", "train.tensorboard=false", "train.batch_size=4"]
    assert DEFAULTS["data"]["augment"]["flip"] is True
    x = build_data(data_cfg(root=str(root))).train.x
    flipped = {}
    for flag in ([], ["data.augment.flip=false"]):
        tr = Trainer(build_config(None, common + flag))
        out, _ = tr.aug(x, torch.Generator().manual_seed(0))
        plain = tr.aug.normalize(x)
        same = [torch.equal(o, p) for o, p in zip(out, plain)]
        mirrored = [torch.equal(o, p.flip(-1)) for o, p in zip(out, plain)]
        assert all(s or m for s, m in zip(same, mirrored))
        flipped[bool(flag)] = sum(m and not s for s, m in zip(same, mirrored))
    assert flipped[False] > 5 and flipped[True] == 0  # 27 images, each flipped with p = 1/2


_OLD_TINY = "test-tiny-decode-everything"


@DATASETS.register(_OLD_TINY)
def _tiny_decode_everything(cfg):
    """Yesterday's Tiny-ImageNet factory: decode every listed file, subset afterwards."""
    from lsskd.data.folder import load_items
    from lsskd.data.tiny_imagenet import list_tiny_imagenet

    folder = Path(cfg["root"])
    classes, _, train_items, val_items = list_tiny_imagenet(folder)
    return DataBundle(load_items(train_items, classes, None, "none", f"tiny_imagenet:{folder}/train"),
                      load_items(val_items, classes, None, "none", f"tiny_imagenet:{folder}/val"))


@pytest.mark.parametrize("subset", [{"classes": ["n03", "n01"], "per_class": 1, "subset_seed": 3},
                                    {"classes": 2, "train_fraction": 0.5}])
def test_tiny_imagenet_subset_before_decoding_equals_subset_after(tmp_path, subset):
    from test_data_sources import make_tiny

    folder = make_tiny(tmp_path / "tiny-imagenet-200")
    new = build_data(data_cfg(name="tiny_imagenet", root=str(folder), **subset))
    old = build_data(data_cfg(name=_OLD_TINY, root=str(folder), **subset))
    assert new.classes == old.classes
    for split in ("train", "test"):
        a, b = getattr(new, split), getattr(old, split)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.source_index, b.source_index)
    descriptions = {"n01": "goldfish, Carassius auratus", "n02": "cat", "n03": "dog"}
    assert new.info["class_descriptions"] == [descriptions[c] for c in new.classes]
