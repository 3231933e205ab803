"""Object-store faults, for real: every S3 request goes through a fault-injecting HTTP proxy in
front of the moto server (tests/fault_proxy.py) that answers a share of them with 503 SlowDown /
500 InternalError, or all of them during a burst. Writes, reads, existence checks, listings,
the run's Parquet rows and JSON records, pandas through `storage_options`, the lease, and
`read_volume` of a real DICOM series and a NIfTI of it all succeed through botocore's retries; an
endpoint that always fails gives a bounded, retryable error, never "does not exist"."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from fault_proxy import FaultProxy

from resdsn_ray import lease, runs, storage
from resdsn_ray.errors import InputError
from resdsn_ray.pipeline import typical_bytes
from resdsn_ray.volumes import nifti_bytes, read_volume

pytestmark = pytest.mark.s3

SHARE = 0.25
BURST_S = 3.0
READERS = 3
SEED = 11
WAIT_S = 300.0  # bound of the waits on readers and on a lease being given up
ATTEMPTS_WHEN_DOWN = 3  # AWS_MAX_ATTEMPTS for the endpoint that never answers well


@pytest.fixture
def proxy(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's moto server, and every S3 client pointed at it."""
    import s3fs

    with FaultProxy(s3_server, share=SHARE, seed=SEED) as faults:
        monkeypatch.setenv("AWS_ENDPOINT_URL", faults.url)
        s3fs.S3FileSystem.clear_instance_cache()  # clients are cached with their endpoint
        try:
            yield faults
        finally:
            print(f"\nfault proxy: {faults.counts()}")
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def series(ct5n_dir: Path) -> dict[str, bytes]:
    """pydicom's real 5-slice CT series, file name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(ct5n_dir.iterdir()) if p.is_file()}


BLOBS = 8
ROWS = [{"run_id": "r1", "case_id": f"case_{i}", "status": "ok", "attempt": 1, "mode": "c2f"} for i in range(3)]


def blobs(root: str) -> dict[str, bytes]:
    return {f"{root}/blob/{i:02d}.bin": np.random.default_rng(i).bytes(2000 + i) for i in range(BLOBS)}


def upload(root: str, series: dict[str, bytes], reference) -> None:
    """Write what a run writes under `root`: objects, a DICOM series, a NIfTI, rows, a record."""
    for uri, data in blobs(root).items():
        storage.write_bytes(uri, data)
    for name, data in series.items():
        storage.write_bytes(f"{root}/ct5n/{name}", data)
    storage.write_bytes(f"{root}/ct5n.nii.gz", nifti_bytes(reference.array, reference.affine))
    runs.write_rows(root, "r1", 0, ROWS)
    runs.write_run_record(root, "r1", {"run_id": "r1", "status": "finished"})


def verify(root: str, reference) -> None:
    """Read, check and list back everything `upload` wrote; all must succeed and match."""
    written = blobs(root)
    for uri, data in written.items():
        assert storage.read_bytes(uri) == data
        assert storage.exists(uri)
        assert not storage.exists(uri + ".missing")
    fs, path = storage.filesystem(f"{root}/blob")
    fs.invalidate_cache()
    assert sorted(f"s3://{name}" for name in fs.find(path)) == sorted(written)
    for uri in (f"{root}/ct5n", f"{root}/ct5n.nii.gz"):
        volume = read_volume(uri)
        assert volume.shape == reference.shape
        np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4)
        np.testing.assert_array_equal(volume.array, reference.array)
    assert sorted(runs.read_rows(root).column("case_id").to_pylist()) == [r["case_id"] for r in ROWS]
    assert runs.read_run_record(root, "r1")["status"] == "finished"
    part = runs.metrics_uri(root, "r1") + "/part-00000.parquet"
    assert len(pd.read_parquet(part, storage_options=storage.storage_options(part))) == len(ROWS)


@pytest.fixture
def reference(ct5n_dir: Path):
    return read_volume(str(ct5n_dir))


def test_everything_a_run_does_survives_a_quarter_of_requests_failing(proxy, s3_bucket, series, reference):
    upload(f"{s3_bucket}/share", series, reference)
    verify(f"{s3_bucket}/share", reference)
    counts = proxy.counts()
    assert counts["injected_503"] > 0 and counts["injected_500"] > 0, counts
    assert counts["served"] > 0 and counts["requests"] == counts["served"] + counts["injected"]


def test_everything_survives_a_burst_of_every_request_failing(proxy, s3_bucket, series, reference):
    proxy.set_share(0.0)
    root = f"{s3_bucket}/burst"
    upload(root, series, reference)
    proxy.burst(BURST_S)
    with ThreadPoolExecutor(READERS) as pool:  # readers side by side, as a run's tasks are
        for done in [pool.submit(verify, root, reference) for _ in range(READERS)]:
            done.result(timeout=WAIT_S)
    counts = proxy.counts()
    assert counts["injected"] >= READERS and not proxy.in_burst(), counts


def test_a_lease_is_held_renewed_and_released_through_the_faults(proxy, s3_bucket):
    output = f"{s3_bucket}/leased"
    held = lease.acquire(output, "faulty", heartbeat_s=lease.HEARTBEAT_S)
    for _ in range(6):
        assert held.renew(), held.reason
    held.check()
    with pytest.raises(InputError, match="run faulty on host .* is writing here"):
        lease.acquire(output, "second")
    held.release()
    assert lease.holder(output) is None
    assert proxy.counts()["injected"] > 0


def test_a_lease_whose_store_stays_down_is_given_up_after_the_stale_age(proxy, s3_bucket):
    held = lease.acquire(f"{s3_bucket}/gone", "cut-off", heartbeat_s=0.5, stale_heartbeats=2)
    proxy.set_share(1.0)
    deadline = time.monotonic() + WAIT_S
    while not held.lost and time.monotonic() < deadline:
        time.sleep(0.1)
    assert held.lost and held.reason.startswith("could not renew for"), held.reason
    with pytest.raises(InputError, match=r"this run \(cut-off\) lost its lease .*could not renew"):
        held.check()
    held.release()


def test_a_store_that_stays_down_fails_bounded_retryable_and_never_as_missing(proxy, s3_bucket, series,
                                                                              monkeypatch, aws_secret_marker):
    import s3fs

    root = f"{s3_bucket}/down"
    storage.write_bytes(f"{root}/a.bin", b"x" * 100)
    for name, data in series.items():
        storage.write_bytes(f"{root}/ct5n/{name}", data)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(ATTEMPTS_WHEN_DOWN))
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.statuses = (500,)  # InternalError: botocore retries it, s3fs does not repeat it
    proxy.set_share(1.0)

    def failing(call) -> BaseException:
        before = proxy.counts()["requests"]
        with pytest.raises(Exception) as raised:
            call()
        made = proxy.counts()["requests"] - before
        assert made == ATTEMPTS_WHEN_DOWN, made  # exactly the configured attempts (botocore's default: 5)
        assert not isinstance(raised.value, FileNotFoundError)
        assert storage.is_retryable(raised.value), repr(raised.value)
        return raised.value

    failing(lambda: storage.read_bytes(f"{root}/a.bin"))
    failing(lambda: storage.exists(f"{root}/a.bin"))
    failing(lambda: storage.exists(f"{root}/never-written.bin"))
    failing(lambda: storage.write_bytes(f"{root}/b.bin", b"y"))
    failing(lambda: storage.stored_bytes(f"{root}/ct5n"))
    assert typical_bytes(pa.chunked_array([[f"{root}/a.bin"]])) is None  # a hint: the run's blocks stay plain
    for uri in (f"{root}/a.bin", f"{root}/ct5n", f"{root}/never-written.nii.gz"):
        err = failing(lambda: read_volume(uri))
        assert isinstance(err, InputError) and "cannot access" in str(err) and "does not exist" not in str(err)
        assert aws_secret_marker not in str(err)

    proxy.set_share(0.0)  # the same calls on a healthy store: a real absence is still "does not exist"
    assert not storage.exists(f"{root}/never-written.bin")
    with pytest.raises(InputError, match="does not exist"):
        read_volume(f"{root}/never-written.nii.gz")
    assert not storage.is_retryable(FileNotFoundError("x")) and not storage.is_retryable(InputError("x", "bad header"))


def test_retry_settings_come_from_the_standard_variables(monkeypatch):
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    assert storage.s3_retries() == {"mode": storage.RETRY_MODE, "total_max_attempts": storage.MAX_ATTEMPTS}
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    assert storage.s3_retries() == {"mode": "standard", "total_max_attempts": 4}
    fs, _ = storage.filesystem("s3://some-bucket/x")
    assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 4}
    assert storage.storage_options("s3://some-bucket/x")["config_kwargs"]["retries"]["total_max_attempts"] == 4
    assert storage.storage_options("/local/x") == {}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "0")
    with pytest.raises(InputError, match="AWS_MAX_ATTEMPTS: must be a whole number of at least 1"):
        storage.filesystem("s3://some-bucket/x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "eager")
    with pytest.raises(InputError, match="AWS_RETRY_MODE: must be one of legacy, standard, adaptive"):
        storage.filesystem("s3://some-bucket/x")


def test_a_stalled_object_times_out_bounded_and_becomes_a_retryable_error_row(proxy, s3_bucket, monkeypatch):
    """A server that never answers one object: the read timeout ends each request, and the case's
    time limit ends the case as an error row (retryable) while its neighbour reads through."""
    import s3fs

    from resdsn_ray.config import PreprocessConfig
    from resdsn_ray.stages import read_case
    from resdsn_ray.synthetic import make_case

    image, _, affine = make_case(3, shape=(32, 32, 16))
    for name in ("stalled_case", "good_case"):
        storage.write_bytes(f"{s3_bucket}/stall/{name}.nii.gz", nifti_bytes(image, affine))
    proxy.set_share(0.0)
    proxy.stall("stalled_case")
    monkeypatch.setattr(storage, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(Exception) as raised:  # each request ends at the read timeout: bounded, retryable
        storage.read_bytes(f"{s3_bucket}/stall/stalled_case.nii.gz")
    assert storage.is_retryable(raised.value), repr(raised.value)
    # botocore's 2 attempts, times s3fs's tries of the call and, for a read, of its body: bounded
    assert 2 <= proxy.counts()["stalled"] <= 2 * storage.S3FS_TRIES ** 2, proxy.counts()

    monkeypatch.setattr(storage, "READ_TIMEOUT_S", 60.0)  # now only the case's limit can end the stall
    s3fs.S3FileSystem.clear_instance_cache()
    rows = {name: read_case({"case_id": name, "image_uri": f"{s3_bucket}/stall/{name}.nii.gz"}, PreprocessConfig(), None,
                            timeout_s=3.0) for name in ("stalled_case", "good_case")}
    stalled, good = rows["stalled_case"], rows["good_case"]
    assert stalled["status"] == "error" and stalled["retryable"] is True
    assert stalled["error"] == "read: timed out after 3 s (--case-timeout-s)"
    assert good.get("status") is None and good["coarse_input"].shape == (32, 32, 16)
