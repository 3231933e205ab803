"""Shared fixtures: the real-CT folder beside the repository, pydicom's CT5N series, and a real
S3 endpoint (moto's server in a subprocess on 127.0.0.1, as s3fs's own tests use)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

S3_START_TIMEOUT_S = 60.0
AWS_SECRET_MARKER = f"resdsn-secret-marker-{uuid.uuid4().hex}"
"""The session's S3 secret key: unique, so a test can search Ray's files, APIs and our outputs for it."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`<shared>/data` (real CT: `ct/sts_001`, `ct/crlm_1004`); skips where it is absent.

    `<shared>` is the `shared/` folder beside the checkout (CI clones next to a copy of it),
    or the folder named by RESDSN_SHARED_DATA.
    """
    override = os.environ.get("RESDSN_SHARED_DATA")
    root = Path(override) if override else Path(__file__).resolve().parents[2] / "shared"
    data = root / "data"
    if not (data / "ct").is_dir():
        pytest.skip(f"real CT test data not found at {data / 'ct'} (set RESDSN_SHARED_DATA to the shared/ folder)")
    return data


@pytest.fixture(scope="session")
def ct5n_dir() -> Path:
    """pydicom's tiny real 5-slice CT series (16x16, file names running opposite to z)."""
    import pydicom.data

    path = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    if not path.is_dir():
        pytest.skip(f"pydicom's CT5N test series is not installed at {path}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False
    return True


def _clear_s3fs_caches() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server process; AWS_* variables point at it for the session.

    Credentials are dummies (the secret key is `aws_secret_marker`) and any profile, session
    token, service-specific endpoint or shared config is masked, so nothing can reach a real
    account. Restored at the end.
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + S3_START_TIMEOUT_S
        while not _answers(endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"moto server did not start on {endpoint} (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        patch = pytest.MonkeyPatch()
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_SECURITY_TOKEN"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET_MARKER)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_CONFIG_FILE", str(log_path.parent / "no-aws-config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(log_path.parent / "no-aws-credentials"))
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        patch.setenv("NO_PROXY", no_proxy)
        patch.setenv("no_proxy", no_proxy)
        _clear_s3fs_caches()
        try:
            yield endpoint
        finally:
            patch.undo()
            _clear_s3fs_caches()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def aws_secret_marker(s3_server: str) -> str:
    """The secret key every S3 client and the test cluster's nodes hold: it must never leave them."""
    return AWS_SECRET_MARKER


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the moto server, as "s3://<bucket>"."""
    import boto3

    name = f"resdsn-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"
