"""Holistic loss, class weights and confusion-matrix metrics (geoseg.train)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from geoseg.classes import CLASS_NAMES
from geoseg.models import ModelOutput, create_model, make_dummy_batch
from geoseg.train import (
    ConfusionMatrix,
    HolisticLoss,
    class_weights,
    majority_baseline,
    metrics,
    point_pixel_consistency,
    predict_labels,
    save_confusion,
)

# --- class weights ---------------------------------------------------------------------------


def test_class_weights_from_stats_counts() -> None:
    counts = {"unlabeled": 999, "others": 10, "ground": 30, "tree": 60, "building": 0}
    # f = (0.1, 0.3, 0.6, 0.0) over the 100 labelled samples; w = 1/(f + 0.02)
    expected = torch.tensor([0.0, 1 / 0.12, 1 / 0.32, 1 / 0.62, 1 / 0.02])
    torch.testing.assert_close(class_weights(counts), expected)
    torch.testing.assert_close(class_weights([5, 10, 30, 60, 0]), expected)  # by label value
    torch.testing.assert_close(class_weights([10, 30, 60, 0]), expected)  # classes 1..4
    torch.testing.assert_close(class_weights(counts, offset=0.1)[1], torch.tensor(1 / 0.2))


@pytest.mark.parametrize(
    "counts", [{"unlabeled": 7}, [0, 0, 0, 0], {"others": 1, "water": 2}, [1, 2, 3], [1, -1, 0, 0]]
)
def test_class_weights_rejects_bad_counts(counts: object) -> None:
    with pytest.raises(ValueError):
        class_weights(counts)  # type: ignore[arg-type]


# --- loss terms ------------------------------------------------------------------------------

WEIGHTS = class_weights([10, 30, 60, 20])


def _image_only(logits: torch.Tensor) -> ModelOutput:
    return ModelOutput(logits=logits, point_logits=None, gates=None)


def test_pixel_ce_is_weighted_and_ignores_unlabeled() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 2, 3)
    mask = torch.tensor([[[0, 1, 2], [3, 4, 0]]])
    out = HolisticLoss(WEIGHTS)(_image_only(logits), mask)
    flat, target = logits.permute(0, 2, 3, 1).reshape(-1, 5), mask.reshape(-1)
    keep = target != 0
    nll = -torch.log_softmax(flat[keep], 1).gather(1, target[keep, None]).squeeze(1)
    w = WEIGHTS[target[keep]]
    torch.testing.assert_close(out["img"], (w * nll).sum() / w.sum())
    # changing the logits of unlabeled pixels changes nothing
    logits2 = logits.clone()
    logits2[0, :, 0, 0] = 100.0
    torch.testing.assert_close(HolisticLoss(WEIGHTS)(_image_only(logits2), mask)["img"], out["img"])
    assert out["pc"] == 0 and out["sc"] == 0 and out["total"] == out["img"]


def test_all_unlabeled_gives_zero_not_nan() -> None:
    logits = torch.randn(1, 5, 4, 4, requires_grad=True)
    out = HolisticLoss(WEIGHTS)(_image_only(logits), torch.zeros(1, 4, 4, dtype=torch.int64))
    assert out["total"].item() == 0.0
    out["total"].backward()  # still differentiable


def _point_case(agree: bool) -> tuple[ModelOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2×2 image, 3 points on distinct pixels; point logits = pixel logits when `agree`."""
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 2, 2)
    pixels = torch.tensor([[[0, 0], [1, 1], [0, 1]]])
    under = logits[0, :, pixels[0, :, 0], pixels[0, :, 1]].T[None]  # (1, 3, 5)
    point_logits = under.clone() if agree else torch.randn(1, 3, 5)
    mask = torch.tensor([[[1, 2], [3, 4]]])
    labels = torch.tensor([[1, 4, 2]])
    out = ModelOutput(logits=logits, point_logits=point_logits, gates=None)
    return out, mask, labels, pixels


def test_point_ce_ignores_unlabeled_points() -> None:
    out, mask, labels, pixels = _point_case(agree=False)
    loss = HolisticLoss(WEIGHTS, point_weights=torch.tensor([0.0, 1, 1, 1, 1]))
    labels = torch.tensor([[1, 0, 2]])
    pl = out["point_logits"]
    assert pl is not None
    expected = nn.functional.cross_entropy(pl[0, [0, 2]], torch.tensor([1, 2]))
    torch.testing.assert_close(loss(out, mask, labels, pixels)["pc"], expected)


def test_consistency_zero_on_agreement_positive_otherwise() -> None:
    loss = HolisticLoss(WEIGHTS, temperature=2.0)
    agree = loss(*_point_case(agree=True))
    assert agree["sc"].abs().item() < 1e-6
    differ = loss(*_point_case(agree=False))
    assert differ["sc"].item() > 1e-3
    assert differ["sc"].item() <= math.log(2) * 2.0**2  # JS ≤ ln 2, scaled by T²
    # only labelled points count: unlabelling the disagreeing points removes the term
    out, mask, _, pixels = _point_case(agree=False)
    assert loss(out, mask, torch.zeros(1, 3, dtype=torch.int64), pixels)["sc"].item() == 0.0
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    torch.testing.assert_close(point_pixel_consistency(a, b), point_pixel_consistency(b, a))


