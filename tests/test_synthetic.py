"""Synthetic phantoms: determinism, organ size and shape, realistic HU, world-space geometry,
and the MSD archive on disk."""

from __future__ import annotations

import json
import os

import cc3d
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from resdsn_ray import storage
from resdsn_ray.synthetic import case_seed, family_case, make_case, write_archive
from resdsn_ray.volumes import read_volume

SEEDS = range(10)


@pytest.fixture(scope="module")
def cases() -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return {seed: make_case(seed) for seed in SEEDS}


def _body(image: np.ndarray) -> np.ndarray:
    """Everything inside the skin, bowel gas included (holes filled in each axial slice)."""
    in_plane = ndimage.generate_binary_structure(2, 1)[:, :, None]
    return ndimage.binary_fill_holes(image > -500, structure=in_plane)


def _world_centroid(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(label).mean(axis=0) + affine[:3, 3]


def _axis_code(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def test_same_seed_gives_identical_case(cases):
    image, label, affine = make_case(3)
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert image.shape == label.shape == (96, 96, 64) and affine.shape == (4, 4)
    np.testing.assert_array_equal(image, cases[3][0])
    np.testing.assert_array_equal(label, cases[3][1])
    np.testing.assert_array_equal(affine, cases[3][2])
    assert set(np.unique(label)) == {0, 1}


def test_different_seeds_give_different_patients(cases):
    for a, b in [(0, 1), (1, 2), (4, 9)]:
        assert not np.array_equal(cases[a][0], cases[b][0])
        assert not np.array_equal(cases[a][1], cases[b][1])
    centroids = [_world_centroid(label, affine) for _, label, affine in cases.values()]
    assert len({tuple(np.round(c, 1)) for c in centroids}) == len(centroids)


def test_organ_is_half_to_two_percent_of_the_body(cases):
    fractions = [label.sum() / _body(image).sum() for image, label, _ in cases.values()]
    assert all(0.005 <= f <= 0.02 for f in fractions), fractions
    assert max(fractions) / min(fractions) > 1.3  # organ size varies with the seed


def test_organ_is_one_connected_component_and_several_voxels_thick(cases):
    for image, label, _ in cases.values():
        assert cc3d.connected_components(label, connectivity=26).max() == 1
        assert ndimage.distance_transform_edt(label).max() >= 3.0


def test_organ_is_curved_and_elongated(cases):
    """Much longer than thick, and not a straight rod: its centre is off its own chord."""
    for _, label, affine in cases.values():
        points = np.argwhere(label) @ affine[:3, :3].T  # world mm, up to a shift
        centred = points - points.mean(axis=0)
        extent = np.sqrt(np.linalg.eigvalsh(np.cov(centred.T)))
        assert extent[2] > 2.5 * extent[0]
        ends = centred @ np.linalg.eigh(np.cov(centred.T))[1][:, 2]
        head, tail = centred[ends < np.quantile(ends, 0.05)], centred[ends > np.quantile(ends, 0.95)]
        chord_mid = (head.mean(axis=0) + tail.mean(axis=0)) / 2
        assert np.linalg.norm(chord_mid) > 5.0


def test_hu_ranges_are_ct_like(cases):
    for image, label, _ in cases.values():
        body = _body(image)
        assert abs(np.median(image[~body]) + 1000) < 20  # air
        assert image.min() >= -1024
        assert np.count_nonzero(image > 300) > 50  # bone
        inside = image[body]
        assert np.count_nonzero(inside < -600) > 20  # bowel gas
        assert np.count_nonzero((inside > -130) & (inside < -70)) > 0.05 * inside.size  # fat
        core = ndimage.binary_erosion(label, iterations=1)
        assert 70 <= image[core].mean() <= 130  # enhancing parenchyma


def test_organ_is_not_separable_by_hu(cases):
    """Plenty of other tissue lies in the organ's HU range, and no HU window segments it well."""
    for image, label, _ in cases.values():
        organ = label.astype(bool)
        lo, hi = np.percentile(image[organ], [5, 95])
        others = np.count_nonzero((image >= lo) & (image <= hi) & ~organ)
        assert others > 2 * organ.sum()
        # best Dice of any window [lo, hi] from cumulative HU histograms
        bins = np.arange(-200, 400, 5)
        hist_in = np.concatenate([[0], np.cumsum(np.histogram(image[organ], bins)[0])])
        hist_all = np.concatenate([[0], np.cumsum(np.histogram(image, bins)[0])])
        lo_i, hi_i = np.triu_indices(len(bins), k=1)
        tp = hist_in[hi_i] - hist_in[lo_i]
        predicted = hist_all[hi_i] - hist_all[lo_i]
        assert (2 * tp / (predicted + organ.sum())).max() < 0.7


@pytest.mark.parametrize("orientation", ["LPS", "RAI", "LAS"])
def test_forced_orientation_is_the_same_anatomy_in_world_space(orientation):
    canonical = make_case(5, orientation="RAS")
    image, label, affine = make_case(5, orientation=orientation)
    assert _axis_code(canonical[2]) == "RAS" and _axis_code(affine) == orientation
    np.testing.assert_allclose(_world_centroid(label, affine), _world_centroid(*canonical[1:]), atol=1e-6)
    flipped = tuple(axis for axis, code in enumerate(orientation) if code not in "RAS")
    np.testing.assert_array_equal(np.flip(image, flipped), canonical[0])
    np.testing.assert_array_equal(np.flip(label, flipped), canonical[1])
    corners = np.array([[i, j, k, 1.0] for i in (0, 95) for j in (0, 95) for k in (0, 63)])
    world = {tuple(p) for p in np.round(corners @ affine.T, 6)}  # the same voxel centres
    assert world == {tuple(p) for p in np.round(corners @ canonical[2].T, 6)}


def test_seeds_draw_mostly_canonical_grids_and_others_keep_the_anatomy_in_place():
    """Most seeds draw RAS; those that draw a flipped or turned grid put the organ where the
    canonical grid of the same seed does."""
    kinds = []
    for seed in range(40):
        affine = make_case(seed, shape=(16, 16, 8))[2]
        turned = np.count_nonzero(np.abs(affine[:3, :3]) > 1e-9) > 3
        kinds.append("turned" if turned else _axis_code(affine))
    assert kinds.count("RAS") >= 20
    assert {"RAS", "LPS", "turned"} <= set(kinds)
    for kind in set(kinds) - {"RAS"}:
        seed = kinds.index(kind)
        _, label, affine = make_case(seed)
        canonical = make_case(seed, orientation="RAS")
        tolerance = 1.0 if kind == "turned" else 1e-6  # a turned grid samples other points
        np.testing.assert_allclose(
            _world_centroid(label, affine), _world_centroid(*canonical[1:]), atol=tolerance
        )


def test_same_patient_at_any_resolution():
    _, coarse, coarse_affine = make_case(2, shape=(64, 64, 48), orientation="RAS")
    _, fine, fine_affine = make_case(2, shape=(128, 128, 96), orientation="RAS")
    np.testing.assert_allclose(
        _world_centroid(coarse, coarse_affine), _world_centroid(fine, fine_affine), atol=2.0
    )
    coarse_ml = coarse.sum() * abs(np.linalg.det(coarse_affine[:3, :3])) / 1000
    fine_ml = fine.sum() * abs(np.linalg.det(fine_affine[:3, :3])) / 1000
    assert coarse_ml == pytest.approx(fine_ml, rel=0.1)


def test_spacing_can_be_set():
    _, _, affine = make_case(1, shape=(64, 64, 32), spacing=(0.8, 0.8, 2.5))
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), (0.8, 0.8, 2.5))


