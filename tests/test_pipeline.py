"""The archive pipeline on a real local Ray cluster with everything in S3 (moto's server).

This process is the Ray driver (`ray_driver`); the archive, the model bundles and all outputs
live in a bucket on the moto server, reached through AWS_ENDPOINT_URL by every reader and writer
(workers take S3 credentials from their node).
"""

from __future__ import annotations

import gzip
import io
import os
import uuid
from dataclasses import replace
from pathlib import Path

import boto3
import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydicom
import pytest
import torch
from ray.data import DataContext
from ray_cluster import ray_cluster_fixture, ray_driver_fixture  # noqa: F401  (session fixtures)

from resdsn_ray import runs, storage
from resdsn_ray.bundle import CONFIG_FILE, demo_bundle_uri, load_bundle, save_bundle
from resdsn_ray.cluster import fit_cpus
from resdsn_ray.config import DEMO_ENGINE, ArchiveJob, EngineConfig, ModelConfig, OutputConfig, Resources, WindowConfig
from resdsn_ray.devices import resolve_precision
from resdsn_ray.engine import CoarseToFine
from resdsn_ray.errors import InputError
from resdsn_ray.model import build_model
from resdsn_ray.model_stages import WholeCase
from resdsn_ray.pipeline import _Progress, _RowWriter, _stream, auto_actors, blocks, run_archive, starting_actors
from resdsn_ray.stages import finish_case, read_case
from resdsn_ray.synthetic import write_archive
from resdsn_ray.volumes import nifti_bytes, read_volume

pytestmark = [pytest.mark.ray, pytest.mark.s3]

DEMO = (Path(demo_bundle_uri("coarse")) / CONFIG_FILE).exists() and (Path(demo_bundle_uri("fine")) / CONFIG_FILE).exists()
CASES = 3
# Demo bundles are judged on the demo's own cases and settings; random bundles run small and fast.
SHAPE = (96, 96, 64) if DEMO else (40, 40, 24)
# Demo bundles run with the demo job's window settings; random ones with the fewest windows.
N_COARSE, N_FINE = (DEMO_ENGINE.coarse.n, DEMO_ENGINE.fine.n) if DEMO else (1, 1)
ENGINE = EngineConfig(coarse=WindowConfig(n=N_COARSE, batch_size=8), fine=WindowConfig(n=N_FINE, batch_size=8), device="cpu")
RESOURCES = Resources()  # actors and CPU reservations fitted to the session cluster (2 nodes x 1 CPU)
torch.set_num_threads(1)  # the engine runs in this process too; 2 threads on 2 shared cores crawl


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    name = f"resdsn-pipe-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def bundles(bucket: str) -> dict[str, str]:
    """Bundle URIs in S3: the shipped demo bundles when present, else random small networks."""
    uris = {}
    for stage in ("coarse", "fine"):
        uri = f"{bucket}/bundles/{stage}"
        if DEMO:
            for file in Path(demo_bundle_uri(stage)).iterdir():
                storage.write_bytes(storage.join(uri, file.name), file.read_bytes())
        else:
            torch.manual_seed({"coarse": 1, "fine": 2}[stage])
            save_bundle(uri, build_model("resdsn", width=4), ModelConfig(width=4, patch=16), stage)
        uris[stage] = uri
    return uris


@pytest.fixture(scope="module")
def archive(bucket: str) -> str:
    uri = f"{bucket}/archive"
    write_archive(uri, cases=CASES, seed=5, shape=SHAPE)
    return uri


def job(archive: str, output: str, bundles: dict[str, str], **kw) -> ArchiveJob:
    return ArchiveJob(input=archive, output=output, coarse=bundles["coarse"], fine=bundles["fine"],
                      engine=ENGINE, resources=kw.pop("resources", RESOURCES), flush_rows=2, **kw)


