"""ControlNet condition images at submit: decode each once, hash it, and store it content-addressed."""

from __future__ import annotations

import hashlib
import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from farm.errors import InvalidSubmission
from farm.storage import Storage, StoredObject

FIELD = "control_image"
CONDITIONS_FOLDER = "_conditions"  # dataset names start with a letter or digit, so this never collides
_FORMAT_NAME = re.compile(r"^[A-Z0-9]{2,16}$")
_EXTENSIONS = {"JPEG": "jpg", "TIFF": "tif"}
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


def inspect_condition(path: Path) -> tuple[str, str]:
    """(sha256, Pillow format) of an image file that opens and fully decodes; ValueError saying why not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError("control image not found") from None
    except IsADirectoryError:
        raise ValueError("control image is a folder, not a file") from None
    except OSError as exc:
        raise ValueError(f"control image cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise ValueError("control image is an empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # load() decodes every pixel: a truncated file fails here, at submit, not inside a worker.
            image.load()
            image_format = image.format or ""
    except UnidentifiedImageError:
        raise ValueError("control image is not an image Pillow can read") from None
    except _DECODE_ERRORS as exc:
        raise ValueError(f"control image cannot be decoded ({type(exc).__name__}: {exc})") from None
    if not _FORMAT_NAME.fullmatch(image_format):
        raise ValueError(f"control image has an unusable format name {image_format!r}")
    return hashlib.sha256(data).hexdigest(), image_format


class ConditionImages:
    """The condition images of one submission: each distinct path decoded and hashed once."""

    def __init__(self) -> None:
        self._by_path: dict[Path, ConditionImage] = {}
        self._by_sha: dict[str, ConditionImage] = {}

    def check(self, path: Path, *, origin: str | None, line: int | None, value: str) -> ConditionImage:
        """Validate the image at `path` (absolute), or return the earlier result for the same file."""
        resolved = path.resolve()
        found = self._by_path.get(resolved)
        if found is not None:
            return found
        try:
            sha256, image_format = inspect_condition(resolved)
        except ValueError as exc:
            raise InvalidSubmission(f"{exc}, got {value!r}", path=origin, line=line, field=FIELD, value=value) from None
        image = ConditionImage(resolved, sha256, image_format, origin, line, value)
        self._by_path[resolved] = image
        self._by_sha.setdefault(sha256, image)  # two paths, same bytes: one object to store
        return image

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
        data = image.path.read_bytes()
    except OSError as exc:
        raise image.error(f"control image can no longer be read ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise image.error("control image changed while the submission was being checked")
    return storage.put(key, data, content_type=image.content_type, metadata={"kind": "condition"})
