"""URLs and whole-or-nothing I/O on any fsspec filesystem (local paths, file://, s3://).

S3 goes through s3fs, which honours the standard AWS variables, AWS_ENDPOINT_URL included.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from typing import Any

import fsspec
from fsspec.registry import get_filesystem_class

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


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
    cls = get_filesystem_class(scheme(uri) or "file")
    return cls(**cls._get_kwargs_from_urls(uri)), cls._strip_protocol(uri)


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
    fs, path = filesystem(uri)
    return fs.exists(path)


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
    """Keyword options for readers that take fsspec `storage_options` (pandas, pyarrow)."""
    if str(uri).startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return {}


def write_json(uri: str, record: Any) -> None:
    """The one JSON writer of every record the project leaves (run, training, CV, bundle config):
    indented, keys sorted, timestamps and other non-JSON values as their text, written whole."""
    write_text(uri, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))