@pytest.mark.parametrize("detach", ["none", "point", "pixel"])
def test_consistency_gradient_and_stop_gradient(detach: str) -> None:
    torch.manual_seed(2)
    point = torch.randn(8, 5, requires_grad=True)
    pixel = torch.randn(8, 5, requires_grad=True)
    point_pixel_consistency(point, pixel, detach=detach).backward()  # type: ignore[arg-type]
    for side, grad in (("point", point.grad), ("pixel", pixel.grad)):
        if detach == side:
            assert grad is None
        else:
            assert grad is not None and grad.abs().sum() > 0
            assert grad[:, 0].abs().max() == 0  # the class-0 score takes no part
    # at agreement the gradient vanishes: it is the minimum
    same = torch.randn(4, 5, requires_grad=True)
    point_pixel_consistency(same, same.detach().clone()).backward()
    assert same.grad is not None and same.grad.abs().max() < 1e-6


def test_point_model_without_point_labels_is_an_error() -> None:
    out, mask, _, _ = _point_case(agree=True)
    with pytest.raises(ValueError, match="point_labels"):
        HolisticLoss(WEIGHTS)(out, mask)


def test_loss_weights_combine_terms() -> None:
    args = _point_case(agree=False)
    out = HolisticLoss(WEIGHTS, w_img=0.5, w_pc=2.0, w_sc=3.0)(*args)
    torch.testing.assert_close(out["total"], 0.5 * out["img"] + 2 * out["pc"] + 3 * out["sc"])


