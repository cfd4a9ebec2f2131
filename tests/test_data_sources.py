"""Dataset loaders, checked downloads, safe extraction, stratified subsets, folder
errors and batch augmentation. Archives are built in the official formats in
tmp_path; nothing touches the network (downloads use file:// and a loopback server)."""
import copy
import functools
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lsskd.config import DEFAULTS
from lsskd.data import BatchAugment, build_data, stratified_indices, stratified_split
from lsskd.errors import DataError
from lsskd.data import augment as aug
from lsskd.data.download import (check_url, download, parse_checksum, safe_extract_tar,
                                 safe_extract_zip)
from lsskd.registry import DATASETS


def data_cfg(**kw):
    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg.update(kw)
    cfg.setdefault("progress", False)
    return cfg


def md5_of(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def ls_all(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


# ---------------------------------------------------------------- CIFAR fixtures

CLASSES = ["apple", "bear"]


def _cifar100_dicts(seed=0):
    rng = np.random.default_rng(seed)
    tr_y = [0, 1, 1, 0, 1, 0]
    te_y = [1, 0, 1, 0]
    # python-2 style: bytes keys, loaded with encoding='bytes' like the official files
    train = {b"batch_label": b"training batch 1 of 1", b"fine_labels": tr_y,
             b"coarse_labels": [4, 7, 7, 4, 7, 4],
             b"filenames": [f"img_{i}.png".encode() for i in range(6)],
             b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8)}
    test = {"batch_label": "testing batch 1 of 1", "fine_labels": te_y,
            "coarse_labels": [7, 4, 7, 4], "filenames": [f"t_{i}.png" for i in range(4)],
            "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8)}
    meta = {"fine_label_names": CLASSES, "coarse_label_names": ["fruit", "large_carnivores"]}
    return train, test, meta


def _add_bytes(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_cifar100_archive(path):
    train, test, meta = _cifar100_dicts()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        _add_bytes(tf, "cifar-100-python/train", pickle.dumps(train, protocol=2))
        _add_bytes(tf, "cifar-100-python/test", pickle.dumps(test, protocol=4))
        _add_bytes(tf, "cifar-100-python/meta", pickle.dumps(meta, protocol=2))
    return train, test


def check_cifar100_bundle(b, train, test):
    assert b.classes == CLASSES
    assert b.train.x.dtype == torch.uint8 and b.train.x.shape == (6, 3, 32, 32)
    assert b.test.x.shape == (4, 3, 32, 32)
    assert b.train.y.dtype == torch.int64
    assert b.train.y.tolist() == train[b"fine_labels"]
    assert b.test.y.tolist() == test["fine_labels"]
    # channel-major rows: the green plane starts at byte 1024, row 1 at byte 32
    d = train[b"data"]
    assert int(b.train.x[2, 1, 0, 0]) == int(d[2, 1024])
    assert int(b.train.x[2, 0, 1, 3]) == int(d[2, 35])
    assert torch.equal(b.train.x, torch.from_numpy(d.reshape(6, 3, 32, 32)))
    assert torch.equal(b.test.x, torch.from_numpy(test["data"].reshape(4, 3, 32, 32)))
    assert b.mean == [0.5071, 0.4865, 0.4409] and b.std == [0.2673, 0.2564, 0.2762]


def test_cifar100_from_archive_and_extracted_folder(tmp_path):
    archive = tmp_path / "dl" / "cifar-100-python.tar.gz"
    train, test = make_cifar100_archive(archive)
    # the archive file itself, then the folder that holds it (read in memory, nothing extracted)
    for root in (archive, archive.parent):
        check_cifar100_bundle(build_data(data_cfg(name="cifar100", root=str(root))), train, test)
    assert ls_all(archive.parent) == ["cifar-100-python.tar.gz"]
    # the extracted folder, and the folder holding it
    out = tmp_path / "x"
    safe_extract_tar(archive, out)
    for root in (out / "cifar-100-python", out):
        check_cifar100_bundle(build_data(data_cfg(name="cifar100", root=str(root))), train, test)


def test_cifar10_batches_in_order(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = ["airplane", "automobile", "bird"]
    batches = []
    for i in range(1, 6):
        d = {b"labels": [i % 3, (i + 1) % 3], b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
        batches.append(d)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(d, protocol=2))
    t = {b"labels": [2, 1, 0], b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8)}
    (folder / "test_batch").write_bytes(pickle.dumps(t, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}, protocol=2))
    b = build_data(data_cfg(name="cifar10", root=str(tmp_path)))
    assert b.classes == names
    assert b.train.y.tolist() == [1, 2, 2, 0, 0, 1, 1, 2, 2, 0]
    assert torch.equal(b.train.x[6], torch.from_numpy(batches[3][b"data"][0].reshape(3, 32, 32)))
    assert b.test.y.tolist() == [2, 1, 0] and b.test.x.shape == (3, 3, 32, 32)
    assert b.mean == [0.4914, 0.4822, 0.4465] and b.std == [0.2470, 0.2435, 0.2616]
    # a missing batch names the file and suggests downloading
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"data_batch_4.*data.download=true"):
        DATASETS.build("cifar10", data_cfg(name="cifar10", root=str(folder)))


def test_cifar_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty.*data.download=true"):
        DATASETS.build("cifar100", data_cfg(name="cifar100", root=str(empty)))
    with pytest.raises(DataError, match="data.root must be set"):
        DATASETS.build("cifar100", data_cfg(name="cifar100"))
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test, meta = _cifar100_dicts()
    (folder / "meta").write_bytes(pickle.dumps(meta))
    (folder / "test").write_bytes(pickle.dumps(test))
    bad = dict(train)
    bad[b"data"] = train[b"data"][:, :100]
    (folder / "train").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"train: key 'data' must be N x 3072 uint8"):
        DATASETS.build("cifar100", data_cfg(name="cifar100", root=str(folder)))
    bad = {k: v for k, v in train.items() if k != b"fine_labels"}
    (folder / "train").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match="missing key 'fine_labels'"):
        DATASETS.build("cifar100", data_cfg(name="cifar100", root=str(folder)))


