"""Training: samplers, augmentation, the paper's optimisation formulas, and Ray Train runs on
one shared local cluster (DDP over two workers, kill and resume, checkpoints on S3)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resdsn_ray import storage
from resdsn_ray.bundle import load_bundle
from resdsn_ray.errors import InputError
from resdsn_ray.volumes import write_nifti
from resdsn_ray.model import build_model
from resdsn_ray.synthetic import make_case, write_archive
from resdsn_ray.training import (
    JHMI_ITERATIONS,
    PatchSampler,
    TrainingCase,
    add_train_flags,
    augment,
    config_from_args,
    load_training_cases,
    make_optimizer,
    poly_lr,
    prepare_case,
    preset_config,
    run_train,
    split_batch,
    train,
    train_step,
    training_cases,
)

torch.set_num_threads(1)
SHAPE = (40, 40, 32)  # small phantoms: the organ still spans several 16^3 patches


def _prepared(stage: str, patch: int = 16, seed: int = 3) -> TrainingCase:
    image, label, _ = make_case(seed, SHAPE)
    return prepare_case(f"case{seed}", image.astype(np.float32), label, stage, patch, preset_config("demo", stage).preprocess)


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
    image = np.full((10, 20, 30), 50.0, dtype=np.float32)
    label = np.zeros((10, 20, 30), dtype=np.uint8)
    label[4:6, 8:12, 10:20] = 1
    case = prepare_case("small", image, label, "coarse", 16, preset_config("demo", "coarse").preprocess)
    assert case.image.shape == (16, 20, 30) and case.label[10:].sum() == 0
    with pytest.raises(InputError, match="empty"):
        prepare_case("empty", image, np.zeros_like(label), "fine", 16, preset_config("demo", "fine").preprocess)
    with pytest.raises(InputError, match="shape"):
        prepare_case("mismatch", image, label[:, :, :5], "coarse", 16, preset_config("demo", "coarse").preprocess)


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


# ----------------------------------------------------------------- optimisation as the paper


def test_poly_learning_rate_and_paper_preset():
    assert poly_lr(0.01, 0, 80_000) == 0.01
    assert poly_lr(0.01, 40_000, 80_000) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 79_999, 80_000) == pytest.approx(0.01 * (1 / 80_000) ** 0.9)
    paper = preset_config("paper", "coarse")
    assert (paper.iterations, paper.batch_size, paper.lr, paper.momentum, paper.lr_power, paper.weight_decay) == (
        80_000, 16, 0.01, 0.9, 0.9, 5e-4)
    assert (paper.model.patch, paper.model.width, paper.model.aux_weights) == (64, 32, (0.2, 0.4))
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    jhmi = config_from_args(parser.parse_args(["--stage", "fine", "--output", "x", "--jhmi"]))
    assert jhmi.iterations == JHMI_ITERATIONS == 300_000 and jhmi.stage == "fine"
    optimizer = make_optimizer(build_model("resdsn", width=2), paper)
    assert paper.optimizer == "sgd" and isinstance(optimizer, torch.optim.SGD)
    assert (optimizer.param_groups[0]["momentum"], optimizer.param_groups[0]["weight_decay"]) == (0.9, 5e-4)


def test_train_step_minimises_eq3_with_sgd_weight_decay():
    torch.manual_seed(0)
    model = build_model("resdsn", width=2)
    reference = copy.deepcopy(model)
    config = preset_config("paper", "coarse")
    optimizer = make_optimizer(model, config)
    x = torch.randn(2, 1, 8, 8, 8)
    y = (torch.rand(2, 8, 8, 8) > 0.7).long()
    main, aux2, aux3 = reference(x)
    expected = F.cross_entropy(main, y) + 0.2 * F.cross_entropy(aux2, y) + 0.4 * F.cross_entropy(aux3, y)
    expected.backward()
    loss = train_step(model, optimizer, x, y, lr=0.005, aux_weights=config.model.aux_weights)
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5)
    # First SGD step (momentum buffer empty): p <- p - lr * (grad + weight_decay * p).
    for new, old in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(new, old - 0.005 * (old.grad + 5e-4 * old), rtol=1e-5, atol=1e-7)


def test_global_batch_split_over_workers():
    assert [split_batch(16, 3, r) for r in range(3)] == [6, 5, 5]
    assert [split_batch(16, 2, r) for r in range(2)] == [8, 8]
    with pytest.raises(ValueError):
        split_batch(2, 4, 0)


# ------------------------------------------------------------------------ cases and input


def _archive(root: str, cases: int = 6, seed: int = 0) -> str:
    write_archive(root, cases=cases, seed=seed, shape=SHAPE)
    return root


def test_unreadable_and_empty_cases_are_reported_by_id(tmp_path: Path):
    data = _archive(str(tmp_path / "data"), cases=3)
    (tmp_path / "data" / "imagesTr" / "case_0001.nii.gz").write_bytes(b"not a nifti file")
    _, label, affine = make_case(5, SHAPE)
    write_nifti(str(tmp_path / "data" / "labelsTr" / "case_0002.nii.gz"), np.zeros_like(label), affine)
    cases, rejected = training_cases(data, None)
    assert [c.case_id for c in cases] == ["case_0000", "case_0001", "case_0002"] and not rejected
    rows = [{"case_id": c.case_id, "image_uri": c.image_uri, "label_uri": c.label_uri} for c in cases]
    loaded, skipped = load_training_cases(rows, preset_config("demo", "fine", patch=16))
    assert [c.case_id for c in loaded] == ["case_0000"]
    reasons = {s["case_id"]: s["reason"] for s in skipped}
    assert "unreadable" in reasons["case_0001"] and "empty" in reasons["case_0002"]
    loaded, skipped = load_training_cases(rows, preset_config("demo", "coarse", patch=16))
    assert [c.case_id for c in loaded] == ["case_0000", "case_0002"]  # coarse: empty = negatives


# -------------------------------------------------------------------------- Ray Train runs


@pytest.fixture(scope="module")
def ray_cluster():
    """One local single-node Ray cluster (2 CPUs) for the Ray Train runs of this module.

    Ray Train's DDP runs want one node with 2 CPUs, not the archive tests' two 1-CPU nodes, so
    a driver those modules left connected is disconnected first (their session cluster keeps
    running and is stopped by its own fixture; they run earlier in file order)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def _tiny(stage: str = "coarse", **kw) -> object:
    settings = {"iterations": 40, "patch": 16, "width": 4, "batch_size": 4, "checkpoint_every": 10,
                "keep_checkpoints": 2, "validate_every": 40, "val_n": 1, "log_every": 5}
    settings.update(kw)
    return preset_config("demo", stage, **settings)


