"""geoseg.models: batch contract, block shapes, IKD-Net channel bookkeeping, ablations, API."""

from __future__ import annotations

import pytest
import torch

from geoseg.classes import CLASS_NAMES
from geoseg.models import MODELS, IKDNet, UNet, create_model, make_dummy_batch
from geoseg.models.batch import Batch, class_probabilities, neighbour_indices
from geoseg.models.fusion import CKG, GKG, DimensionSensor, PointVote, top_point_map
from geoseg.models.neighbors import grid_knn
from geoseg.models.randlanet import (
    LFA,
    AttentivePooling,
    LocSE,
    RandLANet,
    nearest_upsample,
    random_sample,
)
from geoseg.train.losses import HolisticLoss
from tests.test_neighbors import assert_same_neighbours

TINY_IMAGE = (8, 16, 16, 32)
TINY_POINTS = (4, 8, 8, 16)
SIZE, N_POINTS = 64, 4096


@pytest.fixture(scope="module")
def batch() -> Batch:
    return make_dummy_batch(batch_size=2, image_size=SIZE, num_points=N_POINTS, in_channels=4)


def tiny_ikdnet(**kwargs: bool) -> IKDNet:
    torch.manual_seed(0)
    return IKDNet(in_channels=4, widths=TINY_IMAGE, point_widths=TINY_POINTS, **kwargs)


