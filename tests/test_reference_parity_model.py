"""YOLOv8 against the reference implementation on the same weights (skips without ultralytics).

The stock initialisation shrinks activations to ~1e-8 by layer 9 (the head output is then just its biases), so
the reference's conv weights, biases and BN statistics are re-drawn before the weights are copied over.
"""

import pytest
import torch
from torch import nn

from sta_lightning.models import DEFAULT_STA, YOLOv8, load_reference_state_dict

tasks = pytest.importorskip("ultralytics.nn.tasks")


def _randomised_reference(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    reference = tasks.DetectionModel("yolov8n.yaml", nc=num_classes, verbose=False)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.Conv2d) and module.weight.requires_grad:  # not the fixed DFL conv
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 1.0)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return reference


@pytest.mark.parametrize(("num_classes", "size"), [(80, (256, 256)), (3, (192, 320))])
def test_outputs_match_the_reference_on_converted_weights(num_classes, size):
    reference = _randomised_reference(num_classes)
    ours = YOLOv8("n", num_classes=num_classes)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in reference.parameters()][:-1] + [(16,)]
    load_reference_state_dict(ours, reference.state_dict())
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))

    reference.eval()
    ours.eval()
    with torch.no_grad():
        expected_decoded, expected_maps = reference(images)
        decoded, maps = ours(images)
    assert 1e-2 < decoded[:, 4:].std() and decoded[:, :4].std() > 10  # not a degenerate comparison
    # boxes are a few hundred pixels, where one float32 ulp is ~3e-5: compare them to 1e-4 px
    torch.testing.assert_close(decoded[:, :4], expected_decoded[:, :4], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(decoded[:, 4:], expected_decoded[:, 4:], rtol=1e-5, atol=1e-6)
    for ours_map, reference_map in zip(maps, expected_maps, strict=True):
        torch.testing.assert_close(ours_map, reference_map, rtol=1e-5, atol=1e-5)

    reference.train()
    ours.train()
    expected_maps = reference(images)
    maps = ours(images)
    for ours_map, reference_map in zip(maps, expected_maps, strict=True):
        torch.testing.assert_close(ours_map, reference_map, rtol=1e-5, atol=1e-5)
    # batch statistics were updated identically
    for ours_norm, reference_norm in zip(
        (m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)),
        (m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)),
        strict=True,
    ):
        torch.testing.assert_close(ours_norm.running_mean, reference_norm.running_mean)


def test_reference_weights_convert_into_an_sta_model():
    reference = _randomised_reference(80)
    with_sta = YOLOv8("n", sta=DEFAULT_STA)
    load_reference_state_dict(with_sta, reference.state_dict())
    reference_tensors = list(reference.state_dict().values())
    ours_tensors = list(with_sta.state_dict().values())[: len(reference_tensors)]
    for ours_tensor, reference_tensor in zip(ours_tensors, reference_tensors, strict=True):
        assert torch.equal(ours_tensor, reference_tensor.reshape(ours_tensor.shape))
