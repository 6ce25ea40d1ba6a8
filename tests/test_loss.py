"""YOLOv8Loss and TaskAlignedAssigner on hand-made cases whose outcome is known in closed form."""

import math

import pytest
import torch
import torch.nn.functional as F

from sta_lightning.models import AssignerConfig, TaskAlignedAssigner, YOLOv8Loss, complete_iou
from sta_lightning.models.box_coding import make_anchors, xyxy_to_ltrb

NUM_CLASSES = 3
IMAGE_SIZE = 64
STRIDES = (8, 16, 32)
FEATURE_SIZES = [(IMAGE_SIZE // s, IMAGE_SIZE // s) for s in STRIDES]


def _split_levels(flat: torch.Tensor) -> list[torch.Tensor]:
    """(B, N, C) per-anchor values -> the head's list of (B, C, H, W) maps."""
    maps, start = [], 0
    for height, width in FEATURE_SIZES:
        level = flat[:, start : start + height * width]
        maps.append(level.transpose(1, 2).reshape(flat.shape[0], -1, height, width).contiguous())
        start += height * width
    return maps


def _anchor_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    points, stride = make_anchors(FEATURE_SIZES, STRIDES)
    return points * stride, stride


def _targets(image_and_boxes: list[tuple[int, int, list[float]]]) -> dict[str, torch.Tensor]:
    return {
        "batch_idx": torch.tensor([i for i, _, _ in image_and_boxes], dtype=torch.long),
        "cls": torch.tensor([c for _, c, _ in image_and_boxes], dtype=torch.long),
        "bboxes": torch.tensor([b for _, _, b in image_and_boxes], dtype=torch.float32).view(-1, 4),
    }


def _random_preds(batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    num_anchors = sum(h * w for h, w in FEATURE_SIZES)
    flat = torch.randn(batch_size, num_anchors, 64 + NUM_CLASSES, generator=generator)
    flat[..., 64:] -= 3
    return [level.requires_grad_() for level in _split_levels(flat)]


def _exact_box_preds(gt_box: list[float], gt_class: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Preds whose DFL histograms decode every anchor to ``gt_box`` exactly (two neighbouring bins weighted
    to the target distance) and whose class logits are +12 on ``gt_class`` inside the box, -12 elsewhere.
    Also returns the (N, 4) target distances in bins."""
    anchors, stride = _anchor_pixels()
    target = xyxy_to_ltrb(torch.tensor(gt_box).expand(len(anchors), 4) / stride, anchors / stride, 14.99)
    lower = target.floor().long()
    upper_weight = target - lower
    dfl_logits = torch.full((len(anchors), 4, 16), -100.0)
    dfl_logits.scatter_(-1, lower.unsqueeze(-1), (1 - upper_weight).clamp(min=1e-30).log().unsqueeze(-1))
    dfl_logits.scatter_(-1, (lower + 1).unsqueeze(-1), upper_weight.clamp(min=1e-30).log().unsqueeze(-1))
    cls_logits = torch.full((len(anchors), NUM_CLASSES), -12.0)
    x1, y1, x2, y2 = gt_box
    inside = (anchors[:, 0] > x1) & (anchors[:, 0] < x2) & (anchors[:, 1] > y1) & (anchors[:, 1] < y2)
    cls_logits[inside, gt_class] = 12.0
    flat = torch.cat((dfl_logits.flatten(1), cls_logits), 1).unsqueeze(0)
    return _split_levels(flat), target


def test_exact_prediction_has_near_zero_box_loss_and_minimal_dfl():
    # 8 anchor centres inside (6 at stride 8, 1 at 16, 1 at 32), so all of them are assigned.
    gt_box = [10.0, 12.0, 30.0, 30.0]
    preds, target = _exact_box_preds(gt_box, gt_class=1)
    _, items = YOLOv8Loss(NUM_CLASSES)(preds, _targets([(0, 1, gt_box)]))
    box, cls, dfl = items.tolist()
    assert box < 1e-5
    assert cls < 1e-3
    # The predicted histogram equals the DFL target mix, so the DFL is its entropy, averaged over the
    # foreground anchors (equally aligned, weight ~1).
    anchors, _ = _anchor_pixels()
    x1, y1, x2, y2 = gt_box
    inside = (anchors[:, 0] > x1) & (anchors[:, 0] < x2) & (anchors[:, 1] > y1) & (anchors[:, 1] < y2)
    assert inside.sum() == 8
    upper = target[inside] - target[inside].floor()
    entropy = -(upper * upper.clamp(min=1e-30).log() + (1 - upper) * (1 - upper).clamp(min=1e-30).log())
    assert dfl == pytest.approx(1.5 * entropy.mean().item(), rel=1e-4)

    shifted_box = [gt_box[0] + 8, gt_box[1], gt_box[2] + 8, gt_box[3]]
    _, shifted_items = YOLOv8Loss(NUM_CLASSES)(preds, _targets([(0, 1, shifted_box)]))
    assert shifted_items[0] > 0.5 and shifted_items[2] > dfl


def test_no_targets_leaves_only_the_classification_term():
    preds = _random_preds(batch_size=2)
    empty = _targets([])
    total, items = YOLOv8Loss(NUM_CLASSES)(preds, empty)
    assert items[0] == 0 and items[2] == 0
    class_logits = torch.cat([p[:, 64:].flatten(2) for p in preds], 2)
    # BCE against all-zero targets is softplus(logit); target score sum is clamped to 1.
    expected_cls = 0.5 * F.softplus(class_logits).sum()
    torch.testing.assert_close(items[1], expected_cls.detach())
    torch.testing.assert_close(total, expected_cls * 2)
    total.backward()
    assert preds[0].grad[:, 64:].abs().min() > 0
    assert preds[0].grad[:, :64].abs().max() == 0


def test_empty_image_in_batch_only_adds_its_background_and_order_does_not_matter():
    preds_pair = _random_preds(batch_size=2, seed=3)
    boxes = [(1, [4.0, 6.0, 30.0, 40.0]), (2, [20.0, 20.0, 60.0, 50.0]), (0, [33.0, 2.0, 45.0, 20.0])]
    loss = YOLOv8Loss(NUM_CLASSES)
    _, items = loss(preds_pair, _targets([(0, c, b) for c, b in boxes]))
    _, items_alone = loss([p[:1] for p in preds_pair], _targets([(0, c, b) for c, b in boxes]))
    torch.testing.assert_close(items[[0, 2]], items_alone[[0, 2]])
    assert items[1] > items_alone[1]

    swapped = [torch.flip(p, dims=[0]) for p in preds_pair]
    _, items_swapped = loss(swapped, _targets([(1, c, b) for c, b in boxes]))
    torch.testing.assert_close(items_swapped, items)


def test_gradient_reaches_dfl_logits_of_foreground_anchors_only():
    preds = _random_preds(batch_size=2, seed=1)
    targets = _targets([(0, 0, [5.0, 5.0, 40.0, 30.0]), (1, 2, [10.0, 20.0, 60.0, 62.0])])
    loss = YOLOv8Loss(NUM_CLASSES)
    total, items = loss(preds, targets)
    assert total.requires_grad and not items.requires_grad
    torch.testing.assert_close(total.detach(), items.sum() * 2)
    total.backward()
    dfl_grad = torch.cat([p.grad[:, :64].flatten(2) for p in preds], 2)  # (B, 64, N)
    has_dfl_grad = dfl_grad.abs().amax(1) > 0  # (B, N)
    assert 0 < has_dfl_grad.sum() <= 2 * 10  # at most topk foreground anchors per GT
    assert all(torch.isfinite(p.grad).all() for p in preds)
    assert all(p.grad[:, 64:].abs().min() > 0 for p in preds)


def _assign(scores, pred_boxes, gt_labels, gt_boxes, **kwargs):
    anchors, _ = _anchor_pixels()
    gt_mask = torch.ones(gt_labels.shape, dtype=torch.bool)
    assigner = TaskAlignedAssigner(NUM_CLASSES, **kwargs)
    return assigner(scores, pred_boxes, anchors, gt_labels, gt_boxes, gt_mask)


def test_assigner_takes_topk_anchors_inside_each_gt_by_alignment():
    anchors, _ = _anchor_pixels()
    gt_boxes = torch.tensor([[[2.0, 2.0, 30.0, 62.0], [34.0, 2.0, 62.0, 62.0]]])
    gt_labels = torch.tensor([[0, 2]])
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(1, len(anchors), NUM_CLASSES, generator=generator)
    # Every anchor predicts a box equal to the GT it lies in, so the alignment ranks by class score alone.
    in_right = anchors[:, 0] > 32
    pred_boxes = torch.where(in_right.unsqueeze(-1), gt_boxes[0, 1], gt_boxes[0, 0]).unsqueeze(0)
    assignment = _assign(scores, pred_boxes, gt_labels, gt_boxes)

    for slot in range(2):
        x1, y1, x2, y2 = gt_boxes[0, slot]
        inside = (anchors[:, 0] > x1) & (anchors[:, 0] < x2) & (anchors[:, 1] > y1) & (anchors[:, 1] < y2)
        assigned = assignment.foreground[0] & (assignment.boxes[0] == gt_boxes[0, slot]).all(-1)
        assert assigned.sum() == 10 < inside.sum()
        assert not (assigned & ~inside).any()
        class_score = scores[0, :, gt_labels[0, slot]]
        expected = class_score.masked_fill(~inside, -1).topk(10).indices
        assert set(assigned.nonzero().view(-1).tolist()) == set(expected.tolist())
        # Normalised targets: the best anchor gets the GT's best CIoU (1 here), others (s / s_max) ** alpha.
        target = assignment.scores[0, assigned, gt_labels[0, slot]]
        best = class_score[assigned].max()
        torch.testing.assert_close(target, (class_score[assigned] / best) ** 0.5, rtol=1e-5, atol=1e-6)
        other_classes = [c for c in range(NUM_CLASSES) if c != gt_labels[0, slot]]
        assert assignment.scores[0, assigned][:, other_classes].abs().max() == 0
    assert assignment.foreground.sum() == 20
    assert assignment.scores[0, ~assignment.foreground[0]].abs().max() == 0


def test_target_scores_are_scaled_to_the_best_overlap_of_the_gt():
    anchors, _ = _anchor_pixels()
    gt_boxes = torch.tensor([[[8.0, 8.0, 56.0, 56.0]]])
    gt_labels = torch.tensor([[1]])
    scores = torch.full((1, len(anchors), NUM_CLASSES), 0.3)
    scores[0, :, 1] = torch.linspace(0.1, 0.9, len(anchors))
    pred_boxes = torch.tensor([4.0, 10.0, 50.0, 60.0]).expand(1, len(anchors), 4)
    overlap = complete_iou(pred_boxes[0, 0], gt_boxes[0, 0])
    assert 0.3 < overlap < 0.95
    assignment = _assign(scores, pred_boxes, gt_labels, gt_boxes)
    fg = assignment.foreground[0]
    assert fg.sum() == 10
    s = scores[0, fg, 1]
    expected = (s / s.max()) ** 0.5 * overlap
    torch.testing.assert_close(assignment.scores[0, fg, 1], expected, rtol=1e-5, atol=1e-6)


def test_anchor_claimed_by_two_gts_keeps_the_one_it_overlaps_most():
    anchors, _ = _anchor_pixels()
    gt_boxes = torch.tensor([[[4.0, 4.0, 44.0, 44.0], [20.0, 20.0, 60.0, 60.0]]])
    gt_labels = torch.tensor([[0, 1]])
    scores = torch.full((1, len(anchors), NUM_CLASSES), 0.5)
    # Anchors in the overlap region predict a box close to GT 1.
    pred_boxes = torch.tensor([21.0, 21.0, 59.0, 59.0]).expand(1, len(anchors), 4).clone()
    pred_boxes[0, anchors[:, 0] < 20] = torch.tensor([5.0, 5.0, 43.0, 43.0])
    assignment = _assign(scores, pred_boxes, gt_labels, gt_boxes, topk=40)
    fg = assignment.foreground[0]
    in_both = (anchors > 20).all(-1) & (anchors < 44).all(-1)
    assert (fg & in_both).sum() > 0
    assert (assignment.boxes[0, fg & in_both] == gt_boxes[0, 1]).all()
    assert assignment.scores[0, fg & in_both, 0].abs().max() == 0


@pytest.mark.parametrize(("min_box_side", "expected_foreground"), [(None, 0), (16, 4)])
def test_min_box_side_gives_a_tiny_box_anchors(min_box_side, expected_foreground):
    # A 6x6 px box centred on (32, 32): no anchor centre lies inside it; enlarged to 16x16 it holds the four
    # stride-8 centres (28|36, 28|36), while the stride-16 centres 24 and 40 sit on its border.
    anchors, _ = _anchor_pixels()
    gt_boxes = torch.tensor([[[29.0, 29.0, 35.0, 35.0]]])
    scores = torch.full((1, len(anchors), NUM_CLASSES), 0.5)
    pred_boxes = gt_boxes.expand(1, len(anchors), 4)
    assignment = _assign(scores, pred_boxes, torch.tensor([[0]]), gt_boxes, min_box_side=min_box_side)
    assert assignment.foreground.sum() == expected_foreground
    assert math.isclose(float(assignment.scores.sum()), expected_foreground, rel_tol=1e-5)
    if expected_foreground:
        assert (anchors[assignment.foreground[0]] - 32).abs().eq(4).all()

    preds = _random_preds(batch_size=1)
    _, items = YOLOv8Loss(NUM_CLASSES, assigner=AssignerConfig(min_box_side=min_box_side))(
        preds, _targets([(0, 0, [29, 29, 35, 35])])
    )
    assert (items[0] > 0) == bool(expected_foreground)


@pytest.mark.parametrize(
    ("image", "cls", "message"),
    [(0, NUM_CLASSES, r"targets\['cls'\] must lie in \[0, 3\)"), (2, 0, r"targets\['batch_idx'\] must lie")],
)
def test_bad_targets_raise_a_clear_error(image, cls, message):
    with pytest.raises(ValueError, match=message):
        YOLOv8Loss(NUM_CLASSES)(_random_preds(batch_size=2), _targets([(image, cls, [1.0, 2.0, 30.0, 40.0])]))
