"""Checked downloads and archive extraction that cannot write outside its target.

Security rules (each failure raises :class:`DataError` naming the URL, file or
archive member):

* :func:`download` fetches only ``https://`` URLs (also after redirects), plus
  ``file://`` (a local mirror: nothing crosses the network) and plain ``http://``
  to the loopback host (``127.0.0.1``, ``localhost``, ``::1``), which tests use to
  exercise the network code path offline; loopback traffic never leaves the
  machine, so no one can tamper with it in transit. Any other ``http://`` URL is
  refused: use an https mirror or download the file yourself.
* Bytes stream into a temporary file beside the destination, the checksum is
  verified, and only then is the file renamed onto its final name, so a crash or
  a bad download never leaves a truncated or wrong file under that name.
* :func:`safe_extract_tar` / :func:`safe_extract_zip` refuse absolute member
  names, ``..`` components, links whose target resolves outside the destination,
  and special files (devices, FIFOs). They do their own checks, so they work on
  Pythons whose ``tarfile`` lacks extraction filters; where filters exist the
  ``data`` filter is applied as well.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional, Tuple

from ..errors import DataError

LOOPBACK_HOSTS = {"localhost"}
CHUNK = 1 << 20


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str:
    """Return the scheme of an allowed URL; raise :class:`DataError` otherwise."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https":
        return scheme
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DataError(f"refusing {url}: file:// URLs must name a local path")
        return scheme
    if scheme == "http" and _is_loopback(parts.hostname):
        return scheme
    if scheme == "http":
        raise DataError(
            f"refusing to download {url} over plain http (it could be altered in transit); "
            "use an https:// mirror or a file:// URL, or download it yourself and point data.root at it"
        )
    raise DataError(f"refusing to download {url}: only https:// and file:// URLs are allowed")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would happily follow an https -> http redirect; re-apply the URL rules.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def parse_checksum(text: str, what: str = "data.checksum") -> Tuple[Optional[str], Optional[str]]:
    """``'md5:<hex>'``, ``'sha256:<hex>'`` or a bare 32/64-digit hex -> (md5, sha256)."""
    text = (text or "").strip().lower()
    if not text:
        return None, None
    algo, _, digest = text.rpartition(":")
    if not algo:
        algo = {32: "md5", 64: "sha256"}.get(len(digest), "")
    ok_len = {"md5": 32, "sha256": 64}.get(algo)
    if ok_len is None or len(digest) != ok_len or any(ch not in "0123456789abcdef" for ch in digest):
        raise DataError(f"{what}={text!r} is not 'md5:<32 hex digits>' or 'sha256:<64 hex digits>'")
    return (digest, None) if algo == "md5" else (None, digest)


def _hashers(md5: Optional[str], sha256: Optional[str]):
    hs = {}
    if md5:
        hs["md5"] = (hashlib.md5(usedforsecurity=False), md5.lower())
    if sha256:
        hs["sha256"] = (hashlib.sha256(), sha256.lower())
    return hs


def file_digest(path: str | Path, algo: str = "md5") -> str:
    h = hashlib.md5(usedforsecurity=False) if algo == "md5" else hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: str | Path, md5: Optional[str] = None, sha256: Optional[str] = None) -> None:
    """Raise :class:`DataError` naming the file and both digests on a mismatch."""
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want:
            got = file_digest(path, algo)
            if got != want.lower():
                raise DataError(f"{algo} of {path} is {got}, expected {want.lower()}; "
                                "the file is damaged or not the expected one: delete it and retry")


