"""Test-time augmentation: dihedral views of a whole batch, and the averaged prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from affine import Affine

from geoseg.datasets.points import PointConfig, View, prepare_points
from geoseg.models import create_model
from geoseg.models.batch import make_dummy_batch
from geoseg.train.metrics import predict_labels
from geoseg.train.tta import VIEWS, contract_tta, predict_views, view_batch

SIZE = 32


def test_views_are_the_dihedral_group_and_inverses_undo_them():
    raster = np.arange(2 * SIZE * SIZE).reshape(2, SIZE, SIZE)
    images = {view: view.apply(raster) for view in VIEWS}
    assert len({im.tobytes() for im in images.values()}) == 8  # 8 different views
    for view, image in images.items():
        np.testing.assert_array_equal(view.inverse.apply(image), raster)
        tensor = view.apply(torch.from_numpy(raster))  # numpy and torch views agree
        np.testing.assert_array_equal(tensor.numpy(), image)
        np.testing.assert_array_equal(view.inverse.apply(tensor).numpy(), raster)


def test_batch_views_move_points_as_the_dataset_does():
    """`view_batch` on a collated tile = the tile sampled under that view by the dataset."""
    rng = np.random.default_rng(0)
    n = 3000
    arrays = {
        "x": rng.uniform(0, SIZE / 2, n), "y": rng.uniform(0, SIZE / 2, n),
        "z": rng.normal(0, 3, n), "intensity": rng.integers(0, 999, n).astype(np.uint16),
        "return_number": rng.integers(1, 4, n).astype(np.uint8),
        "classification": rng.choice([2, 5], n).astype(np.uint8),
    }  # fmt: skip
    transform = Affine(0.5, 0, 0, 0, -0.5, SIZE / 2)  # SIZE px at 0.5 m over the points
    cfg = PointConfig(num_points=1024, levels=3, ratio=4, k=8)

    def tile(view: View | None) -> dict:
        return prepare_points(arrays, transform, SIZE, cfg, np.random.default_rng(1), view)

    plain = tile(None)
    batch = {
        "image": torch.zeros(1, 3, SIZE, SIZE),
        "points": {k: [torch.from_numpy(a)[None] for a in plain[k]] for k in ("xyz", "pixels")}
        | {"features": torch.from_numpy(plain["features"])[None]},
    }
    for view in VIEWS:
        moved, expected = view_batch(batch, view)["points"], tile(view)
        for key in ("xyz", "pixels"):
            for got, want in zip(moved[key], expected[key], strict=True):
                np.testing.assert_array_equal(got[0].numpy(), want)
    np.testing.assert_array_equal(batch["points"]["pixels"][0][0].numpy(), plain["pixels"][0])


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        "ikdnet", in_channels=3, num_classes=5, widths=[8, 16, 32, 64],
        point_widths=[8, 8, 16, 16], ckg_channels=8,
    ).eval()  # fmt: skip


def test_tta_is_equivariant_and_one_view_is_the_plain_prediction(model: torch.nn.Module):
    batch = make_dummy_batch(2, SIZE, 1024, in_channels=3)
    with torch.inference_mode():
        tta = predict_views(model, batch)
        for view in VIEWS:  # the TTA prediction of a turned tile is the turned TTA prediction
            turned = predict_views(model, view_batch(batch, view))
            torch.testing.assert_close(turned["logits"], view.apply(tta["logits"]))
            torch.testing.assert_close(turned["point_logits"], tta["point_logits"])
        plain, one = model(batch), predict_views(model, batch, (View(),))
    for key, dim in (("logits", 1), ("point_logits", 2)):
        real = plain[key].narrow(dim, 1, plain[key].shape[dim] - 1)
        torch.testing.assert_close(one[key].narrow(dim, 1, real.shape[dim]), real.log_softmax(dim))
        assert torch.equal(predict_labels(one[key], dim), predict_labels(plain[key], dim))
        assert torch.isfinite(tta[key]).all()
    # the average differs from the plain pass (the random model is not invariant)
    assert not torch.allclose(tta["logits"][:, 1:].exp(), one["logits"][:, 1:].exp())


def test_image_only_batches_and_the_checkpoint_default():
    torch.manual_seed(0)
    unet = create_model("unet", in_channels=3, num_classes=5, widths=[8, 16, 32, 64]).eval()
    image = torch.randn(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        tta = predict_views(unet, {"image": image, "points": None})
        turned = predict_views(unet, {"image": VIEWS[5].apply(image), "points": None})
    assert tta["point_logits"] is None
    torch.testing.assert_close(turned["logits"], VIEWS[5].apply(tta["logits"]))
    assert contract_tta({}, None) is False  # checkpoints from before the key: plain
    assert contract_tta({"tta": True}, None) is True
    assert contract_tta({"tta": True}, False) is False


def test_quarter_turns_refuse_non_square_pixel_grids():
    pixels = torch.zeros(1, 4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="square"):
        View(turns=1).pixels(pixels, (4, 8))