class _Exploit:
    def __reduce__(self):
        return (os.getpid, ())


def test_cifar_unpickler_refuses_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test, meta = _cifar100_dicts()
    meta = dict(meta, extra=_Exploit())
    (folder / "meta").write_bytes(pickle.dumps(meta))
    with pytest.raises(DataError, match=r"meta: refusing to unpickle global posix.getpid"):
        DATASETS.build("cifar100", data_cfg(name="cifar100", root=str(folder)))


# ---------------------------------------------------------------- downloads

def test_cifar_download_via_file_url(tmp_path):
    src = tmp_path / "mirror" / "cifar-100-python.tar.gz"
    train, test = make_cifar100_archive(src)
    root = tmp_path / "data"
    cfg = data_cfg(name="cifar100", root=str(root), download=True, url=src.as_uri(),
                   checksum=f"md5:{md5_of(src)}")
    check_cifar100_bundle(build_data(cfg), train, test)
    # verified archive + extracted folder; no temporary files left behind
    assert ls_all(root) == ["cifar-100-python", "cifar-100-python.tar.gz", "cifar-100-python/meta",
                            "cifar-100-python/test", "cifar-100-python/train"]
    assert md5_of(root / "cifar-100-python.tar.gz") == md5_of(src)
    # without download the same root now loads from the extracted folder
    check_cifar100_bundle(build_data(data_cfg(name="cifar100", root=str(root))), train, test)
    # a mirror URL without checksum falls back to the official md5, which this file fails
    with pytest.raises(DataError, match=r"checksum mismatch.*eb9058c3a382ffc7106e4002c42a8d85"):
        build_data(data_cfg(name="cifar100", root=str(tmp_path / "other"), download=True,
                            url=src.as_uri()))
    assert not (tmp_path / "other" / "cifar-100-python.tar.gz").exists()


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"lsskd" * 1000)
    good = md5_of(src)
    dest_dir = tmp_path / "dest"
    wrong = "0" * 32
    with pytest.raises(DataError) as e:
        download(src.as_uri(), dest_dir / "file.bin", md5=wrong)
    msg = str(e.value)
    assert src.as_uri() in msg and wrong in msg and good in msg
    assert ls_all(dest_dir) == []
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(DataError, match=f"expected sha256 {'f' * 64}, got {sha}"):
        download(src.as_uri(), dest_dir / "file.bin", sha256="f" * 64)
    assert ls_all(dest_dir) == []
    out = download(src.as_uri(), dest_dir / "file.bin", md5=good, sha256=sha)
    assert out.read_bytes() == src.read_bytes() and ls_all(dest_dir) == ["file.bin"]
    with pytest.raises(DataError, match="cannot read"):
        download((tmp_path / "missing.bin").as_uri(), dest_dir / "m.bin")
    assert ls_all(dest_dir) == ["file.bin"]


