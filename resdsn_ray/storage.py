"""URLs and whole-or-nothing I/O on any fsspec filesystem (local paths, file://, s3://).

S3 goes through s3fs, which honours the standard AWS variables, AWS_ENDPOINT_URL included.
Every S3 client the project makes retries throttling and 5xx answers with botocore's backoff
(`s3_retries`), and no failure to ask is ever read as "does not exist": only a real
FileNotFoundError is; anything else propagates (`is_retryable` tells a rerun's chance).
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import tempfile
from typing import Any

import fsspec
from fsspec.registry import get_filesystem_class

from resdsn_ray.errors import InputError

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_S3_SCHEMES = ("s3", "s3a")

RETRY_MODES = ("legacy", "standard", "adaptive")
RETRY_MODE = "adaptive"
"""botocore retry mode when AWS_RETRY_MODE is unset: backoff plus client-side rate limiting on throttling."""
MAX_ATTEMPTS = 10
"""Attempts per S3 request (the first included) when AWS_MAX_ATTEMPTS is unset."""
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0
"""Seconds an S3 connection may take to open, and a response to send its next bytes (botocore's
default of 60 each let one stalled GET hold a case for 60 s x every attempt x every s3fs try)."""
S3FS_TRIES = 2
"""Times s3fs repeats a call that still fails after botocore's attempts (its own default: 5)."""


def scheme(uri: str) -> str:
    """The URL scheme of `uri` ('s3', 'file', ...); '' for a local path."""
    match = _SCHEME.match(str(uri))
    return match.group(1).lower() if match else ""


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that holds `uri` and the path inside it, the name taken literally.

    A local path or a single-scheme URL only: fsspec's own `url_to_fs` would read `::` in a
    file name as URL chaining (`colon::chain.nii.gz` opens protocol 'colon', and
    `file:///x/a::b` silently becomes `/x/a`).
    """
    uri = str(uri)
    protocol = scheme(uri) or "file"
    cls = get_filesystem_class(protocol)
    options = cls._get_kwargs_from_urls(uri)
    if protocol in _S3_SCHEMES:
        options = {**_s3_options(), **options}
    fs = cls(**options)
    if protocol in _S3_SCHEMES:
        fs.retries = S3FS_TRIES  # a class attribute in s3fs, not an option
    return fs, cls._strip_protocol(uri)


def s3_retries() -> dict[str, Any]:
    """botocore's `retries` setting of every S3 client: AWS_RETRY_MODE / AWS_MAX_ATTEMPTS (the
    standard variables, which the workers get too) or `RETRY_MODE` x `MAX_ATTEMPTS`.

    botocore retries 500/502/503/504, throttling (SlowDown) and connection errors with
    exponential backoff; s3fs repeats a call that still fails with SlowDown up to its own
    `S3FS_TRIES` times, so one call makes at most S3FS_TRIES x AWS_MAX_ATTEMPTS requests, each
    bounded by the connect and read timeouts.
    """
    mode = os.environ.get("AWS_RETRY_MODE") or RETRY_MODE
    attempts = os.environ.get("AWS_MAX_ATTEMPTS") or str(MAX_ATTEMPTS)
    if mode not in RETRY_MODES:
        raise InputError("AWS_RETRY_MODE", f"must be one of {', '.join(RETRY_MODES)}, not {mode!r}")
    if not attempts.isdigit() or int(attempts) < 1:
        raise InputError("AWS_MAX_ATTEMPTS", f"must be a whole number of at least 1, not {attempts!r}")
    return {"mode": mode, "total_max_attempts": int(attempts)}  # botocore's "max_attempts" would count retries only


def _s3_options() -> dict[str, Any]:
    return {"config_kwargs": {"retries": s3_retries(), "connect_timeout": CONNECT_TIMEOUT_S,
                              "read_timeout": READ_TIMEOUT_S}}


def is_local(uri: str) -> bool:
    return scheme(uri) in ("", "file")


def absolute(uri: str) -> str:
    """A local path made absolute (no `file://`), a URL without its trailing slash: one spelling
    per place, also valid in processes with another working directory (Ray tasks)."""
    uri = str(uri)
    return os.path.abspath(uri.removeprefix("file://")) if is_local(uri) else uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with forward slashes."""
    uri = str(uri)
    if not scheme(uri):
        return os.path.join(uri, *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def exists(uri: str) -> bool:
    """Whether `uri` names a file or folder. Only a real "not found" is False: a 5xx, a denied
    or unreachable store raises (fsspec's `isfile` and s3fs's bucket probe answer False to any
    error)."""
    fs, path = filesystem(uri)
    try:
        fs.info(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def stored_bytes(uri: str) -> int:
    """Bytes `uri` takes in storage: a file's size, or the sum of the files directly in a folder
    (a DICOM series)."""
    fs, path = filesystem(uri)
    info = fs.info(path)
    if info["type"] != "directory":
        return int(info.get("size") or 0)
    return sum(int(entry.get("size") or 0) for entry in fs.ls(path, detail=True) if entry["type"] == "file")


def is_file(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """`fs.isfile(path)` that raises on a failure to ask instead of answering False."""
    try:
        return fs.info(path)["type"] == "file"
    except (FileNotFoundError, NotADirectoryError):
        return False


_RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "OperationAborted", "ConditionalRequestConflict",
})
_RETRYABLE_ERRNOS = frozenset({
    errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN,
})
_RETRYABLE_NAMES = frozenset({  # botocore / aiohttp / fsspec transport errors, matched by name (no import)
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "HTTPClientError", "ResponseStreamingError", "IncompleteRead", "ClientPayloadError", "ServerDisconnectedError",
    "ClientConnectorError", "ClientOSError", "FSTimeoutError",
})


def is_retryable(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) is a transient storage failure that a rerun
    may not meet again: throttling, a 5xx, a timeout or a dropped connection, after botocore's
    own retries. A missing or denied object, or bad content, is not.

    Follows `__cause__` / `__context__`, so an InputError raised `from` an S3 error counts
    (in the process that raised it: pickling keeps only an InputError's source and reason).
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _RETRYABLE_CODES or int(status) >= 500 or int(status) == 429 or code[:1] == "5":
                return True
        if type(current).__name__ in _RETRYABLE_NAMES or isinstance(current, (TimeoutError, ConnectionError)):
            return True
        if isinstance(current, OSError) and current.errno in _RETRYABLE_ERRNOS:
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` at `uri` whole or not at all: no reader ever sees a partial object.

    Locally: a temporary file beside the target, fsynced, then an atomic rename. On object
    stores a PUT (or multipart upload) becomes visible only once complete.
    """
    fs, path = filesystem(uri)
    if not is_local(uri):
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide outputs from other users
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def storage_options(uri: str) -> dict[str, Any]:
    """Keyword options for readers that take fsspec `storage_options` (pandas, pyarrow): the
    retry policy of `filesystem`, and the endpoint."""
    if scheme(uri) not in _S3_SCHEMES:
        return {}
    options = _s3_options()
    if os.environ.get("AWS_ENDPOINT_URL"):
        options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return options


def write_json(uri: str, record: Any) -> None:
    """The one JSON writer of every record the project leaves (run, training, CV, bundle config):
    indented, keys sorted, timestamps and other non-JSON values as their text, written whole."""
    write_text(uri, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))