@pytest.mark.parametrize(
    "kwargs",
    [{"seed": -1}, {"seed": 1.5}, {"seed": 0, "shape": (96, 96)}, {"seed": 0, "shape": (4, 96, 64)},
     {"seed": 0, "spacing": (1.0, 0.0, 1.0)}, {"seed": 0, "orientation": "RSA"}],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        make_case(**kwargs)


def test_case_seeds_are_stable_and_distinct():
    assert case_seed(0, 1) == case_seed(0, 1)
    seeds = {case_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150


def test_write_archive_writes_msd_layout(tmp_path):
    shape = (40, 40, 24)
    out = str(tmp_path / "archive")
    written = write_archive(out, cases=3, seed=7, shape=shape)
    assert [case["case_id"] for case in written] == ["case_0000", "case_0001", "case_0002"]
    with open(os.path.join(out, "dataset.json")) as handle:
        dataset = json.load(handle)
    assert dataset["tensorImageSize"] == "3D"
    assert dataset["modality"] == {"0": "CT"}
    assert dataset["labels"] == {"0": "background", "1": "pancreas"}
    assert dataset["numTraining"] == 3 and len(dataset["training"]) == 3
    assert dataset["seed"] == 7 and dataset["shape"] == list(shape)
    for index, (case, entry) in enumerate(zip(written, dataset["training"])):
        name = f"case_{index:04d}.nii.gz"
        assert entry == {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}
        assert case["image_uri"] == os.path.join(out, entry["image"][2:])
        assert case["label_uri"] == os.path.join(out, entry["label"][2:])
        expected_image, expected_label, expected_affine = make_case(case_seed(7, index), shape)
        image, label = nib.load(case["image_uri"]), nib.load(case["label_uri"])
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), expected_image)
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), expected_label)
        for loaded in (image, label):
            np.testing.assert_allclose(loaded.affine, expected_affine, atol=1e-4)
            assert int(loaded.header["qform_code"]) == 1 and int(loaded.header["sform_code"]) == 1
    assert sorted(os.listdir(os.path.join(out, "imagesTr"))) == [f"case_{i:04d}.nii.gz" for i in range(3)]
    assert sorted(os.listdir(os.path.join(out, "labelsTr"))) == [f"case_{i:04d}.nii.gz" for i in range(3)]