@pytest.fixture(scope="module")
def whole(ray_driver, archive, bundles, bucket):
    return run_archive(job(archive, f"{bucket}/out-whole", bundles, resources=replace(RESOURCES, shape="whole")))


def load_mask(uri: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(storage.read_bytes(uri)))


def keys(prefix: str) -> list[str]:
    fs, path = storage.filesystem(prefix)
    fs.invalidate_cache()
    return [f"s3://{k}" for k in fs.find(path)]


def test_one_row_per_case_and_each_mask_on_its_input_grid(whole, archive):
    rows = whole.rows
    assert sorted(r["case_id"] for r in rows) == [f"case_{i:04d}" for i in range(CASES)]
    assert {r["status"] for r in rows} <= {"ok", "no_organ"}, [r["error"] for r in rows]
    for row in rows:
        image = read_volume(row["image_uri"])
        mask = load_mask(row["mask_uri"])
        assert row["image_uri"].startswith(f"{archive}/imagesTr/")
        assert mask.shape == image.shape and tuple(row["shape"]) == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
        assert mask.get_data_dtype() == np.uint8
        assert int(mask.header["sform_code"]) == 1


def test_rows_in_parquet_and_the_run_record_in_s3(whole, bundles):
    table = runs.read_rows(whole.record["output"])
    table = table.filter(pc.equal(table["run_id"], whole.run_id))
    assert table.num_rows == CASES
    coarse_id, fine_id = load_bundle(bundles["coarse"]).id, load_bundle(bundles["fine"]).id
    for row in table.to_pylist():
        assert row["coarse_model"] == coarse_id and row["fine_model"] == fine_id
        assert row["attempt"] == 1 and row["node"] and row["node_id"] and row["finished_at"] >= row["started_at"]
        assert row["device"] == "cpu" and row["demo_models"] is False
        assert row["compute_dtype"] == resolve_precision(ENGINE.precision, torch.device("cpu"))
        assert row["coarse_windows"] > 0 and row["t_read_s"] > 0 and row["t_coarse_s"] > 0 and row["t_write_s"] > 0
        assert row["t_total_s"] >= row["t_coarse_s"] + row["t_read_s"]
        assert row["label_uri"] and row["dsc"] is not None and row["ref_volume_ml"] > 0
        if row["status"] == "ok":
            assert row["fine_windows"] > 0 and len(row["coarse_bbox"]) == 6
    record = runs.read_run_record(whole.record["output"], whole.run_id)
    assert record["status"] == "finished" and record["counts"] == whole.counts
    assert record["bundles"]["coarse"] == {"uri": bundles["coarse"], "id": coarse_id}
    assert record["provenance"]["resdsn_ray"] and record["provenance"]["python"]
    assert {"ray", "torch"} <= set(record["provenance"]["libraries"])
    assert record["engine"]["coarse"]["n"] == ENGINE.coarse.n and record["started_at"] < record["ended_at"]
    tops = {k.removeprefix(whole.record["output"] + "/").split("/")[0] for k in keys(whole.record["output"])}
    assert tops == {"masks", "metrics", "runs"}


@pytest.mark.skipif(not DEMO, reason="demo bundles not trained yet (resdsn_ray/bundles/demo-coarse/config.json "
                                     "missing): random-weight bundles cannot be judged on DSC")
def test_demo_bundles_reach_the_dsc_target(whole):
    dsc = [r["dsc"] for r in whole.rows]
    assert np.mean(dsc) >= 0.85, dsc


