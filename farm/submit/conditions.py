"""ControlNet condition images at submit: read each safely, decode it once, hash it, store it content-addressed.

A path typed on the command line (`--control-image`) is the user's own and trusted. A path inside a prompt file
(or a `Client.submit` row) comes from whoever wrote the file: it must lie inside the file's folder or a folder the
user named (`--control-dir`), is opened one component at a time below that folder without following a symlink
(no check-then-open race), must be a regular file (no FIFO that hangs, no device), and is read up to a size cap.
Whatever is wrong with such a path, the error says the same thing, so a prompt file cannot probe which files exist.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from farm.errors import InvalidSubmission
from farm.storage import Storage, StoredObject

FIELD = "control_image"
CONDITIONS_FOLDER = "_conditions"  # dataset names start with a letter or digit, so this never collides
_FORMAT_NAME = re.compile(r"^[A-Z0-9]{2,16}$")
_EXTENSIONS = {"JPEG": "jpg", "TIFF": "tif"}
MAX_CONDITION_BYTES = 64 << 20  # FARM_CONTROL_IMAGE_MAX_BYTES: an edge map is a few MB at 4096 px
# What Pillow raises on broken files varies with the format and the damage.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class ConditionImage:
    """A condition image that decodes: where it is here, its bytes' sha256, and where it was first named."""

    path: Path
    sha256: str
    format: str  # Pillow's format name: PNG, JPEG, WEBP, …
    origin: str | None  # the prompt file naming it, None for --control-image
    line: int | None
    value: str  # as written in the file or option
    load: Callable[[], bytes] = field(repr=False, compare=False, default=lambda: b"")  # reads it again, as safely
    width: int = 0  # pixels, as decoded
    height: int = 0

    def error(self, message: str) -> InvalidSubmission:
        """An InvalidSubmission naming where this image was given."""
        return InvalidSubmission(
            f"{message}, got {self.value!r}", path=self.origin, line=self.line, field=FIELD, value=self.value
        )

    @property
    def content_type(self) -> str:
        """The MIME type of the stored bytes."""
        Image.init()  # Pillow fills its MIME table as it registers the format plugins
        return Image.MIME.get(self.format, "application/octet-stream")


class Unreadable(ValueError):
    """The file cannot be used; the message says why (shown for trusted paths only)."""


