"""non_max_suppression against a plain greedy per-class NMS written here from first principles."""

import torch

from sta_lightning.models import non_max_suppression


def _iou(a: list[float], b: list[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _greedy_nms(candidates: list[tuple[list[float], float, int]], iou_threshold: float, max_det: int):
    """candidates (xyxy box, score, class) -> kept ones, best first: per class, highest score first, drop
    every later box of the same class overlapping a kept one by more than the threshold."""
    kept = []
    for box, score, cls in sorted(candidates, key=lambda c: -c[1]):
        if all(k_cls != cls or _iou(box, k_box) <= iou_threshold for k_box, _, k_cls in kept):
            kept.append((box, score, cls))
    return kept[:max_det]


def _reference(decoded, conf, iou, max_det, multi_label, max_candidates=30000):
    results = []
    for image in decoded.transpose(1, 2).tolist():  # (N, 4 + C) rows
        candidates = []
        for cx, cy, w, h, *probs in image:
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            if multi_label:
                candidates += [(box, p, c) for c, p in enumerate(probs) if p > conf]
            elif max(probs) > conf:
                candidates.append((box, max(probs), probs.index(max(probs))))
        candidates = sorted(candidates, key=lambda c: -c[1])[:max_candidates]
        results.append(_greedy_nms(candidates, iou, max_det))
    return results


def _clustered_decoded(batch_size=2, num_boxes=150, num_classes=3, seed=0):
    """(B, 4 + C, N): boxes jittered around a few centres so that many overlap, random class probabilities."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch_size, 1, 6, 2, generator=g) * 500 + 50
    pick = torch.randint(6, (batch_size, num_boxes), generator=g)
    cxcy = (
        centres[:, 0].gather(1, pick.unsqueeze(-1).expand(-1, -1, 2))
        + torch.randn(batch_size, num_boxes, 2, generator=g) * 8
    )
    wh = 40 + torch.rand(batch_size, num_boxes, 2, generator=g) * 40
    probs = torch.rand(batch_size, num_boxes, num_classes, generator=g) ** 3
    return torch.cat((cxcy, wh, probs), -1).transpose(1, 2).contiguous()


def _assert_matches(ours, reference):
    assert len(ours) == len(reference)
    for got, expected in zip(ours, reference, strict=True):
        assert got.shape == (len(expected), 6)
        if expected:
            expected_tensor = torch.tensor([[*box, score, cls] for box, score, cls in expected])
            torch.testing.assert_close(got, expected_tensor, rtol=1e-5, atol=1e-4)


def test_multi_label_matches_greedy_per_class_nms():
    decoded = _clustered_decoded()
    ours = non_max_suppression(decoded, conf_threshold=0.05, iou_threshold=0.5, max_det=300)
    reference = _reference(decoded, 0.05, 0.5, 300, multi_label=True)
    assert all(len(r) > 10 for r in reference)
    _assert_matches(ours, reference)
    for detections in ours:
        assert (detections[:, 4] > 0.05).all()
        assert (detections[:-1, 4] >= detections[1:, 4]).all()


def test_single_label_keeps_best_class_per_box_and_matches_reference():
    decoded = _clustered_decoded(seed=1)
    ours = non_max_suppression(decoded, conf_threshold=0.25, iou_threshold=0.6, multi_label=False)
    _assert_matches(ours, _reference(decoded, 0.25, 0.6, 300, multi_label=False))


def test_multi_label_reports_a_box_once_per_class_above_threshold():
    decoded = torch.tensor([[100.0, 100.0, 50.0, 50.0, 0.8, 0.6, 0.0001]]).T.unsqueeze(0)  # (1, 7, 1)
    multi = non_max_suppression(decoded, conf_threshold=0.001)[0]
    single = non_max_suppression(decoded, conf_threshold=0.001, multi_label=False)[0]
    expected_box = torch.tensor([75.0, 75.0, 125.0, 125.0])
    assert multi[:, 5].tolist() == [0.0, 1.0]
    torch.testing.assert_close(multi[:, 4], torch.tensor([0.8, 0.6]))
    assert single.shape == (1, 6) and single[0, 5] == 0
    torch.testing.assert_close(single[0, :4], expected_box)
    assert non_max_suppression(decoded, conf_threshold=0.9)[0].shape == (0, 6)


def test_max_det_keeps_the_best_and_max_candidates_limits_nms_input():
    decoded = _clustered_decoded(batch_size=1, num_boxes=400, seed=2)
    full = non_max_suppression(decoded, conf_threshold=0.01, iou_threshold=0.9)[0]
    assert len(full) > 20
    limited = non_max_suppression(decoded, conf_threshold=0.01, iou_threshold=0.9, max_det=20)[0]
    torch.testing.assert_close(limited, full[:20])
    few = non_max_suppression(decoded, conf_threshold=0.01, iou_threshold=0.5, max_candidates=50)
    _assert_matches(few, _reference(decoded, 0.01, 0.5, 300, multi_label=True, max_candidates=50))


def test_empty_inputs_give_empty_detections():
    no_anchors = torch.zeros(2, 4 + 3, 0)
    assert [d.shape for d in non_max_suppression(no_anchors)] == [(0, 6), (0, 6)]
    nothing_confident = _clustered_decoded()
    nothing_confident[:, 4:] = 0.0005
    for multi_label in (True, False):
        detections = non_max_suppression(nothing_confident, multi_label=multi_label)
        assert [d.shape for d in detections] == [(0, 6), (0, 6)]