def test_whole_actors_split_pools_and_the_plain_engine_give_identical_masks(whole, archive, bundles):
    engine = CoarseToFine(load_bundle(bundles["coarse"]), load_bundle(bundles["fine"]), ENGINE)
    expected = {r["case_id"]: engine.segment(read_volume(r["image_uri"])) for r in whole.rows}
    for row in whole.rows:
        np.testing.assert_array_equal(np.asanyarray(load_mask(row["mask_uri"]).dataobj), expected[row["case_id"]].mask)

    # The split shape recomputes the same output (--overwrite): same masks, a second attempt each.
    output = whole.record["output"]
    split = run_archive(job(archive, output, bundles, resources=replace(RESOURCES, shape="split"), overwrite=True))
    assert sorted(r["case_id"] for r in split.rows) == sorted(expected)
    for row in split.rows:
        want = expected[row["case_id"]]
        assert row["status"] == want.status and row["attempt"] == 2
        assert row["coarse_bbox"] == (want.box.to_list() if want.box else None)
        assert (row["coarse_windows"], row["fine_windows"]) == (want.coarse_windows, want.fine_windows)
        np.testing.assert_array_equal(np.asanyarray(load_mask(row["mask_uri"]).dataobj), want.mask)
    history = runs.read_rows(output)
    for case_id in expected:  # one row per case and attempt; nothing rewritten
        attempts = history.filter(pc.equal(history["case_id"], case_id))["attempt"].to_pylist()
        assert sorted(attempts)[-2:] == [1, 2]


def test_rerun_skips_done_cases_without_touching_their_masks(whole, archive, bundles):
    output = whole.record["output"]
    fs, _ = storage.filesystem(output)
    fs.invalidate_cache()
    written = {r["case_id"]: fs.info(r["mask_uri"])["LastModified"] for r in whole.rows}
    again = run_archive(job(archive, output, bundles))
    assert again.counts == {"skipped": CASES}
    earlier = set(runs.read_rows(output)["run_id"].to_pylist()) - {again.run_id}
    assert all(r["done_in_run"] in earlier and r["error"] is None for r in again.rows)
    fs.invalidate_cache()
    assert {r["case_id"]: fs.info(r["mask_uri"])["LastModified"] for r in whole.rows} == written


def _dicom_series(target: str, ct5n: Path, split_series: bool) -> None:
    for i, file in enumerate(sorted(ct5n.iterdir())):
        ds = pydicom.dcmread(file)
        if split_series and i % 2:
            ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".2"
        buffer = io.BytesIO()
        ds.save_as(buffer)
        storage.write_bytes(storage.join(target, f"IM{i:04d}.dcm"), buffer.getvalue())


