"""The one secret scrubber: what the farm prints about its services passes through here first.

redact masks, in every URL of a text, the userinfo password (`redis://:secret@host` → `redis://:***@host`) and
the value of every secret query parameter (`postgresql+psycopg://farm@db/farm?password=secret` →
`…?password=***`), keeping the rest of the URL as it was written. scrub does that and also masks, wherever
they appear (driver messages, tracebacks), the secrets of the configured URLs and the values of the secret
environment variables: drivers quote them unpredictably, so matching URL syntax alone is not enough.

ScrubbingFilter applies scrub to log records, for logs the farm does not format itself (Celery's, kombu's).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, unquote_plus

if TYPE_CHECKING:
    from farm.settings import Settings

# Environment variables whose values are secrets wherever they show up.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD")
MASK = "***"
# Query parameters whose value is a secret: any name (case-insensitive) containing one of these words
# (password, sslpassword, passwd, client_secret, access_token, X-Amz-Security-Token, X-Amz-Signature, …) …
SECRET_PARAMETER_WORDS = ("password", "passwd", "secret", "token", "signature")
# … or exactly one of these names.
SECRET_PARAMETER_NAMES = frozenset({"pwd", "pass", "apikey", "api_key", "api-key", "sig"})

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# Punctuation that, at the very end of a URL inside a sentence, belongs to the sentence ("cannot reach URL: …").
_TRAILING = ".,;:!?)]}"


def is_secret_parameter(name: str) -> bool:
    """True when a URL query parameter of this name carries a secret (its value is masked)."""
    name = unquote_plus(name).strip().lower()
    return name in SECRET_PARAMETER_NAMES or any(word in name for word in SECRET_PARAMETER_WORDS)


def _split(url: str) -> tuple[str, str, str, str, str] | None:
    """(scheme://, userinfo, host and port, path, ?query#fragment) of a URL, each exactly as written."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return None
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    start = tail.find("?")
    if start == -1 or -1 < tail.find("#") < start:  # no query (a "?" inside the fragment is not one)
        return scheme + sep, userinfo + at, hostport, tail, ""
    return scheme + sep, userinfo + at, hostport, tail[:start], tail[start:]


def _mask_query(query: str) -> str:
    """`?a=1&password=x#f` → `?a=1&password=***#f`: secret values masked, names, order and spelling kept."""
    if not query.startswith("?"):
        return query
    body, hash_, fragment = query[1:].partition("#")
    pairs = []
    for pair in body.split("&"):
        name, eq, value = pair.partition("=")
        pairs.append(f"{name}={MASK}" if eq and value and is_secret_parameter(name) else pair)
    return "?" + "&".join(pairs) + hash_ + fragment


def _redact_url(url: str) -> str:
    parts = _split(url)
    if parts is None:
        return url
    scheme, userinfo, hostport, path, query = parts
    if ":" in userinfo:  # userinfo ends with "@"; a ":" in it means a password follows the user name
        userinfo = f"{userinfo.partition(':')[0]}:{MASK}@"
    return scheme + userinfo + hostport + path + _mask_query(query)


def _redact_in_text(match: re.Match[str]) -> str:
    url = match.group(0)
    kept = len(url.rstrip(_TRAILING))
    return _redact_url(url[:kept]) + url[kept:]


def redact(text: str) -> str:
    """Mask the password and secret query values of a URL, or of every URL inside a longer text.

    Other text is unchanged. Inside a longer text, punctuation ending a URL is taken as the sentence's.
    """
    if _URL.fullmatch(text):
        return _redact_url(text)
    return _URL.sub(_redact_in_text, text)


def secrets_in(*urls: str) -> set[str]:
    """The userinfo password and secret query values of these URLs: raw, percent-decoded and re-encoded.

    Every spelling, because a driver or library may quote whichever form it was handed (kombu re-encodes a
    password it moves into the userinfo, SQLAlchemy decodes query values).
    """
    found: set[str] = set()
    for url in urls:
        parts = _split(url) if url else None
        if parts is None:
            continue
        _scheme, userinfo, _hostport, _path, query = parts
        raw: list[str] = []
        if ":" in userinfo:
            raw.append(userinfo[:-1].partition(":")[2])
        for pair in query[1:].partition("#")[0].split("&") if query.startswith("?") else ():
            name, eq, value = pair.partition("=")
            if eq and is_secret_parameter(name):
                raw.append(value)
        for value in raw:
            found |= {value, unquote(value), unquote_plus(value), quote(unquote(value), safe="")}
    found.discard("")
    return found


def secrets_of(settings: Settings | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """Secrets in the configured URLs and the values of secret variables, longest first."""
    env = os.environ if env is None else env
    urls: Iterable[str] = ()
    if settings is not None:
        urls = (settings.database_url, settings.broker_url, settings.storage_url, settings.s3_endpoint_url or "")
    found = secrets_in(*urls)
    found |= {env[name] for name in SECRET_VARIABLES if env.get(name)}
    return sorted(found, key=len, reverse=True)


def scrub(text: str, settings: Settings | None = None, *, hidden: Iterable[str] | None = None) -> str:
    """Mask every known secret and every URL password in ``text``; ``hidden`` replaces the secrets looked up.

    Known secrets go first: a query value that ends in punctuation is then still masked whole, before redact
    takes that punctuation for the sentence's.
    """
    # Longest first, so a secret that contains another one is masked whole.
    for secret in secrets_of(settings) if hidden is None else sorted(hidden, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return redact(text)


class ScrubbingFilter(logging.Filter):
    """A handler filter that scrubs each record before it is formatted: message, traceback and stack.

    Attached to handlers (not loggers) because a handler filter sees every record the handler writes,
    propagated ones included. The record keeps the scrubbed text (msg set, args emptied), so every later
    handler writes the same clean line; scrubbing twice changes nothing.
    """

    def __init__(self, settings: Settings | None = None, *, hidden: Iterable[str] | None = None) -> None:
        super().__init__()
        self.hidden = sorted(set(secrets_of(settings) if hidden is None else hidden), key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._scrub(record)
        except Exception:  # never let logging fail the caller, and never write what could not be scrubbed
            record.msg, record.args = f"(a {record.levelname} line of {record.name} that could not be scrubbed)", ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True

    def _scrub(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging would print its msg and args raw, so scrub those
            message = f"{record.msg} (arguments: {record.args!r})"
        record.msg, record.args = scrub(message, hidden=self.hidden), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, hidden=self.hidden)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, hidden=self.hidden)
