"""The one secret scrubber: what the farm prints about its services passes through here first.

redact masks the password of every URL in a text (`redis://:secret@host` → `redis://:***@host`); scrub does
that and also masks, wherever they appear (driver messages, tracebacks), the passwords of the configured URLs
and the values of the secret environment variables.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from farm.settings import Settings

# Environment variables whose values are secrets wherever they show up.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD")
MASK = "***"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not parts.scheme or password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:{MASK}@{host}", parts.path, parts.query, parts.fragment))


def redact(text: str) -> str:
    """Mask the password of a URL, or of every URL inside a longer text; other text unchanged."""
    if _URL.fullmatch(text):
        return _redact_url(text)
    return _URL.sub(lambda m: _redact_url(m.group(0)), text)


def secrets_of(settings: Settings | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """Passwords in the configured URLs and the values of secret variables, longest first."""
    env = os.environ if env is None else env
    found: set[str] = set()
    urls: Iterable[str] = ()
    if settings is not None:
        urls = (settings.database_url, settings.broker_url, settings.storage_url, settings.s3_endpoint_url or "")
    for url in urls:
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            found |= {password, unquote(password)}
    found |= {env[name] for name in SECRET_VARIABLES if env.get(name)}
    return sorted(found, key=len, reverse=True)


def scrub(text: str, settings: Settings | None = None, *, hidden: Iterable[str] | None = None) -> str:
    """Mask URL passwords and every known secret in ``text``; ``hidden`` replaces the secrets looked up."""
    text = redact(text)
    for secret in secrets_of(settings) if hidden is None else hidden:
        text = text.replace(secret, MASK)
    return text
