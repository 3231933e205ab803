"""Window plan, stitching and Crop/DeCrop against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resdsn_ray.boxes import Box, bounding_box, decrop
from resdsn_ray.windows import plan_windows, sliding_window_inference, window_starts


def double(batch: torch.Tensor) -> torch.Tensor:
    return 2.0 * batch[:, 0]


@pytest.mark.parametrize(
    ("length", "patch", "n", "expected"),
    [
        # the brief's example: k = 1 + 6 = 7, step 36/6 = 6
        (100, 64, 6, [0, 6, 12, 18, 24, 30, 36]),
        # k = 2 + 6 = 8, step 38/7 = 5.43: 0, 5.43, 10.86, 16.29, 21.71, 27.14, 32.57, 38
        (70, 32, 6, [0, 5, 11, 16, 22, 27, 33, 38]),
        # k = 4 + 1 = 5, step 98/4 = 24.5: 0, 24.5, 49, 73.5, 98 -> ties round half up
        (130, 32, 1, [0, 25, 49, 74, 98]),
        # n = 0, k = floor(130/32) = 4 would leave voxel 32 uncovered: k = ceil(130/32) = 5
        (130, 32, 0, [0, 25, 49, 74, 98]),
        # k = 1 + 6 = 7 starts in 0..1: i/6 rounded -> 0,0,0,1,1,1,1 -> unique
        (33, 32, 6, [0, 1]),
        (64, 64, 6, [0]),
        (20, 32, 6, [0]),
        (128, 32, 0, [0, 32, 64, 96]),
    ],
)
def test_window_starts_tables(length: int, patch: int, n: int, expected: list[int]) -> None:
    assert window_starts(length, patch, n) == expected


@pytest.mark.parametrize("bad", [(0, 32, 6), (10, 0, 6), (10, 32, -1)])
def test_window_starts_refuses_bad_arguments(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        window_starts(*bad)


def test_every_voxel_covered_and_k_follows_the_paper() -> None:
    for length in range(1, 200):
        for patch in (8, 32, 64):
            for n in (0, 1, 6, 12):
                starts = window_starts(length, patch, n)
                covered = np.zeros(max(length, patch), dtype=int)
                for s in starts:
                    covered[s : s + patch] += 1
                assert covered.min() >= 1 and starts[0] == 0
                assert starts[-1] == max(length - patch, 0)
                if length > patch:
                    k = max(length // patch + n, -(-length // patch))
                    assert len(starts) == min(k, length - patch + 1)


def test_plan_windows_is_the_cartesian_product() -> None:
    # P=64: 100 -> 7 starts; 20 -> padded, [0]; 70 -> k = 7 starts in 0..6, i.e. all of 0..6
    plan = plan_windows((100, 20, 70), 64, 6)
    assert len(plan) == 7 * 1 * 7 and plan[-1] == (36, 0, 6)
    # P=32: 100 -> k = 3 + 6 = 9; 20 -> [0]; 70 -> 8 (table above)
    plan = plan_windows((100, 20, 70), 32, 6)
    assert len(plan) == 9 * 1 * 8
    assert plan[0] == (0, 0, 0) and plan[-1] == (68, 0, 38)
    assert len(set(plan)) == len(plan)


SHAPES = [(70, 33, 130), (20, 40, 50), (10, 12, 9), (64, 64, 64), (32, 31, 96)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [0, 1, 6, 12])
@pytest.mark.parametrize("fusion", ["average", "gaussian"])
def test_stitching_a_pointwise_predictor_is_exact(shape: tuple[int, int, int], n: int, fusion: str) -> None:
    generator = torch.Generator().manual_seed(sum(shape) + n)
    image = torch.randn(shape, generator=generator)
    out = sliding_window_inference(image, double, patch=32, n=n, fusion=fusion, batch_size=5)
    assert out.shape == image.shape and out.dtype == torch.float32
    # float32 sums of up to 14^3 = 2744 overlapping windows per voxel (64^3, n = 12)
    torch.testing.assert_close(out, 2.0 * image, rtol=1e-4, atol=1e-4)


def test_padding_uses_the_volume_minimum_and_is_cut_off() -> None:
    image = torch.arange(10 * 12 * 9, dtype=torch.float32).reshape(10, 12, 9) + 5.0
    seen: list[torch.Tensor] = []

    def record(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.clone())
        return batch[:, 0]

    out = sliding_window_inference(image, record, patch=16, n=6)
    assert len(seen) == 1 and seen[0].shape == (1, 1, 16, 16, 16)
    assert seen[0][0, 0, 10:].eq(5.0).all() and seen[0][0, 0, :, 12:].eq(5.0).all()
    torch.testing.assert_close(out, image)


def test_vote_is_the_fraction_of_windows_above_half() -> None:
    # Axis 0 of length 6 with P=4, n=1: k = 1 + 1 = 2 windows at 0 and 2; other axes one window.
    image = torch.zeros(6, 4, 4)
    scores = {0: 0.9, 2: 0.2}

    def constant(batch: torch.Tensor) -> torch.Tensor:
        # windows come in plan order: x = 0 then x = 2
        values = torch.tensor([scores[0], scores[2]][: batch.shape[0]])
        return values.view(-1, 1, 1, 1).expand(-1, 4, 4, 4).clone()

    out = sliding_window_inference(image, constant, patch=4, n=1, fusion="vote", batch_size=2)
    expected_x = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    torch.testing.assert_close(out, expected_x.view(6, 1, 1).expand(6, 4, 4))
    avg = sliding_window_inference(image, constant, patch=4, n=1, fusion="average", batch_size=2)
    torch.testing.assert_close(avg[:, 0, 0], torch.tensor([0.9, 0.9, 0.55, 0.55, 0.2, 0.2]))


def test_gaussian_weighs_window_centres_more() -> None:
    image = torch.zeros(48, 32, 32)

    def by_start(batch: torch.Tensor) -> torch.Tensor:
        values = torch.tensor([1.0, 0.0])[: batch.shape[0]]
        return values.view(-1, 1, 1, 1).expand(-1, 32, 32, 32).clone()

    # Windows at x = 0 and x = 16: x = 20 is nearer window 0's centre (15.5) than window 1's (31.5).
    out = sliding_window_inference(image, by_start, patch=32, n=0, fusion="gaussian", batch_size=2)
    assert out[20, 16, 16] > 0.5 and out[27, 16, 16] < 0.5
    torch.testing.assert_close(out[8], torch.ones(32, 32))


def test_accumulator_can_be_forced_to_cpu_and_batches_do_not_matter() -> None:
    image = torch.randn(40, 36, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = sliding_window_inference(image, double, patch=16, n=1, batch_size=1, accumulate_device="cpu")
    b = sliding_window_inference(image, double, patch=16, n=1, batch_size=64)
    assert a.device.type == "cpu" and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, (2.0 * image).float())


@pytest.mark.parametrize("shape", [(70, 33, 130), (10, 40, 20)])
def test_ready_hears_the_rows_a_batch_reads_before_it_is_cut(shape: tuple[int, int, int]) -> None:
    # A volume streamed in along axis 0: rows not yet announced hold NaN.
    image = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    streamed = torch.full(shape, float("nan"))
    asked: list[int] = []

    def ready(rows: int) -> None:
        asked.append(rows)
        streamed[:rows] = image[:rows]

    def checked(batch: torch.Tensor) -> torch.Tensor:
        assert not batch.isnan().any(), "a window was cut from rows not yet announced"
        return double(batch)

    out = sliding_window_inference(streamed, checked, patch=16, n=1, batch_size=4, ready=ready)
    torch.testing.assert_close(out, 2.0 * image)
    assert asked == sorted(asked)
    if shape[0] > 16:  # the first batch needs only its windows' rows, the last one all rows
        assert asked[0] == 16 and asked[-1] == shape[0]
    else:  # padding needs the whole volume (its minimum) first
        assert asked[0] == shape[0]


def test_fixed_batch_gives_every_forward_one_shape_and_the_same_scores() -> None:
    image = torch.randn(40, 36, 20, generator=torch.Generator().manual_seed(4))
    sizes: list[int] = []

    def sized(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        return double(batch)

    windows = len(plan_windows(image.shape, 16, 1))
    fixed = sliding_window_inference(image, sized, patch=16, n=1, batch_size=7, fixed_batch=True)
    assert windows % 7 and sizes == [7] * -(-windows // 7)
    torch.testing.assert_close(fixed, sliding_window_inference(image, double, patch=16, n=1, batch_size=7))


def test_bad_predictor_output_and_fusion_are_refused() -> None:
    image = torch.zeros(8, 8, 8)
    with pytest.raises(ValueError, match="predictor returned"):
        sliding_window_inference(image, lambda b: b, patch=8, n=0)
    with pytest.raises(ValueError, match="fusion"):
        sliding_window_inference(image, double, patch=8, n=0, fusion="max")
    with pytest.raises(ValueError, match="3-D"):
        sliding_window_inference(torch.zeros(8, 8), double, patch=8, n=0)


def test_box_slices_and_decrop_round_trip() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 40, 50), dtype=np.uint8)
    mask[10:14, 20:23, 5:9] = 1
    box = bounding_box(mask, margin=3)
    assert box == Box(start=(7, 17, 2), stop=(17, 26, 12))
    assert box.shape == (10, 9, 10)
    image = rng.normal(size=mask.shape).astype(np.float32)
    sub = image[box.slices]
    np.testing.assert_array_equal(sub, image[7:17, 17:26, 2:12])
    back = decrop(mask[box.slices], box, mask.shape)
    np.testing.assert_array_equal(back, mask)
    assert back.dtype == mask.dtype
    filled = decrop(sub, box, mask.shape, fill=-1.0)
    assert filled[0, 0, 0] == -1.0 and np.array_equal(filled[box.slices], sub)
    assert Box.from_list(box.to_list()) == box and box.to_list() == [
        7,
        17,
        2,
        17,
        26,
        12,
    ]
    assert torch.from_numpy(image)[box.slices].shape == box.shape


def test_bounding_box_margin_is_clipped_at_the_border() -> None:
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[0, 9, 4] = True
    assert bounding_box(mask, margin=2) == Box(start=(0, 7, 2), stop=(3, 10, 7))
    assert bounding_box(mask, margin=0) == Box(start=(0, 9, 4), stop=(1, 10, 5))
    assert bounding_box(np.zeros((4, 4, 4)), margin=5) is None


def test_bad_boxes_are_refused() -> None:
    with pytest.raises(ValueError):
        Box(start=(0, 5, 0), stop=(1, 5, 1))
    box = Box(start=(0, 0, 0), stop=(4, 4, 4))
    with pytest.raises(ValueError):
        decrop(np.zeros((3, 4, 4)), box, (10, 10, 10))
    with pytest.raises(ValueError):
        decrop(np.zeros((4, 4, 4)), box, (3, 10, 10))