def test_url_rules():
    assert check_url("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz") == "https"
    assert check_url("file:///tmp/x.tar.gz") == "file"
    for host in ("127.0.0.1", "localhost", "[::1]", "127.0.0.2"):
        assert check_url(f"http://{host}:8000/x") == "http"
    with pytest.raises(DataError, match=r"plain http.*https:// mirror"):
        check_url("http://cs231n.stanford.edu/tiny-imagenet-200.zip")
    for bad in ("ftp://example.org/x", "file://remote-host/x", "x.tar.gz", "http://10.0.0.1/x"):
        with pytest.raises(DataError, match="refusing"):
            check_url(bad)
    with pytest.raises(DataError, match="plain http"):
        download("http://example.org/x.bin", "/nonexistent-dir-lsskd/x.bin")
    assert not Path("/nonexistent-dir-lsskd").exists()


def test_parse_checksum():
    assert parse_checksum("md5:" + "A" * 32) == ("a" * 32, None)
    assert parse_checksum("b" * 64) == (None, "b" * 64)
    assert parse_checksum("sha256:" + "c" * 64) == (None, "c" * 64)
    assert parse_checksum("") == (None, None)
    for bad in ("md5:123", "sha1:" + "a" * 40, "zz" * 16, "md5:" + "g" * 32):
        with pytest.raises(DataError, match="data.checksum"):
            parse_checksum(bad)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/cifar-100-python.tar.gz")
            self.end_headers()
            return
        super().do_GET()


@pytest.fixture
def loopback_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(served)))
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_over_loopback_http(tmp_path, loopback_server):
    served, base = loopback_server
    train, test = make_cifar100_archive(served / "cifar-100-python.tar.gz")
    md5 = md5_of(served / "cifar-100-python.tar.gz")
    dest = tmp_path / "got" / "c.tar.gz"
    download(f"{base}/cifar-100-python.tar.gz", dest, md5=md5, timeout=10)
    assert md5_of(dest) == md5 and ls_all(dest.parent) == ["c.tar.gz"]
    with pytest.raises(DataError, match=f"checksum mismatch for {base}/cifar-100-python.tar.gz"):
        download(f"{base}/cifar-100-python.tar.gz", tmp_path / "bad" / "c.tar.gz", md5="1" * 32, timeout=10)
    assert ls_all(tmp_path / "bad") == []
    with pytest.raises(DataError, match="404"):
        download(f"{base}/nope.tar.gz", tmp_path / "bad" / "n.tar.gz", timeout=10)
    # an https/loopback URL that redirects to plain http elsewhere is refused
    with pytest.raises(DataError, match="example.invalid"):
        download(f"{base}/redirect", tmp_path / "bad" / "r.tar.gz", timeout=10)
    assert ls_all(tmp_path / "bad") == []
    # the dataset factory over the same server
    cfg = data_cfg(name="cifar100", root=str(tmp_path / "data"), download=True,
                   url=f"{base}/cifar-100-python.tar.gz", checksum=md5)
    check_cifar100_bundle(build_data(cfg), train, test)


# ---------------------------------------------------------------- safe extraction

def _tar_with(path, members):
    with tarfile.open(path, "w") as tf:
        for name, kind, arg in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(arg)
                tf.addfile(info, io.BytesIO(arg))
            else:
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = arg
                tf.addfile(info)
    return path