def _checkpoints(fs_root: str) -> list[str]:
    fs, path = storage.filesystem(storage.join(fs_root, "train"))
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path) if fs.isdir(p) and p.rsplit("/", 1)[-1].startswith("checkpoint_"))


@pytest.mark.ray
def test_two_worker_ddp_run_killed_and_resumed(ray_cluster, tmp_path: Path):
    from ray.train import TrainingFailedError

    data = _archive(str(tmp_path / "data"))
    (tmp_path / "data" / "imagesTr" / "case_0004.nii.gz").write_bytes(b"\x1f\x8b broken")
    output = str(tmp_path / "run")
    config = _tiny(fail_at=25)
    with pytest.raises(TrainingFailedError):
        train(config, output, data=data, val_cases=1, workers=2, max_failures=0)
    assert _checkpoints(output) == ["checkpoint_0000010", "checkpoint_0000020"]

    result = train(dataclasses.replace(config, fail_at=0), output, data=data, val_cases=1, workers=2, max_failures=0)
    assert result.metrics["start_iteration"] == 20 and result.iterations == 40
    checksums = result.metrics["checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # gradients averaged: replicas identical
    assert [s["case_id"] for s in result.skipped] == ["case_0004"]
    losses = [h["loss"] for h in result.history]
    assert [h["iteration"] for h in result.history] == list(range(5, 41, 5))
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    for h in result.history:  # the lr of the history's last step in each window
        assert h["lr"] == pytest.approx(poly_lr(config.lr, h["iteration"] - 1, 40))
    assert result.val_dsc is not None and 0.0 <= result.val_dsc <= 1.0
    assert _checkpoints(output) == ["checkpoint_0000030", "checkpoint_0000040"]  # keep 2
    bundle = load_bundle(result.bundle_uri)
    assert bundle.stage == "coarse" and bundle.id == result.bundle_id
    assert bundle.provenance["iterations"] == 40 and bundle.provenance["preset"] == "demo"
    assert bundle.provenance["final_loss"] == pytest.approx(losses[-1])
    record = json.loads(Path(output, "run.json").read_text())
    assert record["status"] == "done" and len(record["val_cases"]) == 1

    with pytest.raises(InputError, match="other settings"):  # same output, another recipe
        train(dataclasses.replace(config, fail_at=0, lr=0.1), output, data=data, workers=2)


@pytest.mark.ray
@pytest.mark.s3
def test_checkpoints_and_bundle_on_s3_survive_a_worker_failure(ray_cluster, s3_bucket: str):
    data = _archive(f"{s3_bucket}/data", cases=3)
    output = f"{s3_bucket}/runs/fine"
    config = _tiny("fine", iterations=20, fail_at=15, validate_every=20)
    result = train(config, output, data=data, workers=1, max_failures=1)
    assert result.metrics["start_iteration"] == 10 and result.iterations == 20  # restored from S3
    assert _checkpoints(output) == ["checkpoint_0000010", "checkpoint_0000020"]
    fs, path = storage.filesystem(f"{output}/train/checkpoint_0000020/state.pt")
    state = torch.load(fs.open(path, "rb"), weights_only=True)
    assert state["iteration"] == 20 and state["config"]["stage"] == "fine"
    bundle = load_bundle(f"{output}/bundle")
    assert bundle.stage == "fine" and bundle.model_config.patch == 16
    assert bundle.provenance["data"] == data
    assert json.loads(storage.read_bytes(f"{output}/run.json"))["status"] == "done"


@pytest.mark.ray
def test_too_few_readable_cases_refuse_to_train(ray_cluster, tmp_path: Path, capsys):
    data = _archive(str(tmp_path / "data"), cases=2)
    (tmp_path / "data" / "labelsTr" / "case_0000.nii.gz").write_bytes(b"garbage")
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    args = parser.parse_args(["--stage", "coarse", "--data", data, "--output", str(tmp_path / "run"), "--preset", "demo",
                              "--iterations", "5", "--patch", "16", "--width", "4", "--min-cases", "2", "--val-cases", "0"])
    with pytest.raises(InputError, match="only 1 usable") as err:
        run_train(args)
    assert "case_0000" in str(err.value)


@pytest.mark.ray
def test_gpu_asked_on_a_cluster_without_gpus_is_refused_at_once(ray_cluster, tmp_path: Path):
    data = _archive(str(tmp_path / "data"), cases=2)
    with pytest.raises(InputError, match="GPU"):  # instead of waiting forever for one
        train(_tiny(), str(tmp_path / "run"), data=data, workers=1, gpu=True)
    with pytest.raises(InputError, match="global batch"):
        train(_tiny(batch_size=2), str(tmp_path / "run"), data=data, workers=3)
    assert not (tmp_path / "run").exists()