def read_trusted(path: Path, max_bytes: int) -> bytes:
    """A path the user typed: followed as given, but only a regular file is read, and at most max_bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise Unreadable("control image not found") from None
    except IsADirectoryError:
        raise Unreadable("control image is a folder, not a file") from None
    except OSError as exc:
        raise Unreadable(f"control image cannot be read ({exc.strerror or exc})") from None
    return _read_capped(fd, max_bytes)


def read_confined(roots: Sequence[Path], base: Path, value: str, max_bytes: int) -> bytes:
    """A path from a prompt file: relative to ``base``, or absolute inside one of ``roots`` (``base`` is one of
    them). Opened component by component with O_NOFOLLOW below the root, so neither '..' nor a symlink anywhere
    below it can lead outside, whatever happens to the folders meanwhile."""
    given = PurePosixPath(value)
    if "\x00" in value or ".." in given.parts:
        raise Unreadable("the path leaves the allowed folders")
    if given.is_absolute():
        root = next((r for r in roots if given.is_relative_to(PurePosixPath(r))), None)
        if root is None:
            raise Unreadable("the path is outside the allowed folders")
        parts = given.relative_to(PurePosixPath(root)).parts
    else:
        root, parts = base, given.parts
    parts = tuple(p for p in parts if p not in ("", "."))
    if not parts:
        raise Unreadable("the path names a folder")
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(root, flags)
    except OSError as exc:
        raise Unreadable(f"the folder {root} cannot be opened ({exc.strerror})") from None
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as exc:
        raise Unreadable(f"cannot open it ({exc.strerror})") from None
    finally:
        os.close(fd)
    return _read_capped(leaf, max_bytes)


def _read_capped(fd: int, max_bytes: int) -> bytes:
    """Read a regular file's descriptor (closing it), refusing anything else and anything over max_bytes."""
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise Unreadable("control image is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise Unreadable("control image is not a regular file (a device, a FIFO or a socket)")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(f"control image is larger than {max_bytes} bytes (FARM_CONTROL_IMAGE_MAX_BYTES)")
        return b"".join(chunks)
    except OSError as exc:
        raise Unreadable(f"control image cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


class TooLarge(Unreadable):
    """Over the size cap: said as it is, whoever named the file (the cap is the user's own setting)."""


def inspect_condition(data: bytes) -> tuple[str, str, tuple[int, int]]:
    """(sha256, Pillow format, (width, height)) of image bytes that open and fully decode; Unreadable if not."""
    if not data:
        raise Unreadable("control image is an empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # load() decodes every pixel: a truncated file fails here, at submit, not inside a worker.
            image.load()
            image_format = image.format or ""
            size = image.size
    except UnidentifiedImageError:
        raise Unreadable("control image is not an image Pillow can read") from None
    except _DECODE_ERRORS as exc:
        raise Unreadable(f"control image cannot be decoded ({type(exc).__name__}: {exc})") from None
    if not _FORMAT_NAME.fullmatch(image_format):
        raise Unreadable(f"control image has an unusable format name {image_format!r}")
    return hashlib.sha256(data).hexdigest(), image_format, size


class ConditionImages:
    """The condition images of one submission: each distinct path read, decoded and hashed once."""

    def __init__(self, *, roots: Sequence[Path] = (), max_bytes: int = MAX_CONDITION_BYTES) -> None:
        self.roots = tuple(root.resolve() for root in roots)
        self.max_bytes = max_bytes
        self._by_key: dict[tuple[str, ...], ConditionImage] = {}
        self._by_sha: dict[str, ConditionImage] = {}

    def check_trusted(self, path: Path, value: str) -> ConditionImage:
        """An image named on the command line: the user's own path, with specific errors."""
        resolved = path.expanduser().absolute()
        key = ("trusted", str(resolved))
        if key in self._by_key:
            return self._by_key[key]

        def load() -> bytes:
            return read_trusted(resolved, self.max_bytes)

        return self._add(key, load, origin=None, line=None, value=value, confined=False)

    def check_row(self, value: str, *, base: Path, origin: str, line: int) -> ConditionImage:
        """An image a prompt file names: confined to its folder (and --control-dir), one error for every fault."""
        base = base.resolve()
        key = ("row", str(base), value)
        if key in self._by_key:
            return self._by_key[key]
        roots = (base, *self.roots)

        def load() -> bytes:
            return read_confined(roots, base, value, self.max_bytes)

        return self._add(key, load, origin=origin, line=line, value=value, confined=True)

    def _add(
        self,
        key: tuple[str, ...],
        load: Callable[[], bytes],
        *,
        origin: str | None,
        line: int | None,
        value: str,
        confined: bool,
    ) -> ConditionImage:
        try:
            sha256, image_format, (width, height) = inspect_condition(load())
        except TooLarge as exc:
            raise InvalidSubmission(f"{exc}, got {value!r}", path=origin, line=line, field=FIELD, value=value) from None
        except Unreadable as exc:
            reason = str(exc) if not confined else self._confined_reason(key[1])
            raise InvalidSubmission(
                f"{reason}, got {value!r}", path=origin, line=line, field=FIELD, value=value
            ) from None
        image = ConditionImage(Path(value), sha256, image_format, origin, line, value, load, width, height)
        self._by_key[key] = image
        self._by_sha.setdefault(sha256, image)  # two paths, same bytes: one object to store
        return image

    def _confined_reason(self, base: str) -> str:
        folders = ", ".join(dict.fromkeys([base, *map(str, self.roots)]))
        return f"control image must be a readable image file inside {folders} (or a folder given with --control-dir)"

    def distinct(self) -> tuple[ConditionImage, ...]:
        """One image per distinct content, in first-use order."""
        return tuple(self._by_sha.values())


def condition_key(prefix: str, sha256: str, image_format: str) -> str:
    """`{prefix}/_conditions/{sha256}.{ext}`: content-addressed and shared by every dataset in the storage."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a hex sha256: {sha256!r}")
    extension = _EXTENSIONS.get(image_format, image_format.lower())
    parts = [p for p in prefix.split("/") if p]
    return "/".join([*parts, CONDITIONS_FOLDER, f"{sha256}.{extension}"])


def store_condition(image: ConditionImage, storage: Storage) -> StoredObject:
    """Upload the image's original bytes once; an object already there with the same sha256 is reused."""
    key = condition_key(storage.prefix, image.sha256, image.format)
    existing = storage.head(key)
    if existing is not None and existing.sha256 == image.sha256:
        return existing
    try:
        data = image.load()
    except Unreadable as exc:
        raise image.error(f"control image can no longer be read ({exc})") from None
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise image.error("control image changed while the submission was being checked")
    return storage.put(key, data, content_type=image.content_type, metadata={"kind": "condition"})
