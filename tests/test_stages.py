"""The archive job's per-case stages as plain functions, without Ray: the read -> whole -> finish
chain gives the engine's mask on the input's grid with a stamped header, and a case too big for
its memory budget is refused from its header alone, before any voxel is decoded."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from resdsn_ray import runs, volumes
from resdsn_ray.bundle import load_bundle, save_bundle
from resdsn_ray.config import EngineConfig, ModelConfig, OutputConfig, WindowConfig
from resdsn_ray.engine import CoarseToFine
from resdsn_ray.errors import InputError
from resdsn_ray.model import build_model
from resdsn_ray.model_stages import CoarseStage, FineStage, WholeCase
from resdsn_ray.stages import compact_hu, finish_case, read_case
from resdsn_ray.synthetic import write_archive

ENGINE = EngineConfig(coarse=WindowConfig(n=1), fine=WindowConfig(n=1), device="cpu")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(3)
    for stage in ("coarse", "fine"):
        save_bundle(str(folder / stage), build_model("resdsn", width=4), ModelConfig(width=4, patch=16), stage)
    return {stage: str(folder / stage) for stage in ("coarse", "fine")}


def case_row(image: str, label: str, mask: str) -> dict:
    return {"run_id": "r1", "case_id": "c", "image_uri": image, "label_uri": label, "mask_uri": mask, "attempt": 1,
            "config_id": "cfg", "mode": "c2f", "series_uid": "", "to_write": ["mask"]}


def test_read_whole_finish_give_the_engines_mask_on_the_input_grid(tmp_path: Path, bundles: dict[str, str]):
    write_archive(str(tmp_path / "a"), cases=1, seed=4, shape=(40, 36, 24))
    image, label = tmp_path / "a/imagesTr/case_0000.nii.gz", tmp_path / "a/labelsTr/case_0000.nii.gz"
    coarse, fine = load_bundle(bundles["coarse"]), load_bundle(bundles["fine"])
    row = read_case(case_row(str(image), str(label), str(tmp_path / "m.nii.gz")), coarse.preprocess, fine.preprocess)
    row = WholeCase(bundles["coarse"], bundles["fine"], ENGINE)(row)
    out = finish_case(row, ENGINE.post_ratio, OutputConfig())
    assert out["status"] in ("ok", "no_organ") and not out.get("error"), out.get("error")

    expected = CoarseToFine(coarse, fine, ENGINE).segment(volumes.read_volume(str(image))).mask
    written = nib.Nifti1Image.from_bytes(gzip.decompress((tmp_path / "m.nii.gz").read_bytes()))
    source = nib.load(image)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-6)
    assert np.array_equal(np.asarray(written.dataobj), expected)
    assert volumes.read_description(str(tmp_path / "m.nii.gz")) == runs.mask_stamp("cfg", "r1", 1)
    assert out["dsc"] is not None and out["device"] == "cpu"


def test_the_image_rides_as_int16_where_lossless_and_the_statistics_do_not_move(tmp_path: Path,
                                                                                 bundles: dict[str, str]):
    write_archive(str(tmp_path / "a"), cases=1, seed=4, shape=(40, 36, 24))
    image, label = tmp_path / "a/imagesTr/case_0000.nii.gz", tmp_path / "a/labelsTr/case_0000.nii.gz"
    coarse, fine = load_bundle(bundles["coarse"]), load_bundle(bundles["fine"])
    row = read_case(case_row(str(image), str(label), str(tmp_path / "m.nii.gz")), coarse.preprocess, fine.preprocess)
    hu = volumes.read_volume(str(image)).array
    assert row["image"].dtype == np.int16 and np.array_equal(row["image"], hu)
    row = WholeCase(bundles["coarse"], bundles["fine"], ENGINE)(row)
    # The label as the mask, so that there are statistics to compare.
    row.update(mask_at=[0, 0, 0, *hu.shape], mask_box=volumes.read_volume(str(label)).array, post_done=True,
               to_write=["mask", "preview"], preview_uri=str(tmp_path / "p.png"))
    outputs = OutputConfig(preview=True)
    carried, as_read = finish_case(dict(row), 0.0, outputs), finish_case(dict(row, image=hu), 0.0, outputs)
    assert carried["status"] == "ok" and carried["mask_hu_mean"] is not None and carried["preview_uri"]
    compared = ("mask_hu_mean", "mask_hu_std", "dsc")
    assert {k: carried[k] for k in compared} == {k: as_read[k] for k in compared}

    for kept in (hu + np.float32(0.5), np.where(hu > 0, np.float32(np.inf), hu), hu * np.float32(40)):  # not int16
        assert compact_hu(kept) is kept


def test_on_no_organ_fine_in_split_pools_gives_the_engines_fallback_mask(tmp_path: Path, bundles: dict[str, str]):
    """A coarse model that finds nothing (all weights 0: every score is exactly 0.5, not above):
    with --on-no-organ fine the fine pool segments the whole volume, as the engine does."""
    blank = build_model("resdsn", width=4)
    for parameter in blank.parameters():
        parameter.data.zero_()
    save_bundle(str(tmp_path / "blank"), blank, ModelConfig(width=4, patch=16), "coarse")
    write_archive(str(tmp_path / "a"), cases=1, seed=4, shape=(40, 36, 24))
    image, label = tmp_path / "a/imagesTr/case_0000.nii.gz", tmp_path / "a/labelsTr/case_0000.nii.gz"
    engine = EngineConfig(coarse=WindowConfig(n=1), fine=WindowConfig(n=1), device="cpu", on_no_organ="fine")
    coarse, fine = load_bundle(str(tmp_path / "blank")), load_bundle(bundles["fine"])
    row = read_case(case_row(str(image), str(label), str(tmp_path / "m.nii.gz")), coarse.preprocess, fine.preprocess)
    row = FineStage(bundles["fine"], engine)(CoarseStage(str(tmp_path / "blank"), engine)(row))
    out = finish_case(row, engine.post_ratio, OutputConfig())
    expected = CoarseToFine(coarse, fine, engine).segment(volumes.read_volume(str(image)))
    assert expected.fine_fallback and out["fine_fallback"] and out["coarse_bbox"] is None
    assert out["fine_windows"] == expected.fine_windows and out["status"] == expected.status
    assert np.array_equal(volumes.read_volume(str(tmp_path / "m.nii.gz")).array, expected.mask)
    paper = CoarseToFine(coarse, fine, ENGINE).segment(volumes.read_volume(str(image)))
    assert paper.status == "no_organ" and not paper.fine_fallback


def test_a_case_over_its_memory_budget_is_refused_from_its_header(tmp_path: Path):
    """A 1 KB file whose header honestly says 512 x 512 x 1000 float32 would need ~4.7 GB."""
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 1000))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    poison = tmp_path / "poison.nii.gz"
    poison.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1024))
    row = read_case(case_row(str(poison), "", str(tmp_path / "m.nii.gz")), None, None, max_bytes=2 * 10**9)
    assert row["status"] == "error"
    assert row["error"].startswith("read: ") and "case budget of 2 GB" in row["error"] and "--max-case-gb" in row["error"]
    unbounded = read_case(case_row(str(poison), "", str(tmp_path / "m.nii.gz")), None, None)
    assert unbounded["status"] == "error" and "truncated" in unbounded["error"]  # the budget spoke first above


def test_an_actor_given_a_gpu_that_torch_cannot_see_refuses_to_start(bundles: dict[str, str]):
    if torch.cuda.is_available():
        pytest.skip("this machine's torch sees a CUDA device")
    with pytest.raises(InputError, match="holds a GPU but torch .* sees no CUDA device"):
        WholeCase(bundles["coarse"], bundles["fine"], ENGINE, gpu=True)