@pytest.mark.parametrize("filters", [True, False])
def test_safe_extract_tar_refuses_escapes(tmp_path, monkeypatch, filters):
    if not filters:
        # behave like a Python whose tarfile has no extraction filters
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    box = tmp_path / "box"
    box.mkdir()
    dest = box / "dest"
    cases = [
        ([("ok.txt", "file", b"fine"), ("../evil.txt", "file", b"x")], r"'\.\./evil\.txt'.*traversal"),
        ([("a/../../evil.txt", "file", b"x")], r"'a/\.\./\.\./evil\.txt'"),
        ([(str(box / "abs.txt"), "file", b"x")], "absolute path"),
        ([("link", "sym", "../outside"), ("link/pwn.txt", "file", b"x")], r"symlink member 'link' points outside"),
        ([("sub/link", "sym", "../../outside")], r"symlink member 'sub/link' points outside"),
        ([("abslink", "sym", str(box))], "points to absolute path"),
        ([("hard", "lnk", "../evil.txt")], r"hard link member 'hard' points outside"),
    ]
    for i, (members, pattern) in enumerate(cases):
        arc = _tar_with(tmp_path / f"bad{i}.tar", members)
        with pytest.raises(DataError, match=pattern) as e:
            safe_extract_tar(arc, dest)
        assert str(arc) in str(e.value)
        # every name is checked before anything is written
        assert ls_all(box) == ["dest"] and ls_all(dest) == []

    # a symlink already on disk that leads outside is caught at extraction time
    outside = box / "outside"
    outside.mkdir()
    (dest / "escape").symlink_to(outside)
    arc = _tar_with(tmp_path / "via.tar", [("escape/pwn.txt", "file", b"x")])
    with pytest.raises(DataError, match=r"'escape/pwn.txt' would be written outside"):
        safe_extract_tar(arc, dest)
    assert ls_all(outside) == []
    (dest / "escape").unlink()

    # links that stay inside are extracted normally
    arc = _tar_with(tmp_path / "good.tar", [("data/a.txt", "file", b"hello"), ("alias", "sym", "data/a.txt"),
                                           ("data/b.txt", "lnk", "data/a.txt")])
    safe_extract_tar(arc, dest)
    assert (dest / "alias").is_symlink() and (dest / "alias").read_bytes() == b"hello"
    assert (dest / "data" / "b.txt").read_bytes() == b"hello"
    assert ls_all(box) == ["dest", "dest/alias", "dest/data", "dest/data/a.txt", "dest/data/b.txt", "outside"]


def test_safe_extract_zip(tmp_path):
    box = tmp_path / "box"
    box.mkdir()
    for name, pattern in (("../evil.txt", "traversal"), ("/abs.txt", "absolute"), ("C:/x.txt", "absolute")):
        arc = tmp_path / "bad.zip"
        with zipfile.ZipFile(arc, "w") as zf:
            zf.writestr("fine.txt", b"ok")
            zf.writestr(zipfile.ZipInfo(name), b"x")
        with pytest.raises(DataError, match=pattern):
            safe_extract_zip(arc, box / "dest")
        assert ls_all(box) == ["dest"]
    arc = tmp_path / "good.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("top/", b"")
        zf.writestr("top/a/b.txt", b"deep")
    safe_extract_zip(arc, box / "dest")
    assert (box / "dest" / "top" / "a" / "b.txt").read_bytes() == b"deep"


# ---------------------------------------------------------------- Tiny-ImageNet

TINY_WNIDS = ["n02", "n01", "n03"]  # wnids.txt order is not the class order
COLOURS = {"n01": (200, 30, 30), "n02": (30, 200, 30), "n03": (30, 30, 200)}


def make_tiny(root):
    from PIL import Image

    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (root / "words.txt").write_text("n00\tentity\nn01\tgoldfish, Carassius auratus\nn02\tcat\nn03\tdog\n")
    for w in TINY_WNIDS:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (8, 8), COLOURS[w]).save(d / f"{w}_{k}.JPEG", quality=95)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    ann = []
    for k, w in enumerate(["n03", "n01", "n02", "n01"]):
        Image.new("RGB", (8, 8), COLOURS[w]).save(root / "val" / "images" / f"val_{k}.JPEG", quality=95)
        ann.append(f"val_{k}.JPEG\t{w}\t0\t0\t7\t7")
    # a greyscale image is converted to 3 channels
    Image.new("L", (8, 8), 128).save(root / "val" / "images" / "val_4.JPEG")
    ann.append("val_4.JPEG\tn02\t1\t1\t5\t5")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return root


def check_tiny(b):
    assert b.classes == ["n01", "n02", "n03"]
    assert b.info["class_descriptions"] == ["goldfish, Carassius auratus", "cat", "dog"]
    assert b.train.x.shape == (6, 3, 8, 8) and b.train.x.dtype == torch.uint8
    assert b.train.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert b.test.y.tolist() == [2, 0, 1, 0, 1]
    for x, y in zip(b.train.x, b.train.y):
        colour = torch.tensor(COLOURS[b.classes[int(y)]], dtype=torch.float32)
        assert (x.float().mean((1, 2)) - colour).abs().max() <= 4
    assert (b.test.x[4].float() - 128).abs().max() <= 2


