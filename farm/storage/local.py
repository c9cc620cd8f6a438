"""Storage in a local folder: atomic writes (temp file, fsync, rename), each confirmed by reading it back."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from farm.errors import StorageError
from farm.storage import BLOCK, Storage, StoredObject, file_digest


class LocalStorage(Storage):
    """Objects as files under one folder; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.prefix = ""

    def _path(self, key: str) -> Path:
        """The file for ``key``, refusing keys that would land outside the root."""
        if not key or key.startswith(("/", "\\")) or "\\" in key or "\x00" in key:
            raise StorageError(f"key {key!r} is not a relative key inside {self.root}")
        path = (self.root / key).resolve()
        # resolve() follows '..' and symlinks, so this also catches a link pointing out of the root.
        if path == self.root or not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} escapes the storage folder {self.root}")
        return path

    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "image/png",
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Write ``data`` atomically at ``key``, then re-read and hash it to confirm."""
        # A plain file has nowhere to keep content_type or metadata; they exist for the interface's sake.
        return self._write(key, [data])

    def put_file(self, key: str, path: Path, *, content_type: str) -> StoredObject:
        """Copy the file ``path`` atomically to ``key``, block by block, then re-read and hash it to confirm."""
        try:
            with path.open("rb") as source:
                return self._write(key, iter(lambda: source.read(BLOCK), b""))
        except OSError as exc:
            raise StorageError(f"could not read {path} to store it at {key!r}: {exc.strerror or exc}") from exc

    def _write(self, key: str, blocks: Iterable[bytes]) -> StoredObject:
        """Write ``blocks`` to a temp file beside ``key``'s file, fsync, rename; confirm by reading it back."""
        path = self._path(key)
        digest = hashlib.sha256()
        size = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The temp file sits in the same folder so os.replace is a same-filesystem atomic rename.
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    for block in blocks:
                        f.write(block)
                        digest.update(block)
                        size += len(block)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
            stored = file_digest(path)
        except OSError as exc:
            raise StorageError(f"could not write {key!r} under {self.root}: {exc.strerror or exc}") from exc
        if stored != (size, digest.hexdigest()):
            raise StorageError(f"{key!r} under {self.root} did not read back as written")
        return StoredObject(uri=path.as_uri(), key=key, sha256=digest.hexdigest(), bytes=size)

    def head(self, key: str) -> StoredObject | None:
        """Describe the file at ``key`` (hashing it), or None when it is absent."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"could not read {key!r} under {self.root}: {exc.strerror or exc}") from exc
        return StoredObject(uri=path.as_uri(), key=key, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))

    def get(self, key: str) -> bytes:
        """Read the file at ``key``."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"no object {key!r} under {self.root}") from exc
        except OSError as exc:
            raise StorageError(f"could not read {key!r} under {self.root}: {exc.strerror or exc}") from exc

    def delete(self, key: str) -> None:
        """Remove the file at ``key`` if it exists."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"could not delete {key!r} under {self.root}: {exc.strerror or exc}") from exc

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Files under the folder ``prefix`` names (temp files of writes in progress excluded)."""
        folder = self.root / prefix if prefix else self.root
        if not folder.resolve().is_relative_to(self.root) or not folder.is_dir():
            return
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(self.root).as_posix()

    def uri_for(self, key: str) -> str:
        """``file:///abs/path`` for ``key``."""
        return self._path(key).as_uri()

    def key_for_uri(self, uri: str) -> str:
        """The key of a ``file://`` URI inside this folder."""
        parts = urlsplit(uri)
        path = Path(unquote(parts.path))
        if parts.scheme != "file" or not path.is_absolute() or not path.is_relative_to(self.root):
            raise StorageError(f"{uri} is not in the farm's storage, {self.describe()}")
        return path.relative_to(self.root).as_posix()

    def presign(self, key: str, expires_s: int) -> str:
        """Nothing to sign in a folder: its ``file://`` URI, usable on this machine or a shared filesystem."""
        return self.uri_for(key)

    def describe(self) -> str:
        """The folder the objects live in."""
        return f"local folder {self.root}"


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable by syncing its folder, where the platform allows it."""
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open a folder for fsync; the rename is still atomic.
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