def test_dummy_batch_is_geometrically_consistent(batch: Batch) -> None:
    pts = batch["points"]
    sizes = [N_POINTS // 4**level for level in range(5)]
    assert [x.shape[1] for x in pts["xyz"]] == sizes
    assert pts["features"].shape == (2, N_POINTS, 2)
    for level in range(4):
        xyz, nbrs = pts["xyz"][level], pts["neighbors"][level]
        assert nbrs.shape == (2, sizes[level], 16) and nbrs.dtype == torch.int64
        assert torch.equal(nbrs[..., 0], torch.arange(sizes[level]).expand(2, -1))  # self first
        assert torch.equal(pts["sub_idx"][level], nbrs[:, : sizes[level + 1]])
        assert torch.equal(pts["xyz"][level + 1], xyz[:, : sizes[level + 1]])
        nearest = torch.cdist(xyz, pts["xyz"][level + 1]).argmin(-1, keepdim=True)
        assert torch.equal(pts["interp_idx"][level], nearest)
        assert torch.equal(
            pts["pixels"][level + 1], pts["pixels"][level][:, : sizes[level + 1]] // 2
        )
    for level, pixels in enumerate(pts["pixels"]):
        assert pixels.min() >= 0 and pixels.max() < SIZE // 2**level


def test_randlanet_blocks() -> None:
    torch.manual_seed(0)
    xyz = torch.randn(2, 3, 50, 1)
    idx = torch.randint(0, 50, (2, 50, 6))
    geometry = LocSE.relative_positions(xyz, idx)
    assert geometry.shape == (2, 10, 50, 6)
    assert torch.allclose(geometry[:, 0], geometry[:, 1:4].norm(dim=1))
    features = torch.randn(2, 7, 50, 1)
    concat, encoded = LocSE(10, 4)(geometry, features, idx)
    assert concat.shape == (2, 11, 50, 6) and encoded.shape == (2, 4, 50, 6)
    assert AttentivePooling(11, 9)(concat).shape == (2, 9, 50, 1)
    assert LFA(7, 12)(xyz, features, idx).shape == (2, 24, 50, 1)
    sub_idx = idx[:, :10]
    pooled = random_sample(features, sub_idx)
    assert pooled.shape == (2, 7, 10, 1)
    assert torch.equal(pooled[1, :, 3, 0], features[1, :, sub_idx[1, 3], 0].amax(-1))
    up = nearest_upsample(pooled, torch.zeros(2, 50, 1, dtype=torch.int64))
    assert up.shape == (2, 7, 50, 1) and torch.equal(up[:, :, 17], pooled[:, :, 0])


def test_randlanet_channels_and_stages(batch: Batch) -> None:
    assert RandLANet().stage_channels == [512, 256, 128, 32]  # authors' d_out [16, 64, 128, 256]
    out = RandLANet(5, 5, TINY_POINTS)(batch["points"])
    assert out.logits.shape == (2, N_POINTS, 5)
    expected = [(32, 16), (16, 64), (16, 256), (8, 1024)]  # (channels, points), coarsest first
    assert [(s.shape[1], s.shape[2]) for s in out.stages] == expected


def test_unet_is_milesial_bilinear() -> None:
    net = UNet(in_channels=3)
    assert [d[1][4].num_features for d in net.downs] == [128, 256, 512, 512]
    assert [up.conv[0].in_channels for up in net.ups] == [1024, 512, 256, 128]
    assert [up.conv[0].out_channels for up in net.ups] == [512, 256, 128, 64]  # mid = in // 2
    assert [up.conv[3].out_channels for up in net.ups] == [256, 128, 64, 64]
    image = torch.randn(1, 3, 32, 32)
    assert [m.shape[1:] for m in net.encode(image)] == [
        (64, 32, 32),
        (128, 16, 16),
        (256, 8, 8),
        (512, 4, 4),
        (512, 2, 2),
    ]
    with pytest.raises(ValueError, match="divisible by 16"):
        net.encode(torch.randn(1, 3, 40, 40))


def test_ikdnet_full_width_channel_bookkeeping() -> None:
    model = IKDNet(in_channels=3).eval()
    assert [up.conv[0].in_channels for up in model.image.ups] == [1536, 768, 384, 160]
    assert model.ckg.classify.in_channels == 96 and model.ckg.classify.out_channels == 5
    assert model.image.outc is None
    small = make_dummy_batch(batch_size=1, image_size=32, num_points=1024, in_channels=3)
    with torch.no_grad():
        out = model(small)
    assert out["logits"].shape == (1, 5, 32, 32)
    assert out["point_logits"].shape == (1, 1024, 5)
    assert [g.shape[-1] for g in out["gates"]] == [2, 4, 8, 16]


def test_dimension_sensor_places_and_fills() -> None:
    features = torch.tensor([[[1.0, 2.0, 5.0, 3.0]]])  # B=1, C=1, N=4
    pixels = torch.tensor([[[3, 4], [10, 10], [10, 10], [0, 15]]])
    grid = DimensionSensor.scatter(features, pixels, (16, 16))
    assert grid[0, 0, 3, 4] == 1 and grid[0, 0, 10, 10] == 5 and grid[0, 0, 0, 15] == 3
    assert grid.count_nonzero() == 3  # the collision kept its maximum, holes are 0
    dense = DimensionSensor()(features, pixels, (16, 16))[0, 0]
    assert torch.all(dense[1:6, 2:7] == 1) and torch.all(dense[8:13, 8:13] == 5)
    assert torch.all(dense[0:3, 13:16] == 3)
    assert dense.count_nonzero() == 25 + 25 + 9


def test_gkg_gates_image_with_point_map() -> None:
    torch.manual_seed(0)
    image, points = torch.randn(2, 6, 8, 8), torch.randn(2, 3, 8, 8)
    fused, gate = GKG()(image, points)
    assert fused.shape == (2, 9, 8, 8) and gate.shape == (2, 1, 8, 8)
    assert gate.min() > 0 and gate.max() < 1
    assert torch.allclose(fused[:, :6], image * gate) and torch.equal(fused[:, 6:], points)


def test_ckg_matches_released_acf_formula() -> None:
    torch.manual_seed(0)
    ckg = CKG(in_channels=6, mid_channels=4, num_classes=5).eval()
    features, coarse = torch.randn(2, 6, 8, 8), torch.rand(2, 5, 8, 8)
    reduced = ckg.reduce(features).flatten(2)  # B × C' × HW
    energy = torch.einsum("bkp,bcp->bkc", coarse.flatten(2), reduced)
    attention = torch.softmax(energy, dim=2)  # over channels, as in the released code
    attended = torch.einsum("bkc,bkp->bcp", attention, coarse.flatten(2)).view(2, 4, 8, 8)
    expected = ckg.classify(torch.cat([ckg.project(attended), features], dim=1))
    assert torch.allclose(ckg(features, coarse), expected, atol=1e-5)


@pytest.mark.parametrize("ckg_unlabeled", [False, True])
def test_ckg_class_map_excludes_the_untrained_unlabeled_score(
    batch: Batch, ckg_unlabeled: bool
) -> None:
    """By default the CKG pools class centres from the 4 real classes' point scores only: the
    class-0 score, which no loss trains, cannot move the pixel logits."""
    model = tiny_ikdnet(ckg_unlabeled=ckg_unlabeled).eval()
    with torch.no_grad():
        before = model(batch)["logits"]
        last = model.points.head[-1][0]  # the 32 -> num_classes 1x1 conv of the point head
        last.weight[0].add_(torch.randn_like(last.weight[0]))
        last.bias[0].add_(3.0)
        after = model(batch)["logits"]
    assert torch.equal(before, after) != ckg_unlabeled


def test_top_point_map_keeps_each_pixels_highest_point() -> None:
    """The labels' own rule (highest labelled point wins), on predictions: a canopy point above
    a ground return of the same pixel decides it, whatever the order of the points."""
    values = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]])  # B=1, N=4, C=2
    z = torch.tensor([[1.0, 12.0, 0.5, 3.0]])
    pixels = torch.tensor([[[2, 3], [2, 3], [0, 0], [3, 3]]])
    grid = top_point_map(values, z, pixels, (4, 4))
    assert torch.equal(grid[0, :, 2, 3], values[0, 1])  # the 12 m point, not the 1 m one
    assert torch.equal(grid[0, :, 0, 0], values[0, 2])
    assert torch.equal(grid[0, :, 3, 3], values[0, 3])
    assert grid[0].isnan().all(0).sum() == 16 - 3  # pixels under no point are empty
    flipped = top_point_map(values.flip(1), z.flip(1), pixels.flip(1), (4, 4))
    assert torch.equal(flipped.nan_to_num(-1), grid.nan_to_num(-1))