def test_tiny_imagenet_folder_and_zip(tmp_path):
    folder = make_tiny(tmp_path / "tiny-imagenet-200")
    cache = tmp_path / "cache"
    b = build_data(data_cfg(name="tiny_imagenet", root=str(folder), cache_dir=str(cache)))
    check_tiny(b)
    assert len(list(cache.glob("folder-*.npz"))) == 2
    assert len(b.mean) == 3  # computed from the train split (no official statistics)
    b2 = build_data(data_cfg(name="tiny_imagenet", root=str(tmp_path), cache_dir=str(cache)))
    assert torch.equal(b2.train.x, b.train.x) and torch.equal(b2.test.x, b.test.x)
    b16 = DATASETS.build("tiny_imagenet", data_cfg(root=str(folder), cache_dir="none", image_size=16))
    assert b16.train.x.shape == (6, 3, 16, 16)

    zdir = tmp_path / "zipped"
    zdir.mkdir()
    with zipfile.ZipFile(zdir / "tiny-imagenet-200.zip", "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, str(p.relative_to(tmp_path)))
    bz = DATASETS.build("tiny_imagenet", data_cfg(root=str(zdir / "tiny-imagenet-200.zip"), cache_dir="none"))
    check_tiny(bz)
    assert torch.equal(bz.train.x, b.train.x)
    assert sorted(p.name for p in zdir.iterdir()) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]

    # download needs an allowed URL and an explicit checksum
    empty = tmp_path / "dl"
    with pytest.raises(DataError, match="http-only"):
        DATASETS.build("tiny_imagenet", data_cfg(root=str(empty), download=True))
    url = (zdir / "tiny-imagenet-200.zip").as_uri()
    with pytest.raises(DataError, match="needs data.checksum"):
        DATASETS.build("tiny_imagenet", data_cfg(root=str(empty), download=True, url=url))
    sha = hashlib.sha256((zdir / "tiny-imagenet-200.zip").read_bytes()).hexdigest()
    bd = DATASETS.build("tiny_imagenet", data_cfg(root=str(empty), download=True, url=url,
                                                  checksum=f"sha256:{sha}", cache_dir="none"))
    check_tiny(bd)


def test_tiny_imagenet_errors(tmp_path):
    folder = make_tiny(tmp_path / "t")
    cfg = data_cfg(name="tiny_imagenet", root=str(folder), cache_dir="none")
    ann = folder / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.write_text(text + "val_9.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:6: image file missing: .*val_9.JPEG"):
        DATASETS.build("tiny_imagenet", cfg)
    ann.write_text(text)
    (folder / "train" / "n02" / "images" / "n02_1.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*n02_1.JPEG"):
        DATASETS.build("tiny_imagenet", cfg)
    with pytest.raises(DataError, match="no Tiny-ImageNet data"):
        DATASETS.build("tiny_imagenet", data_cfg(root=str(tmp_path / "none")))
    ann.write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")  # only lines of absent classes
    with pytest.raises(DataError, match="lists no validation images of the classes in wnids.txt"):
        DATASETS.build("tiny_imagenet", cfg)


def test_tiny_imagenet_few_class_copy_ignores_other_annotation_lines(tmp_path, capsys):
    """A copy with fewer classes keeps the full val_annotations.txt (and maybe not the
    other classes' images): their lines are skipped, counted and reported in one line."""
    import shutil

    folder = make_tiny(tmp_path / "t")
    ann = folder / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_7.JPEG\tn98\t0\t0\t1\t1\nval_8.JPEG\tn99\t0\t0\t1\t1\n"
                   "val_9.JPEG\tn99\t0\t0\t1\t1\n")
    # drop class n03 from the copy: wnids.txt, train folder and its val image (val_0)
    (folder / "wnids.txt").write_text("n02\nn01\n")
    shutil.rmtree(folder / "train" / "n03")
    (folder / "val" / "images" / "val_0.JPEG").unlink()
    capsys.readouterr()
    b = build_data(data_cfg(name="tiny_imagenet", root=str(folder), cache_dir="none"))
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if "ignored" in ln]
    assert len(notes) == 1
    assert "ignored 4 lines of 3 classes not in wnids.txt (n03, n98, n99)" in notes[0]
    assert b.classes == ["n01", "n02"] and b.test.y.tolist() == [0, 1, 0, 1]
    assert b.info["class_descriptions"] == ["goldfish, Carassius auratus", "cat"]


# ---------------------------------------------------------------- digits

