"""Archive listing benchmark on S3: objects/s and the requests one listing makes.

    python bench/listing.py [--objects 20000 --dicom-files 1000 --sample 500]

Against a moto S3 server started here (by PID, stopped at the end), in one run:
1. an MSD/nnU-Net archive of `--objects` tiny objects (`imagesTr/case_NNNNNN_0000.nii.gz` and
   `labelsTr/case_NNNNNN.nii.gz`, half each): `archive.list_cases`, which lists the prefix once
   through the filesystem's paginated listing (ListObjectsV2, 1,000 keys a page);
2. the same cases through one request per case (a HEAD of each label, as a per-case existence
   check would make), on the first `--sample` cases: the baseline per object (moto answers
   both; on AWS a request costs more latency, so the ratio is a floor);
3. a PACS-style archive of `--dicom-files` DICOM files (copies of pydicom's CT5N series, 5 files
   per series folder): listing reads a bounded header prefix of every file (one ranged GET each).
Requests are counted with botocore's `before-call` event on the s3fs client (every API call the
listing makes, by operation). Goal: listing requests = ceil(objects / 1000) + O(1), and the
time of `list_cases` within 1.2x of the store's listing alone (`fs.find`). moto answers a
page of 1,000 keys far slower than S3 does, so objects/s here are moto's, not the code's.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import boto3
import pydicom
import pydicom.data
from pydicom.uid import generate_uid

from resdsn_ray import storage
from resdsn_ray.archive import list_cases

BUCKET = "bench-listing"


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"moto server exited: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    return proc, endpoint


def counted_fs():
    """The s3fs filesystem of the bucket and a Counter of the API calls made through it."""
    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    fs.connect()
    calls: Counter[str] = Counter()
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return fs, calls


def upload(fs, objects: dict[str, bytes]) -> float:
    start = time.perf_counter()
    fs.pipe({f"{BUCKET}/{key}": data for key, data in objects.items()})
    return time.perf_counter() - start


def timed(calls: Counter, action) -> tuple[object, float, Counter]:
    calls.clear()
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start, Counter(calls)


def dicom_objects(count: int) -> dict[str, bytes]:
    source = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    slices = [pydicom.dcmread(path) for path in sorted(source.iterdir())]
    objects = {}
    for series in range(math.ceil(count / len(slices))):
        uid = generate_uid()
        for k, ds in enumerate(slices):
            if len(objects) == count:
                break
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
            buffer = pydicom.filebase.DicomBytesIO()
            ds.save_as(buffer)
            objects[f"pacs/P{series:05d}/ST1/CT/IM{k}"] = buffer.getvalue()
    return objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=20_000, help="objects of the NIfTI archive")
    parser.add_argument("--dicom-files", type=int, default=1_000, help="DICOM files of the PACS archive")
    parser.add_argument("--sample", type=int, default=500, help="cases of the per-case baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = start_moto(Path(tmp) / "moto.log")
        try:
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
                              AWS_SHARED_CREDENTIALS_FILE=os.devnull)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                os.environ.pop(name, None)
            fs, calls = counted_fs()
            fs.mkdir(BUCKET)
            run(fs, calls, args)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def run(fs, calls: Counter, args: argparse.Namespace) -> None:
    n_cases = args.objects // 2
    objects = {}
    for i in range(n_cases):
        objects[f"msd/imagesTr/case_{i:06d}_0000.nii.gz"] = b"x"
        objects[f"msd/labelsTr/case_{i:06d}.nii.gz"] = b"x"
    print(f"uploaded {len(objects)} objects in {upload(fs, objects):.1f} s")

    fs.invalidate_cache()
    _, find_s, _ = timed(calls, lambda: fs.find(f"{BUCKET}/msd", detail=True))
    fs.invalidate_cache()
    cases, seconds, made = timed(calls, lambda: list_cases(f"s3://{BUCKET}/msd"))
    assert len(cases) == n_cases and all(c.label_uri and not c.error for c in cases)
    rate = len(objects) / seconds
    pages = math.ceil(len(objects) / 1000)
    print(f"list_cases: {len(objects)} objects -> {len(cases)} cases in {seconds:.2f} s = {rate:,.0f} objects/s; "
          f"requests {sum(made.values())} {dict(made)} (pages needed: {pages}); the store's listing alone "
          f"(fs.find) {find_s:.2f} s, so listing -> cases adds {seconds / find_s:.2f}x")

    sample = min(args.sample, n_cases)
    client = boto3.client("s3")  # not s3fs: its listing cache would answer without a request
    client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    _, base_s, base_made = timed(calls, lambda: [client.head_object(Bucket=BUCKET, Key=f"msd/labelsTr/case_{i:06d}.nii.gz")
                                                 for i in range(sample)])
    base_rate = 2 * sample / base_s  # objects (image + label) covered per second
    print(f"per-case baseline: {sample} cases in {base_s:.2f} s = {base_rate:,.0f} objects/s; "
          f"requests {sum(base_made.values())} {dict(base_made)}")
    print(f"listing / per-case throughput: {rate / base_rate:.1f}x; requests per object: "
          f"{sum(made.values()) / len(objects):.4f} vs {sum(base_made.values()) / (2 * sample):.2f}")

    if args.dicom_files:
        dicom = dicom_objects(args.dicom_files)
        print(f"uploaded {len(dicom)} DICOM files in {upload(fs, dicom):.1f} s")
        cases, seconds, made = timed(calls, lambda: list_cases(f"s3://{BUCKET}/pacs"))
        assert all(c.series_uid and not c.error for c in cases)
        print(f"list_cases (PACS, headers read): {len(dicom)} files -> {len(cases)} series cases in {seconds:.2f} s "
              f"= {len(dicom) / seconds:,.0f} files/s; requests {sum(made.values())} {dict(made)}")


if __name__ == "__main__":
    main()