def test_point_vote_averages_pixel_and_point_probabilities() -> None:
    torch.manual_seed(0)
    logits, point_logits = torch.randn(1, 5, 4, 4), torch.randn(1, 3, 5)
    z, pixels = torch.tensor([[0.0, 5.0, 1.0]]), torch.tensor([[[1, 1], [1, 1], [2, 0]]])
    probs = PointVote()(logits, point_logits, z, pixels)[:, 1:].exp()
    image, points = logits[:, 1:].softmax(1), point_logits[..., 1:].softmax(2)
    assert torch.allclose(probs.sum(1), torch.ones(1, 4, 4))
    assert torch.allclose(probs[0, :, 1, 1], (image[0, :, 1, 1] + points[0, 1]) / 2)
    assert torch.allclose(probs[0, :, 2, 0], (image[0, :, 2, 0] + points[0, 2]) / 2)
    assert torch.allclose(probs[0, :, 3, 3], image[0, :, 3, 3])  # no point: the image alone


def test_point_vote_acts_at_inference_only(batch: Batch) -> None:
    """Training (and so the checkpoint) is the same with or without the vote; eval outputs
    differ only on pixels under a point."""
    plain, voting = tiny_ikdnet(), tiny_ikdnet(point_vote=True)
    trained = []
    for model in (plain, voting):
        torch.manual_seed(1)  # the same dropout masks
        trained.append(model(batch)["logits"])
    assert torch.equal(*trained)  # train mode
    plain.eval(), voting.eval()
    with torch.no_grad():
        before, after = plain(batch), voting(batch)
    assert torch.equal(before["point_logits"], after["point_logits"])
    cells = batch["points"]["pixels"][0]
    covered = torch.zeros(2, SIZE * SIZE, dtype=torch.bool)
    covered.scatter_(1, cells[..., 0] * SIZE + cells[..., 1], True)
    covered = covered.view(2, SIZE, SIZE)
    moved = class_probabilities(before["logits"], 1) - class_probabilities(after["logits"], 1)
    changed = moved.abs().amax(1) > 1e-5
    assert changed.any() and not (changed & ~covered).any()
    assert tiny_ikdnet(point_vote=True, use_points=False).vote is None


def test_ablations_change_the_graph(batch: Batch) -> None:
    no_gkg = tiny_ikdnet(use_gkg=False)
    assert no_gkg.gkg is None and no_gkg(batch)["gates"] is None
    assert [up.conv[0].in_channels for up in no_gkg.image.ups] == [
        up.conv[0].in_channels for up in tiny_ikdnet().image.ups
    ]  # point maps still concatenated, just not gated
    no_ckg = tiny_ikdnet(use_ckg=False)
    assert no_ckg.ckg is None and no_ckg.image.outc is not None
    assert no_ckg(batch)["logits"].shape == (2, 5, SIZE, SIZE)

    image_only = tiny_ikdnet(use_points=False).eval()
    assert image_only.points is None and image_only.gkg is None and image_only.ckg is None
    unet = UNet(in_channels=4, widths=TINY_IMAGE).eval()
    unet.load_state_dict({k.removeprefix("image."): v for k, v in image_only.state_dict().items()})
    with torch.no_grad():
        out = image_only(batch)
        assert torch.equal(out["logits"], unet(batch)["logits"])
    assert out["point_logits"] is None and out["gates"] is None