def test_digits():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    b = build_data(data_cfg(name="digits"))
    assert b.classes == [str(i) for i in range(10)]
    assert len(b.train) + len(b.test) == 1797
    assert b.train.x.shape[1:] == (3, 8, 8) and b.train.x.dtype == torch.uint8
    full = torch.bincount(torch.as_tensor(load_digits().target), minlength=10)
    te = torch.bincount(b.test.y, minlength=10)
    assert torch.equal(te, torch.round(full.double() * 0.2).long())
    assert set(b.train.source_index.tolist()).isdisjoint(b.test.source_index.tolist())
    imgs = load_digits().images
    i = int(b.test.source_index[0])
    expected = torch.from_numpy(np.rint(imgs[i] * 255 / 16).astype(np.uint8))
    assert all(torch.equal(b.test.x[0, c], expected) for c in range(3))
    b16 = build_data(data_cfg(name="digits", image_size=16))
    assert torch.equal(b16.test.y, b.test.y)  # fixed split
    assert torch.equal(b16.test.x[:, :, ::2, ::2], b.test.x) and torch.equal(b16.test.x[:, :, 1::2, 1::2], b.test.x)
    with pytest.raises(DataError, match="image_size=12"):
        DATASETS.build("digits", data_cfg(image_size=12))


# ---------------------------------------------------------------- stratified subsets (real labels)

def test_stratified_subsets_on_cifar(cifar_bundle):
    y = cifar_bundle.train.y
    counts = torch.bincount(y)
    assert counts.tolist() == [100] * 100
    for frac, k in ((0.25, 25), (0.5, 50), (0.75, 75)):
        idx = stratified_indices(y, frac, seed=3)
        assert torch.bincount(y[idx], minlength=100).tolist() == [k] * 100
        assert torch.equal(idx, torch.unique(idx))  # sorted, no repeats
        assert torch.equal(idx, stratified_indices(y, frac, seed=3))
        assert not torch.equal(idx, stratified_indices(y, frac, seed=4))
    assert torch.bincount(y[stratified_indices(y, per_class=7, seed=1)]).tolist() == [7] * 100
    with pytest.raises(DataError, match="per_class=101"):
        stratified_indices(y, per_class=101)
    for bad in (0.0, 1.5):
        with pytest.raises(DataError, match="train_fraction"):
            stratified_indices(y, bad)

    tr, va = stratified_split(y, 0.2, seed=5)
    assert torch.bincount(y[va], minlength=100).tolist() == [20] * 100
    assert len(set(tr.tolist()) & set(va.tolist())) == 0
    assert torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(len(y)))
    tr2, va2 = stratified_split(y, 0.2, seed=5)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, stratified_split(y, 0.2, seed=6)[1])
    with pytest.raises(DataError, match="val_fraction"):
        stratified_split(y, 1.0)


def test_class_subset_on_cifar(cifar_bundle):
    from lsskd.data.base import resolve_classes

    names = cifar_bundle.classes
    assert resolve_classes(3, names) == [0, 1, 2]
    assert resolve_classes(["worm", "apple"], names) == [99, 0]
    sub = cifar_bundle.train.select_classes([99, 0])
    assert sub.classes == ["worm", "apple"] and len(sub) == 200
    # relabelled in the order given; every sample is one of the original class's images
    assert torch.bincount(sub.y).tolist() == [100, 100]
    assert torch.equal(cifar_bundle.train.y[sub.source_index], torch.where(sub.y == 0, 99, 0))
    assert torch.equal(sub.x[sub.y == 1], cifar_bundle.train.x[cifar_bundle.train.y == 0])
    for bad, match in ((0, "data.classes=0"), (101, "has 100 classes"), (["wrm"], "unknown classes \\['wrm'\\]"),
                       (["apple", "apple"], "more than once"), ("apple", "number of classes or a list"),
                       (True, "number of classes or a list")):
        with pytest.raises(DataError, match=match):
            resolve_classes(bad, names)


def test_build_data_class_subset_applies_before_fraction_and_split():
    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg.update(name="digits", classes=["7", "1", "3"], train_fraction=0.5, val_fraction=0.2)
    b = build_data(cfg)
    assert b.classes == ["7", "1", "3"]
    full = build_data(dict(copy.deepcopy(DEFAULTS["data"]), name="digits"))
    # test set: every test image of those digits, relabelled 7->0, 1->1, 3->2
    for new, old in enumerate((7, 1, 3)):
        assert int((b.test.y == new).sum()) == int((full.test.y == old).sum()) > 0
    n_kept = {c: int((full.train.y == old).sum()) for c, old in enumerate((7, 1, 3))}
    for c in range(3):
        half = round(0.5 * n_kept[c])
        assert int((b.val.y == c).sum()) == round(0.2 * half)
        assert int((b.train.y == c).sum()) + int((b.val.y == c).sum()) == half
    assert set(b.train.source_index.tolist()).isdisjoint(b.val.source_index.tolist())


