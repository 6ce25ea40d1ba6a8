"""YOLOv8Loss against the reference criterion (Ultralytics 8.2, the classic YOLOv8) on the same tensors.

Skips without ultralytics (it is no project dependency); run locally with PYTHONPATH=/tmp/ultra_ref.
"""

from types import SimpleNamespace

import pytest
import torch

from sta_lightning.models import YOLOv8Loss

NUM_CLASSES = 5
IMAGE_SIZE = 256


def _random_case(generator: torch.Generator):
    """Preds for a batch of 3 at 256 px and targets with 4, 0 and 9 GTs of sizes from 3 px to 200 px."""
    preds = []
    for stride in (8, 16, 32):
        size = IMAGE_SIZE // stride
        logits = torch.randn(3, 64 + NUM_CLASSES, size, size, generator=generator) * 2
        logits[:, 64:] -= 4  # class probabilities mostly low, as after the reference bias init
        preds.append(logits.requires_grad_())
    counts = (4, 0, 9)
    batch_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    sizes = torch.tensor([3.0, 6.0, 14.0, 30.0, 60.0, 120.0, 200.0])
    wh = sizes[torch.randint(len(sizes), (len(batch_idx), 2), generator=generator)]
    wh = wh * (0.8 + 0.4 * torch.rand(len(batch_idx), 2, generator=generator))
    centre = wh / 2 + torch.rand(len(batch_idx), 2, generator=generator) * (IMAGE_SIZE - wh)
    bboxes = torch.cat((centre - wh / 2, centre + wh / 2), 1)
    cls = torch.randint(NUM_CLASSES, (len(batch_idx),), generator=generator)
    return preds, {"batch_idx": batch_idx, "cls": cls, "bboxes": bboxes}


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_reference_v8_detection_loss(seed):
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.loss import v8DetectionLoss

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=NUM_CLASSES, verbose=False)
    model.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    reference = v8DetectionLoss(model)

    preds, targets = _random_case(torch.Generator().manual_seed(seed))
    total, items = YOLOv8Loss(NUM_CLASSES)(preds, targets)
    (ours_grad,) = torch.autograd.grad(total, preds[0])

    boxes = targets["bboxes"] / IMAGE_SIZE
    normalised_xywh = torch.cat(((boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]), 1)
    reference_batch = {
        "batch_idx": targets["batch_idx"].float(),
        "cls": targets["cls"].float().view(-1, 1),
        "bboxes": normalised_xywh,
    }
    ref_total, ref_items = reference(preds, reference_batch)
    (ref_grad,) = torch.autograd.grad(ref_total, preds[0])

    assert items.shape == (3,)
    assert (items > 0).all()
    torch.testing.assert_close(items, ref_items, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-4, atol=1e-7)