def test_bad_inputs_each_give_one_error_row_and_good_cases_complete(ray_driver, bucket, archive, bundles, ct5n_dir):
    flat = f"{bucket}/mixed"
    storage.write_bytes(f"{flat}/good_0.nii.gz", storage.read_bytes(f"{archive}/imagesTr/case_0000.nii.gz"))
    _dicom_series(f"{flat}/dicom_good", ct5n_dir, split_series=False)
    whole_file = storage.read_bytes(f"{archive}/imagesTr/case_0002.nii.gz")
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    nan = np.zeros((20, 20, 12), np.float32)
    nan[4, 4, 4] = np.nan
    bad = {
        "truncated": whole_file[: len(whole_file) // 2],
        "empty": b"",
        "four_d": nifti_bytes(np.zeros((20, 20, 12, 2), np.int16), affine),
        "nans": nifti_bytes(nan, affine),
        "bad\x07id": whole_file,
        "up..level": whole_file,
    }
    for name, data in bad.items():
        storage.write_bytes(f"{flat}/{name}.nii.gz", data)
    _dicom_series(f"{flat}/two_series", ct5n_dir, split_series=True)

    output = f"{bucket}/out-mixed"
    result = run_archive(job(flat, output, bundles))
    rows = {r["case_id"]: r for r in result.rows}
    series = sorted(case_id for case_id in rows if case_id.startswith("two_series"))
    assert len(series) == 2, sorted(rows)  # a folder of two series is two cases, one per series
    assert len(result.rows) == len(rows) == 2 + len(bad) + 2
    expected = {
        "truncated": "truncated", "empty": "empty file", "four_d": "4-D", "nans": "NaN",
        "bad\x07id": "control", "up..level": "'..'",
    }
    for case_id, fragment in expected.items():
        row = rows[case_id]
        assert row["status"] == "error" and fragment in row["error"], row
        assert row["mask_uri"] is None and row["retryable"] is False  # bad content: a rerun meets it again
    for case_id in ("good_0", "dicom_good", *series):
        row = rows[case_id]
        assert row["status"] in ("ok", "no_organ"), row["error"]
        assert load_mask(row["mask_uri"]).shape == read_volume(row["image_uri"], series_uid=row["series_uid"] or None).shape
    assert len({rows[case_id]["series_uid"] for case_id in series}) == 2
    masks = sorted(k.rsplit("/", 1)[1] for k in keys(f"{output}/masks"))
    assert masks == sorted(["dicom_good.nii.gz", "good_0.nii.gz", *(f"{case_id}.nii.gz" for case_id in series)])


def test_small_cases_share_blocks_by_default_and_each_gets_its_row(ray_driver, bundles, tmp_path):
    """Tiny files share blocks (`pipeline.block_size`: 2 actors keep 8 blocks each of 32 cases)."""
    archive = str(tmp_path / "tiny")
    write_archive(archive, cases=32, seed=6, shape=(24, 24, 16))
    lines: list[str] = []
    result = run_archive(job(archive, str(tmp_path / "out"), bundles), say=lines.append)
    assert "2 cases per block (`--cases-per-block`)" in lines
    rows = result.rows
    assert sorted(r["case_id"] for r in rows) == [f"case_{i:04d}" for i in range(32)]
    assert {r["status"] for r in rows} <= {"ok", "no_organ"}, [r["error"] for r in rows]
    for row in rows[::7]:
        assert load_mask(row["mask_uri"]).shape == (24, 24, 16)


def test_single_stage_modes_run_through_the_stage_functions(ray_driver, archive, bundles, bucket):
    # The whole-case actor class runs any engine mode; here its code runs in this process.
    coarse_only = replace(ENGINE, mode="coarse")
    bundle = load_bundle(bundles["coarse"])
    uri = f"{archive}/imagesTr/case_0000.nii.gz"
    row = read_case({"case_id": "c0", "image_uri": uri, "label_uri": "", "mask_uri": f"{bucket}/modes/c0.nii.gz",
                     "to_write": ["mask"]}, coarse=bundle.preprocess, fine=None)
    row = WholeCase(bundles["coarse"], None, coarse_only)(row)
    out = finish_case(row, coarse_only.post_ratio, OutputConfig())
    expected = CoarseToFine(bundle, None, coarse_only).segment(read_volume(uri))
    assert out["status"] == expected.status and out["fine_windows"] == 0 and out["coarse_windows"] > 0
    np.testing.assert_array_equal(np.asanyarray(load_mask(out["mask_uri"]).dataobj), expected.mask)


@pytest.mark.parametrize(
    "actors, nodes, given, expected",
    [
        (2, [1.0, 1.0], (None, None), (0.5, 0.5)),  # the session cluster: two 1-CPU raylets
        (1, [2.0], (None, None), (1.0, 1.0)),
        (2, [2.0], (None, None), (0.5, 1.0)),
        (4, [8.0, 8.0], (None, None), (1.0, 1.0)),
        (1, [0.0], (None, None), (1.0, 1.0)),  # autoscaling from zero workers: not checked
        (2, [4.0], (1.5, 1.0), (1.5, 1.0)),
    ],
)
def test_cpu_reservations_always_leave_room_for_a_task(actors, nodes, given, expected):
    actor, task = fit_cpus(actors, nodes, *given)
    assert (actor, task) == expected
    if sum(nodes):
        assert actors * actor + task <= sum(nodes) and actor + task <= min(nodes)


@pytest.mark.parametrize(
    "shape_gpus, cluster, expected",
    [((0.0, 1), {"CPU": 2.0}, 2), ((0.0, 2), {"CPU": 2.0}, 1), ((0.0, 1), {"CPU": 64.0}, 8),
     ((1.0, 2), {"CPU": 32.0, "GPU": 4.0}, 2), ((0.5, 1), {"CPU": 8.0, "GPU": 1.0}, 2)],
)
def test_default_pool_sizes_share_out_the_cluster(shape_gpus, cluster, expected):
    gpus, pools = shape_gpus
    assert auto_actors(Resources(gpus_per_actor=gpus), pools, cluster) == expected


@pytest.mark.parametrize(
    "resources, sizes, cluster, expected",
    [
        (Resources(cpus_per_actor=0.5, task_cpus=1.0), [2], {"CPU": 2.0}, [2]),  # a fixed cluster: all at once
        (Resources(cpus_per_actor=0.5, task_cpus=0.5), [1, 1], {"CPU": 2.0}, [1, 1]),  # split pools share the room
        (Resources(gpus_per_actor=1.0, cpus_per_actor=1.0, task_cpus=1.0), [8], {"CPU": 16.0, "GPU": 2.0}, [2]),
        (Resources(gpus_per_actor=1.0, cpus_per_actor=1.0, task_cpus=1.0), [4, 4], {"CPU": 16.0, "GPU": 2.0}, [1, 1]),
        (Resources(gpus_per_actor=1.0, cpus_per_actor=1.0, task_cpus=1.0), [4], {"CPU": 0.0}, [1]),  # from zero nodes
        (Resources(gpus_per_actor=1.0, fixed_pools=True), [4], {"CPU": 0.0}, [4]),
    ],
)
def test_pools_start_with_the_actors_the_nodes_up_now_hold(resources, sizes, cluster, expected):
    assert starting_actors(resources, sizes, cluster) == expected


def test_cpu_reservations_that_would_stall_are_refused():
    with pytest.raises(InputError, match="would stall"):
        fit_cpus(2, [2.0], 1.0, 1.0)


def test_a_case_that_kills_its_block_fails_alone(ray_driver, tmp_path):
    """Cases share blocks (`--cases-per-block`): a block whose process dies is streamed again one
    case per block, so only the case that kills its process becomes an error row."""
    table = pa.table({"case_id": ["a", "bad", "c", "d", "e"], "label_uri": [""] * 5})
    assert blocks(table, 2).num_blocks() == 3 and blocks(table).num_blocks() == 5
    passes = []

    def dies_on_bad(row: dict) -> dict:  # nested: Ray ships it by value to workers that cannot import this module
        if row["case_id"] == "bad":
            os._exit(1)  # the process really dies, as one killed for memory would
        return {"case_id": row["case_id"], "status": "ok"}

    def build(rows: pa.Table, cases_per_block: int):
        passes.append((rows["case_id"].to_pylist(), cases_per_block))
        DataContext.get_current().max_errored_blocks = -1  # as build_dataset: a lost block must not end the run
        return blocks(rows, cases_per_block).map(dies_on_bad, max_retries=0)

    job = ArchiveJob(input="unused", output=str(tmp_path / "out"), coarse=None, fine=None)
    writer, lines = _RowWriter(job, "r1", None), []
    _stream(table, build, 2, writer, _Progress(table.num_rows, 1e9, lines.append), lines.append)
    writer.flush()
    rows = {r["case_id"]: r for r in runs.read_rows(job.output, "r1").to_pylist()}
    assert passes == [(["a", "bad", "c", "d", "e"], 2), (["a", "bad"], 1)]
    assert {case: r["status"] for case, r in rows.items()} == {"a": "ok", "bad": "error", "c": "ok", "d": "ok", "e": "ok"}
    assert rows["bad"]["retryable"] and "died" in rows["bad"]["error"]
    assert lines == ["2 cases per block (`--cases-per-block`)",
                     "2 case(s) lost with their worker processes or nodes: streaming them again, one per block (1 of 1)"]