def test_channel_stats_matches_direct_computation():
    from lsskd.data.base import channel_stats

    x = torch.randint(0, 256, (2100, 3, 5, 4), dtype=torch.uint8, generator=_g(0))  # > one chunk
    mean, std = channel_stats(x)
    xf = x.double() / 255
    assert np.allclose(mean, xf.mean((0, 2, 3)).tolist(), atol=1e-6)
    assert np.allclose(std, xf.std((0, 2, 3)).tolist(), atol=1e-6)
    s = torch.randn(40, 6, 9, generator=_g(1)) * 3 + 1
    assert np.allclose(channel_stats(s)[0], s.double().mean((0, 2)).tolist(), atol=1e-5)
    assert np.allclose(channel_stats(s)[1], s.double().std((0, 2)).tolist(), atol=1e-5)


# ---------------------------------------------------------------- folder dataset errors

def _png(path, colour=(10, 20, 30), size=(4, 4)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_dataset_errors(tmp_path):
    cfg = data_cfg(name="folder", cache_dir="none")
    with pytest.raises(DataError, match=r"data.root does not exist: .*nope"):
        build_data(dict(cfg, root=str(tmp_path / "nope")))
    root = tmp_path / "f"
    for split in ("train", "test"):
        _png(root / split / "cat" / "0.png")
        _png(root / split / "dog" / "0.png", (90, 90, 90))
    b = build_data(dict(cfg, root=str(root)))
    assert b.classes == ["cat", "dog"] and b.train.x.shape == (2, 3, 4, 4)
    assert b.train.x[1, :, 0, 0].tolist() == [90, 90, 90]

    (root / "train" / "eel").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/eel contains no image files"):
        build_data(dict(cfg, root=str(root)))
    (root / "train" / "eel").rmdir()

    (root / "test" / "dog" / "1.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"cannot read image .*test/dog/1.png"):
        build_data(dict(cfg, root=str(root)))
    (root / "test" / "dog" / "1.png").unlink()

    (root / "test" / "dog").rename(root / "test" / "emu")
    with pytest.raises(DataError, match=r"differ from the training classes: missing \['dog'\], unexpected \['emu'\]"):
        build_data(dict(cfg, root=str(root)))
    (root / "test" / "emu").rename(root / "test" / "dog")

    _png(root / "train" / "dog" / "1.png", size=(6, 6))
    with pytest.raises(DataError, match=r"1.png is 6x6 .* data.image_size"):
        build_data(dict(cfg, root=str(root)))
    b = build_data(dict(cfg, root=str(root), image_size=5))
    assert b.train.x.shape == (3, 3, 5, 5) and b.test.x.shape == (2, 3, 5, 5)


# ---------------------------------------------------------------- batch augmentation

def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_random_crop():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=_g(0))
    assert torch.equal(aug.random_crop(x, 0, _g(1)), x)
    out = aug.random_crop(x, 2, _g(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    xp = torch.nn.functional.pad(x, (2,) * 4)
    offsets = set()
    for i in range(6):
        hits = [(a, b) for a in range(5) for b in range(5) if torch.equal(out[i], xp[i, :, a:a + 8, b:b + 8])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 1  # samples get their own offsets
    assert torch.equal(out, aug.random_crop(x, 2, _g(1)))


def test_random_flip():
    x = torch.randn(64, 2, 4, 5, generator=_g(0))
    out = aug.random_flip(x, _g(2))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 64
    sym = torch.cat([x, x.flip(-1)], -1)  # mirror-symmetric images are unchanged
    assert torch.equal(aug.random_flip(sym, _g(3)), sym)


def test_cutout_area():
    x = torch.ones(200, 1, 16, 16)
    out = aug.cutout(x, 4, _g(7))
    inside = 0
    for img in out[:, 0]:
        zy, zx = torch.nonzero(img == 0, as_tuple=True)
        assert len(zy) > 0
        y0, y1, x0, x1 = int(zy.min()), int(zy.max()) + 1, int(zx.min()), int(zx.max()) + 1
        assert len(zy) == (y1 - y0) * (x1 - x0)  # a filled rectangle
        assert y1 - y0 <= 4 and x1 - x0 <= 4
        if 0 < y0 and y1 < 16 and 0 < x0 and x1 < 16:
            inside += 1
            assert len(zy) == 16
        assert torch.all(img[img != 0] == 1)
    assert inside > 50
    assert torch.equal(aug.cutout(x, 0, _g(7)), x)


def test_cutmix_lambda_is_unmixed_area():
    checked = 0
    for seed in range(20):
        x = torch.arange(1, 9, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 2, 12, 10).clone()
        out, mix = aug.cutmix(x, 1.0, _g(seed))
        assert 0.0 <= mix.lam <= 1.0
        for i in range(8):
            j = int(mix.perm[i])
            own = (out[i] == i + 1).float().mean().item()
            other = (out[i] == j + 1).float().mean().item()
            if j != i:
                assert own == pytest.approx(mix.lam, abs=1e-6)
                assert own + other == pytest.approx(1.0)
                checked += 0 < mix.lam < 1
            else:
                assert torch.equal(out[i], x[i])
    assert checked > 10


def test_mixup_interpolates_pixels_and_targets_with_one_lambda():
    # Row i of the batch is the constant i+1, so a mixed row is the constant lam*(i+1) + (1-lam)*(j+1).
    x = torch.arange(1, 9, dtype=torch.float32).view(8, 1, 1).expand(8, 3, 20).clone()  # signals too
    out, mix = aug.mixup(x, 0.4, _g(3))
    assert 0.0 < mix.lam < 1.0 and sorted(mix.perm.tolist()) == list(range(8))
    for i in range(8):
        j = int(mix.perm[i])
        assert torch.allclose(out[i], torch.full((3, 20), mix.lam * (i + 1) + (1 - mix.lam) * (j + 1)))
    # Targets go through the same MixInfo as CutMix's.
    from lsskd.methods.losses import mix_targets

    t = torch.eye(8)
    mt = mix_targets(t, mix)
    assert torch.allclose(mt[0], mix.lam * t[0] + (1 - mix.lam) * t[int(mix.perm[0])])
    # The same generator state gives the same lambda (Beta drawn through numpy seeded from g).
    assert aug.mixup(x, 0.4, _g(3))[1].lam == mix.lam


def test_batch_augment_mixup_every_batch_cutmix_first_and_off_keeps_the_stream():
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=_g(0))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    plain = BatchAugment(mean, std, crop_padding=2)
    off = BatchAugment(mean, std, crop_padding=2, mixup_alpha=0.0)
    g1, g2 = _g(5), _g(5)
    assert torch.equal(plain(x, g1)[0], off(x, g2)[0]) and g1.get_state().equal(g2.get_state())
    mixer = BatchAugment(mean, std, crop_padding=2, mixup_alpha=0.4)
    unmixed, _ = plain(x, _g(5))
    mixed, mix = mixer(x, _g(5))
    assert mix is not None and torch.allclose(mixed, mix.lam * unmixed + (1 - mix.lam) * unmixed[mix.perm])
    # CutMix at probability 1 takes every batch; Mixup only fills in the unmixed ones.
    both = BatchAugment(mean, std, crop_padding=2, cutmix_prob=1.0, mixup_alpha=0.4)
    only_cut = BatchAugment(mean, std, crop_padding=2, cutmix_prob=1.0)
    assert torch.equal(both(x, _g(5))[0], only_cut(x, _g(5))[0])
    sig = BatchAugment([0.0], [1.0], modality="signal", mixup_alpha=1.0)
    assert sig(torch.randn(4, 1, 10, generator=_g(1)), _g(2))[1] is not None


def test_batch_augment_reproducible_and_eval_normalises():
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=_g(0))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    a = BatchAugment(mean, std, crop_padding=2, cutout=4, cutmix_prob=1.0)
    o1, m1 = a(x, _g(11))
    o2, m2 = a(x, _g(11))
    o3, _ = a(x, _g(12))
    assert torch.equal(o1, o2) and torch.equal(m1.perm, m2.perm) and m1.lam == m2.lam
    assert not torch.equal(o1, o3)
    assert o1.shape == (16, 3, 12, 12) and o1.dtype == torch.float32
    ev, mix = a(x, _g(11), train=False)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert mix is None and torch.allclose(ev, ref)
    s = torch.randn(8, 6, 32, generator=_g(1))
    sa = BatchAugment([0.0] * 6, [2.0] * 6, modality="signal", jitter=0.1, scaling=0.1)
    so1, _ = sa(s, _g(4))
    so2, _ = sa(s, _g(4))
    assert torch.equal(so1, so2) and so1.shape == s.shape
    assert (so1 - s / 2).abs().max() > 0 and (so1 - s / 2).abs().mean() < 0.3