def test_holistic_loss_drops_when_overfitting_a_tiny_batch() -> None:
    """IKD-Net (narrow) memorises random block labels: the gradient reaches every term."""
    size, n_points = 16, 1024
    batch = make_dummy_batch(batch_size=1, image_size=size, num_points=n_points, levels=2)
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(1, 5, (1, 4, 4), generator=gen)  # random labels on 4×4-pixel blocks
    mask = blocks.repeat_interleave(size // 4, 1).repeat_interleave(size // 4, 2)
    mask[:, 0, :2] = 0  # some unlabeled pixels (and the points on them)
    pixels = batch["points"]["pixels"][0]
    point_labels = mask[0, pixels[0, :, 0], pixels[0, :, 1]][None]
    torch.manual_seed(0)
    model = create_model("ikdnet", in_channels=4, widths=(8, 8), point_widths=(16, 16))
    for module in model.modules():  # dropout only slows memorisation down
        if isinstance(module, nn.Dropout | nn.Dropout2d):
            module.p = 0.0
    loss = HolisticLoss(WEIGHTS)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    history = []
    for _ in range(80):
        terms = loss(model(batch), mask, point_labels, pixels)
        optimizer.zero_grad()
        terms["total"].backward()
        # without clipping the loss spikes now and then once the logits grow (CKG softmax)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(terms["total"].item())
    assert terms["sc"].item() > 0
    assert np.mean(history[-5:]) < history[0] / 10, history


# --- metrics ---------------------------------------------------------------------------------


def test_confusion_matrix_excludes_unlabeled_targets() -> None:
    cm = ConfusionMatrix()
    target = torch.tensor([[0, 1, 1], [2, 3, 0]])
    pred = torch.tensor([[4, 1, 2], [2, 0, 1]])
    cm.update(pred, target)
    cm.update(np.array([4]), np.array([4]))  # numpy works too (e.g. points)
    expected = torch.zeros(5, 5, dtype=torch.int64)
    expected[1, 1] = expected[1, 2] = expected[2, 2] = expected[3, 0] = expected[4, 4] = 1
    torch.testing.assert_close(cm.matrix, expected)
    cm.reset()
    assert cm.matrix.sum() == 0
    with pytest.raises(ValueError):
        cm.update(torch.tensor([5]), torch.tensor([1]))


def test_confusion_from_label_counts_scores_each_point_once() -> None:
    """`update_counts`: a prediction scores every point it stands for; duplicates score none."""
    pred = torch.tensor([[2, 3, 3]])
    counts = torch.tensor([[[1, 4, 0, 0, 0], [0, 0, 2, 1, 0], [0, 0, 0, 0, 0]]], dtype=torch.int32)
    cm = ConfusionMatrix()
    cm.update_counts(pred, counts)
    expected = torch.zeros(5, 5, dtype=torch.int64)
    expected[1, 2] = 4  # 4 "others" points represented by a point predicted ground
    expected[2, 3], expected[3, 3] = 2, 1
    assert torch.equal(cm.matrix, expected)  # the unlabeled count (1) is dropped
    with pytest.raises(ValueError, match="count rows"):
        cm.update_counts(pred, counts[:, :2])


def test_majority_baseline_is_a_constant_map() -> None:
    cm = torch.zeros(5, 5, dtype=torch.int64)
    cm[2, 2], cm[3, 2], cm[3, 3] = 60, 10, 30  # ground 60, tree 40
    base = majority_baseline(cm, 2)
    assert base["oa"] == pytest.approx(0.6)
    assert base["iou/ground"] == pytest.approx(0.6) and base["iou/tree"] == 0.0
    assert base["miou"] == pytest.approx(0.3) and base["kappa"] == pytest.approx(0.0)


def test_predict_labels_never_predicts_unlabeled() -> None:
    logits = torch.tensor([[9.0, 1, 2, 0, 0], [9.0, 0, 0, 0, 3]])
    torch.testing.assert_close(predict_labels(logits), torch.tensor([2, 4]))


def test_metrics_match_hand_computed_matrix() -> None:
    m = np.zeros((5, 5))
    m[1:, 1:] = [[50, 2, 3, 0], [5, 40, 0, 5], [0, 0, 30, 0], [0, 10, 0, 0]]
    m[0, 1] = 1000  # unlabeled targets in a hand-built matrix are ignored
    out = metrics(m)
    # others: TP 50, FN 5, FP 5 -> IoU 50/60, F1 100/110, Acc 50/55
    assert out["iou/others"] == pytest.approx(50 / 60)
    assert out["f1/others"] == pytest.approx(100 / 110)
    assert out["acc/others"] == pytest.approx(50 / 55)
    # building: present (10 samples), never right -> 0 everywhere
    assert out["iou/building"] == out["f1/building"] == out["acc/building"] == 0.0
    assert out["iou/tree"] == pytest.approx(30 / 33)
    ious = [50 / 60, 40 / 62, 30 / 33, 0.0]
    assert out["miou"] == pytest.approx(np.mean(ious))
    assert out["macc"] == pytest.approx(np.mean([50 / 55, 40 / 50, 1.0, 0.0]))
    n = 145
    po = 120 / n
    pe = (55 * 55 + 50 * 52 + 30 * 33 + 10 * 5) / n**2
    assert out["oa"] == pytest.approx(po)
    assert out["kappa"] == pytest.approx((po - pe) / (1 - pe))


def test_metrics_predicted_unlabeled_is_a_miss_and_absent_class_is_nan() -> None:
    cm = ConfusionMatrix()
    cm.update(torch.tensor([1, 0, 2, 2]), torch.tensor([1, 1, 2, 2]))
    out = metrics(cm)
    assert out["acc/others"] == 0.5 and out["iou/others"] == 0.5
    assert out["oa"] == 0.75
    for name in ("tree", "building"):  # neither present nor predicted
        assert math.isnan(out[f"iou/{name}"]) and math.isnan(out[f"acc/{name}"])
    assert out["miou"] == pytest.approx(0.75)  # NaN-mean over others and ground
    empty = metrics(ConfusionMatrix())
    assert all(math.isnan(v) for v in empty.values())
    perfect = ConfusionMatrix()
    perfect.update(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3, 4]))
    assert metrics(perfect)["kappa"] == 1.0 and metrics(perfect)["miou"] == 1.0


def test_metrics_agree_with_torchmetrics() -> None:
    from torchmetrics.functional.classification import (
        multiclass_cohen_kappa,
        multiclass_f1_score,
        multiclass_jaccard_index,
    )

    gen = torch.Generator().manual_seed(3)
    target = torch.randint(1, 5, (5000,), generator=gen)
    noise = torch.randint(1, 5, (5000,), generator=gen)
    pred = torch.where(torch.rand(5000, generator=gen) < 0.6, target, noise)
    cm = ConfusionMatrix()
    cm.update(pred, target)
    out = metrics(cm)
    p, t = pred - 1, target - 1
    assert out["kappa"] == pytest.approx(multiclass_cohen_kappa(p, t, 4).item(), abs=1e-6)
    assert out["miou"] == pytest.approx(multiclass_jaccard_index(p, t, 4).item(), abs=1e-6)
    f1 = multiclass_f1_score(p, t, 4, average="macro").item()
    assert out["mf1"] == pytest.approx(f1, abs=1e-6)


def test_save_confusion_writes_json_and_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cm = ConfusionMatrix()
    cm.update(torch.tensor([1, 2, 2, 3, 4, 4]), torch.tensor([1, 2, 3, 3, 4, 0]))
    scores = save_confusion(cm, tmp_path / "cm.json", tmp_path / "cm.png", CLASS_NAMES)
    payload = json.loads((tmp_path / "cm.json").read_text())
    assert payload["target_classes"] == list(CLASS_NAMES[1:])
    assert payload["matrix"] == cm.matrix[1:].tolist()
    assert payload["metrics"]["oa"] == pytest.approx(0.8) == scores["oa"]
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