def download(url: str, dest: str | Path, md5: Optional[str] = None, sha256: Optional[str] = None,
             timeout: float = 60.0, progress: bool = False) -> Path:
    """Fetch ``url`` to ``dest`` atomically, verifying ``md5`` and/or ``sha256`` if given.

    The destination only ever appears complete and verified; on any failure the
    temporary file is deleted and a :class:`DataError` names the URL.
    """
    scheme = check_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    hashers = _hashers(md5, sha256)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if scheme == "file":
                src = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
                try:
                    resp = open(src, "rb")
                except OSError as e:
                    raise DataError(f"cannot read {url}: {e}") from None
                expected_size = None
            else:
                opener = urllib.request.build_opener(_CheckedRedirects())
                try:
                    resp = opener.open(url, timeout=timeout)
                except DataError:
                    raise
                except Exception as e:  # URLError, HTTPError, socket timeouts
                    raise DataError(f"download of {url} failed: {e}") from None
                length = resp.headers.get("Content-Length")
                expected_size = int(length) if length and length.isdigit() else None
            bar = None
            if progress:
                try:
                    from tqdm import tqdm

                    bar = tqdm(total=expected_size, unit="B", unit_scale=True, desc=dest.name)
                except ImportError:
                    bar = None
            size = 0
            try:
                with resp:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        size += len(chunk)
                        for h, _ in hashers.values():
                            h.update(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            except OSError as e:
                raise DataError(f"download of {url} failed after {size} bytes: {e}") from None
            finally:
                if bar is not None:
                    bar.close()
            if expected_size is not None and size != expected_size:
                raise DataError(f"download of {url} is truncated: got {size} of {expected_size} bytes")
            out.flush()
            os.fsync(out.fileno())
        for algo, (h, want) in hashers.items():
            got = h.hexdigest()
            if got != want:
                raise DataError(f"checksum mismatch for {url}: expected {algo} {want}, got {got}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


# ----------------------------------------------------------------------------- archives


def _member_parts(name: str, archive: Path) -> Tuple[str, ...]:
    """Lexical checks on a member name; returns its path components."""
    if not name or "\x00" in name:
        raise DataError(f"archive {archive}: member {name!r} has an invalid name")
    win = PureWindowsPath(name)
    if name.startswith(("/", "\\")) or win.drive or PurePosixPath(name).is_absolute():
        raise DataError(f"archive {archive}: member {name!r} has an absolute path")
    parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
    if ".." in parts:
        raise DataError(f"archive {archive}: member {name!r} contains '..' (path traversal)")
    return parts


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link_target(member: tarfile.TarInfo, parts: Tuple[str, ...], root: str, archive: Path) -> str:
    """Resolved path a link member points at (symlinks: relative to their folder;
    hard links: relative to the archive root)."""
    link = member.linkname
    if not link or link.startswith(("/", "\\")) or PureWindowsPath(link).drive:
        raise DataError(f"archive {archive}: link member {member.name!r} points to absolute "
                        f"path {link!r}")
    if member.issym():
        base = os.path.realpath(os.path.join(root, *parts[:-1]))
    else:
        base = root
    return os.path.realpath(os.path.join(base, link))


def _check_tar_member(member: tarfile.TarInfo, root: str, archive: Path, on_disk: bool) -> None:
    parts = _member_parts(member.name, archive)
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise DataError(f"archive {archive}: member {member.name!r} is a special file "
                        "(device or FIFO); refusing to extract it")
    if member.issym() or member.islnk():
        if on_disk:
            target = _link_target(member, parts, root, archive)
        else:
            # before anything exists on disk: a lexical check on the normalised path
            base = parts[:-1] if member.issym() else ()
            _link_target(member, parts, root, archive)  # absolute-path check
            target = os.path.normpath(os.path.join(root, *base, member.linkname))
        if not _inside(target, root):
            kind = "symlink" if member.issym() else "hard link"
            raise DataError(f"archive {archive}: {kind} member {member.name!r} points outside "
                            f"the destination ({member.linkname!r})")
    if on_disk:
        # realpath follows links already on disk (including ones this archive made)
        if not _inside(os.path.realpath(os.path.join(root, *parts)), root):
            raise DataError(f"archive {archive}: member {member.name!r} would be written outside "
                            f"{root} (through a symlink)")


def safe_extract_tar(archive: str | Path, dest: str | Path) -> Path:
    """Extract a (possibly compressed) tar archive into ``dest`` after validating every
    member; a bad member raises :class:`DataError` naming it. All names are checked
    before anything is written, then each member again against the files on disk."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot open archive {archive}: {e}") from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"archive {archive} is damaged: {e}") from None
        for m in members:
            _check_tar_member(m, root, archive, on_disk=False)
        has_filters = hasattr(tarfile, "data_filter")
        for m in members:
            _check_tar_member(m, root, archive, on_disk=True)
            # never restore archived owners, or setuid/world-writable modes
            m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
            if m.isfile() or m.isdir():
                m.mode = (m.mode & 0o755) | (0o700 if m.isdir() else 0o600)
            try:
                if has_filters:
                    tf.extract(m, root, set_attrs=True, filter="data")
                else:
                    tf.extract(m, root, set_attrs=True)
            except tarfile.TarError as e:  # includes tarfile.FilterError
                raise DataError(f"archive {archive}: cannot extract member {m.name!r}: {e}") from None
            except (OSError, EOFError) as e:
                raise DataError(f"archive {archive}: extracting {m.name!r} failed: {e}") from None
    return dest


def safe_extract_zip(archive: str | Path, dest: str | Path) -> Path:
    """Extract a zip archive into ``dest``, refusing absolute names and ``..``.
    Zip entries are written as plain files and folders (never links)."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot open zip archive {archive}: {e}") from None
    with zf:
        infos = zf.infolist()
        checked = [(info, _member_parts(info.filename, archive)) for info in infos]
        for info, parts in checked:
            if not parts:
                continue
            target = os.path.join(root, *parts)
            if not _inside(os.path.realpath(target), root):
                raise DataError(f"archive {archive}: member {info.filename!r} would be written "
                                f"outside {root} (through a symlink)")
            try:
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DataError(f"archive {archive}: extracting {info.filename!r} failed: {e}") from None
    return dest


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        return safe_extract_zip(archive, dest)
    return safe_extract_tar(archive, dest)


def extract_folder(archive: str | Path, parent: str | Path, folder: str) -> Path:
    """Extract ``archive`` (which must contain the top-level ``folder``) so that
    ``parent/folder`` appears only once extraction succeeded: the archive is unpacked
    into a temporary folder in ``parent`` and the finished folder renamed into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / folder
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".extract", dir=parent))
    except OSError as e:
        raise DataError(f"cannot extract {archive} into {parent}: {e}") from None
    try:
        safe_extract(archive, tmp)
        if not (tmp / folder).is_dir():
            found = sorted(p.name for p in tmp.iterdir())[:5]
            raise DataError(f"archive {archive} has no top-level folder '{folder}' (found {found})")
        if final.exists():
            raise DataError(f"{final} already exists; remove it or point data.root at it")
        os.replace(tmp / folder, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