@pytest.mark.s3
def test_write_archive_to_s3(s3_bucket):
    written = write_archive(f"{s3_bucket}/synth", cases=2, seed=1, shape=(32, 32, 16))
    dataset = json.loads(storage.read_bytes(f"{s3_bucket}/synth/dataset.json"))
    assert dataset["numTraining"] == 2
    for index, case in enumerate(written):
        assert case["image_uri"] == f"{s3_bucket}/synth/imagesTr/case_{index:04d}.nii.gz"
        expected_image, expected_label, expected_affine = make_case(case_seed(1, index), (32, 32, 16))
        image, label = read_volume(case["image_uri"]), read_volume(case["label_uri"])
        np.testing.assert_array_equal(image.array, expected_image)
        np.testing.assert_array_equal(label.array, expected_label)
        np.testing.assert_allclose(image.affine, expected_affine, atol=1e-4)


def test_write_archive_needs_a_case(tmp_path):
    with pytest.raises(ValueError):
        write_archive(str(tmp_path), cases=0)


def test_hard_family_is_anisotropic_with_a_small_organ_and_lps_cases(tmp_path):
    """`resdsn synth --family hard`: 192x192x80 at 0.8 x 0.8 x 2.0 mm, the organ 0.3-0.5 % of the
    voxels, every third case LPS, gas in the bowel; the files hold what `family_case` draws."""
    from resdsn_ray.cli import main

    out = str(tmp_path / "hard")
    assert main(["synth", out, "--cases", "3", "--seed", "5", "--family", "hard"]) == 0
    dataset = json.loads(storage.read_bytes(os.path.join(out, "dataset.json")))
    assert dataset["family"] == "hard" and dataset["shape"] == [192, 192, 80]
    codes = []
    for index in range(3):
        image = read_volume(os.path.join(out, "imagesTr", f"case_{index:04d}.nii.gz"))
        label = read_volume(os.path.join(out, "labelsTr", f"case_{index:04d}.nii.gz"))
        expected_image, expected_label, expected_affine = family_case("hard", 5, index)
        np.testing.assert_array_equal(label.array, expected_label)
        np.testing.assert_array_equal(image.array, expected_image)
        np.testing.assert_allclose(image.affine, expected_affine, atol=1e-4)
        assert image.shape == (192, 192, 80)
        np.testing.assert_allclose(image.spacing, (0.8, 0.8, 2.0), atol=1e-4)
        assert 0.002 < expected_label.mean() <= 0.005
        assert cc3d.connected_components(expected_label).max() == 1
        assert (expected_image[_body(expected_image)] < -500).any()  # bowel gas inside the body
        codes.append(_axis_code(expected_affine))
    assert codes[2] == "LPS"