def test_gradients_reach_both_branches(batch: Batch) -> None:
    model = tiny_ikdnet()
    out = model(batch)
    assert all(g.min() > 0 and g.max() < 1 for g in out["gates"])
    out["logits"].square().mean().backward()
    assert model.points.fc0.weight.grad.abs().sum() > 0
    assert model.points.encoder[0].mlp1[0].weight.grad.abs().sum() > 0
    assert model.image.inc[0].weight.grad.abs().sum() > 0
    assert all(g.conv.weight.grad.abs().sum() > 0 for g in model.gkg)


def test_configurable_number_of_levels() -> None:
    small = make_dummy_batch(batch_size=1, image_size=32, num_points=2048, levels=3)
    model = IKDNet(in_channels=4, widths=(8, 16, 16), point_widths=(4, 8, 16))
    out = model(small)
    assert out["logits"].shape == (1, 5, 32, 32) and len(out["gates"]) == 3


TINY_KWARGS = {
    "ikdnet": {"in_channels": 4, "widths": TINY_IMAGE, "point_widths": TINY_POINTS},
    "unet": {"in_channels": 4, "widths": TINY_IMAGE},
    "smp-unet": {"in_channels": 4, "encoder_name": "resnet18"},
    "randlanet": {"point_widths": TINY_POINTS},
    "early-fusion": {"in_channels": 4, "encoder_name": "resnet18"},
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_create_model_uniform_contract(name: str, batch: Batch) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=len(CLASS_NAMES), **TINY_KWARGS[name]).eval()
    with torch.no_grad():
        first, second = model(batch), model(batch)
    assert set(first) == {"logits", "point_logits", "gates"}
    assert first["logits"].shape == (2, len(CLASS_NAMES), SIZE, SIZE)
    assert torch.equal(first["logits"], second["logits"])  # eval mode is deterministic
    if name in ("ikdnet", "randlanet"):
        assert first["point_logits"].shape == (2, N_POINTS, len(CLASS_NAMES))
    else:
        assert first["point_logits"] is None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trains_under_bf16_autocast_and_channels_last(name: str, batch: Batch) -> None:
    """The GPU settings (bf16 autocast, channels_last) rehearsed on CPU, where autocast casts the
    same conv/linear/matmul ops: no dtype mismatch in the scatters, gathers, gates or loss."""
    torch.manual_seed(0)
    model = create_model(name, **TINY_KWARGS[name]).to(memory_format=torch.channels_last)
    inputs = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
    mask = torch.randint(0, len(CLASS_NAMES), (2, SIZE, SIZE))
    labels = torch.randint(0, len(CLASS_NAMES), (2, N_POINTS))
    with torch.autocast("cpu", torch.bfloat16):
        out = model(inputs)
        total = HolisticLoss(torch.ones(len(CLASS_NAMES)))(
            out, mask, labels, batch["points"]["pixels"][0]
        )["total"]
    assert out["logits"].dtype == torch.bfloat16 and torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_create_model_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        create_model("segformer")


def test_device_pyramid_matches_the_worker_pyramid(batch: Batch) -> None:
    """`neighbour_indices` on the batched levels with the GPU search (run on CPU here) gives the
    per-tile cKDTree indices of the workers (up to ties), and the same indices tile by tile."""
    points = batch["points"]
    device = neighbour_indices(points["xyz"], k=16, search=grid_knn)
    xyz = [level.numpy() for level in points["xyz"]]
    for tile in range(len(batch["image"])):
        single = neighbour_indices([level[tile] for level in points["xyz"]], 16, grid_knn)
        for level in range(len(xyz) - 1):
            pts, kept = xyz[level][tile], xyz[level + 1][tile]
            queries = {"neighbors": (pts, pts), "sub_idx": (kept, pts), "interp_idx": (pts, kept)}
            for key, (query, reference) in queries.items():
                got = device[key][level][tile]
                assert got.shape == points[key][level][tile].shape, key
                assert torch.equal(got, single[key][level]), key
                want = points[key][level][tile].numpy()
                assert_same_neighbours(query, reference, got.numpy(), want)
