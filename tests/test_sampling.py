"""Training data without Ray: samplers, augmentation, case preparation and loading (real NIfTI
files; unreadable cases, empty labels and labels off the image's grid are skipped by id)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resdsn_ray.errors import InputError
from resdsn_ray.recipes import preset_config
from resdsn_ray.sampling import (
    PatchSampler,
    TrainingCase,
    augment,
    load_training_cases,
    load_validation_cases,
    prepare_case,
)
from resdsn_ray.synthetic import make_case, write_archive
from resdsn_ray.training import training_cases
from resdsn_ray.volumes import Volume, read_volume, write_nifti

SHAPE = (40, 40, 32)  # small phantoms: the organ still spans several 16^3 patches


def _volumes(seed: int, shape: tuple[int, int, int] = SHAPE) -> tuple[Volume, Volume]:
    image, label, affine = make_case(seed, shape)
    return Volume(image.astype(np.float32), affine, f"image{seed}"), Volume(label, affine, f"label{seed}")


def _prepared(stage: str, patch: int = 16, seed: int = 3) -> TrainingCase:
    image, label = _volumes(seed)
    return prepare_case(f"case{seed}", image, label, stage, patch, preset_config("demo", stage).preprocess)


# --------------------------------------------------------------------------------- samplers


def test_fine_patches_always_cover_organ_voxels():
    case = _prepared("fine")
    sampler = PatchSampler([case], "fine", 16, np.random.default_rng(0))
    images, labels = sampler.batch(400)
    assert images.shape == (400, 1, 16, 16, 16) and labels.shape == (400, 16, 16, 16)
    assert (labels.reshape(400, -1).sum(axis=1) > 0).all()
    # ... and every organ voxel of the case can be reached (none is cut off by the crop).
    _, label, _ = make_case(3, SHAPE)
    assert int(case.label.sum()) == int(label.sum()) == len(case.organ)
    with pytest.raises(ValueError, match="fine"):  # a case prepared for the coarse stage has no organ list
        PatchSampler([_prepared("coarse")], "fine", 16, np.random.default_rng(0))


def test_coarse_patches_cover_the_whole_volume_including_pure_background():
    case = _prepared("coarse")
    sampler = PatchSampler([case], "coarse", 16, np.random.default_rng(1))
    with_organ = [case.label[x : x + 16, y : y + 16, z : z + 16].any() for x, y, z in (sampler.origin(case) for _ in range(500))]
    assert 0 < sum(with_organ) < 500  # organ patches and hard negatives both occur
    # Every corner position -- hence every voxel -- is drawn (a small volume keeps it quick).
    small = TrainingCase("small", case.image[:24, :24, :20], case.label[:24, :24, :20])
    origins = np.array([sampler.origin(small) for _ in range(5000)])
    assert len({tuple(o) for o in origins}) == 9 * 9 * 5
    covered = np.zeros(small.image.shape, dtype=bool)
    for x, y, z in {tuple(o) for o in origins}:
        covered[x : x + 16, y : y + 16, z : z + 16] = True
    assert covered.all()


def test_coarse_foreground_share_centres_that_share_of_patches_on_the_organ():
    case = _prepared("coarse")
    organ_voxels = {tuple(v) for v in np.argwhere(case.label)}
    half = 8

    def centred_on_organ(sampler: PatchSampler) -> float:
        origins = [sampler.origin(case) for _ in range(600)]
        return np.mean([(x + half, y + half, z + half) in organ_voxels for x, y, z in origins])

    # Uniform corners hit an organ voxel at the patch centre about as often as the organ's volume share.
    uniform = centred_on_organ(PatchSampler([case], "coarse", 16, np.random.default_rng(4)))
    assert uniform < 0.1
    # share 1: every patch centred on an organ voxel (the organ lies away from the border here).
    assert centred_on_organ(PatchSampler([case], "coarse", 16, np.random.default_rng(4), foreground_share=1.0)) == 1.0
    assert 0.35 < centred_on_organ(PatchSampler([case], "coarse", 16, np.random.default_rng(4), foreground_share=0.5)) < 0.65
    # The sampler counts the organ voxels it hands out, for the training log.
    sampler = PatchSampler([case], "coarse", 16, np.random.default_rng(5), foreground_share=1.0)
    _, labels = sampler.batch(6)
    assert sampler.take_foreground_share() == (int(labels.sum()), labels.size)
    assert sampler.take_foreground_share() == (0, 0)
    with pytest.raises(ValueError, match="foreground_share"):
        PatchSampler([case], "coarse", 16, np.random.default_rng(0), foreground_share=1.5)


def test_batches_are_cut_from_the_volume():
    # Some cube symmetry of each patch is a P^3 window of the preprocessed volume.
    case = _prepared("coarse")
    images, _ = PatchSampler([case], "coarse", 16, np.random.default_rng(2)).batch(3)

    def in_volume(patch: np.ndarray) -> bool:
        for x, y, z in np.argwhere(case.image == patch[0, 0, 0]):
            if np.array_equal(case.image[x : x + 16, y : y + 16, z : z + 16], patch):
                return True
        return False

    for patch in images[:, 0]:
        assert any(in_volume(candidate) for candidate in _symmetries(patch))


def test_small_volumes_are_padded_and_bad_cases_refused():
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image = Volume(np.full((10, 20, 30), 50.0, dtype=np.float32), affine, "small image")
    mask = np.zeros((10, 20, 30), dtype=np.uint8)
    mask[4:6, 8:12, 10:20] = 1
    preprocess = preset_config("demo", "coarse").preprocess
    case = prepare_case("small", image, Volume(mask, affine, "small label"), "coarse", 16, preprocess)
    assert case.image.shape == (16, 20, 30) and case.label[10:].sum() == 0
    with pytest.raises(InputError, match="empty"):
        prepare_case("empty", image, Volume(np.zeros_like(mask), affine, "empty label"), "fine", 16, preprocess)
    with pytest.raises(InputError, match="shape"):
        prepare_case("mismatch", image, Volume(mask[:, :, :5], affine, "short label"), "coarse", 16, preprocess)
    shifted = affine.copy()
    shifted[:3, 3] = (0.0, 0.0, 10.0)  # same shape, another place in the world: misplaced organ voxels
    with pytest.raises(InputError, match="affine") as err:
        prepare_case("moved", image, Volume(mask, shifted, "moved label"), "coarse", 16, preprocess)
    assert err.value.source == "moved label"


# ----------------------------------------------------------------------------- augmentation


def _symmetries(cube: np.ndarray) -> list[np.ndarray]:
    """All arrays reachable from `cube` by np.rot90 and np.flip on every axis (closure)."""
    moves = [lambda a, ax=ax: np.rot90(a, 1, ax) for ax in ((0, 1), (0, 2), (1, 2))]
    moves += [lambda a, ax=ax: np.flip(a, ax) for ax in range(3)]
    seen = {cube.tobytes(): cube}
    frontier = [cube]
    while frontier:
        nxt = []
        for array in frontier:
            for move in moves:
                out = np.ascontiguousarray(move(array))
                if out.tobytes() not in seen:
                    seen[out.tobytes()] = out
                    nxt.append(out)
        frontier = nxt
    return list(seen.values())


def test_augmentation_is_a_cube_symmetry_applied_identically_to_image_and_label():
    cube = np.arange(4**3, dtype=np.float32).reshape(4, 4, 4)  # every voxel distinct
    group = {a.tobytes() for a in _symmetries(cube)}
    assert len(group) == 48  # the octahedral group: rotations by 90/180/270 and flips
    label = (cube % 3 == 0).astype(np.uint8)  # label is a voxelwise function of the image
    rng = np.random.default_rng(0)
    reached = set()
    for _ in range(1500):
        image_aug, label_aug = augment(cube, label, rng)
        key = np.ascontiguousarray(image_aug).tobytes()
        assert key in group
        np.testing.assert_array_equal(label_aug, (image_aug % 3 == 0).astype(np.uint8))
        reached.add(key)
    assert reached == group
    for axes in ((0, 1), (0, 2), (1, 2)):
        for k in (1, 2, 3):
            assert np.rot90(cube, k, axes).tobytes() in reached


# ------------------------------------------------------------------------ cases and input


def test_unreadable_empty_and_misplaced_cases_are_reported_by_id(tmp_path: Path):
    data = str(tmp_path / "data")
    write_archive(data, cases=4, seed=0, shape=SHAPE)
    (tmp_path / "data" / "imagesTr" / "case_0001.nii.gz").write_bytes(b"not a nifti file")
    labels = tmp_path / "data" / "labelsTr"
    empty = read_volume(str(labels / "case_0002.nii.gz"))
    write_nifti(str(labels / "case_0002.nii.gz"), np.zeros(empty.shape, np.uint8), empty.affine)
    label = read_volume(str(labels / "case_0003.nii.gz"))
    mirrored = label.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # same shape, mirrored grid (the LPS/RAS mix-up)
    write_nifti(str(labels / "case_0003.nii.gz"), label.array.astype(np.uint8), mirrored)
    cases, rejected = training_cases(data, None)
    assert [c.case_id for c in cases] == ["case_0000", "case_0001", "case_0002", "case_0003"] and not rejected
    rows = [{"case_id": c.case_id, "image_uri": c.image_uri, "label_uri": c.label_uri} for c in cases]
    loaded, skipped = load_training_cases(rows, preset_config("demo", "fine", patch=16))
    assert [c.case_id for c in loaded] == ["case_0000"]
    reasons = {s["case_id"]: s["reason"] for s in skipped}
    assert "unreadable" in reasons["case_0001"] and "empty" in reasons["case_0002"]
    assert "affine" in reasons["case_0003"]
    loaded, skipped = load_training_cases(rows, preset_config("demo", "coarse", patch=16))
    assert [c.case_id for c in loaded] == ["case_0000", "case_0002"]  # coarse: empty = negatives
    assert [s["case_id"] for s in skipped] == ["case_0001", "case_0003"]
    held, skipped = load_validation_cases(rows)
    assert [c.case_id for c in held] == ["case_0000"] and held[0].label.dtype == np.uint8
    assert {s["case_id"]: s["reason"].split(":")[0] for s in skipped} == dict.fromkeys(["case_0001", "case_0002", "case_0003"], "validation")
    assert "affine" in {s["case_id"]: s["reason"] for s in skipped}["case_0003"]
