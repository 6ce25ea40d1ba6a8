"""YOLOv8 detector: sizes and parameter counts of every scale, the head's decode, STA placement by config."""

import math

import pytest
import torch
from torch import nn

from sta_lightning.models import DEFAULT_STA, STAPlacement, YOLOv8, load_reference_state_dict
from sta_lightning.models.box_coding import make_anchors

# Reference parameter counts (Ultralytics yolov8{n,s,m,l,x}.yaml, 80 classes).
REFERENCE_PARAMS = {"n": 3_157_200, "s": 11_166_560, "m": 25_902_640, "l": 43_691_520, "x": 68_229_648}


@pytest.fixture(scope="module")
def plain_n() -> YOLOv8:
    torch.manual_seed(0)
    return YOLOv8("n").eval()


@pytest.mark.parametrize("scale", list(REFERENCE_PARAMS))
def test_parameter_count_matches_reference(scale):
    with torch.device("meta"):
        model = YOLOv8(scale)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[scale]
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["head.dfl.bins"]


def test_reference_initialisation(plain_n):
    norms = [m for m in plain_n.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 and m.momentum == 0.03 for m in norms)
    class_biases = [branch[-1].bias for branch in plain_n.head.class_branches]
    expected = [math.log(5 / 80 / (640 / s) ** 2) for s in (8, 16, 32)]
    for bias, value in zip(class_biases, expected, strict=True):
        torch.testing.assert_close(bias, torch.full_like(bias, value))
    for branch in plain_n.head.box_branches:
        assert torch.equal(branch[-1].bias, torch.ones(64))
    torch.testing.assert_close(plain_n.head.dfl.bins, torch.arange(16.0))


def test_hand_set_head_output_decodes_to_the_expected_box(plain_n):
    # A 64x96 input gives levels 8x12, 4x6, 2x3; put a peaked DFL histogram on the P4 anchor at (x=2, y=1).
    maps = [torch.full((1, 64 + 80, h, w), -30.0) for h, w in ((8, 12), (4, 6), (2, 3))]
    for side, bin_index in enumerate((2, 3, 4, 5)):  # l, t, r, b in grid units
        maps[1][0, side * 16 + bin_index, 1, 2] = 30.0
    maps[1][0, 64 + 7, 1, 2] = 0.0  # class 7 logit 0 -> probability 0.5
    decoded = plain_n.head.decode(maps)
    assert decoded.shape == (1, 84, 8 * 12 + 4 * 6 + 2 * 3)
    index = 8 * 12 + 1 * 6 + 2  # P3 first, then row-major within P4
    # anchor (2.5, 1.5) at stride 16: x1 = 0.5*16, y1 = -1.5*16, x2 = 6.5*16, y2 = 6.5*16
    torch.testing.assert_close(decoded[0, :4, index], torch.tensor([56.0, 40.0, 96.0, 128.0]))
    assert decoded[0, 4 + 7, index].item() == pytest.approx(0.5)
    assert decoded[0, 4:, index].sum().item() == pytest.approx(0.5, abs=1e-6)


def test_decoded_anchor_order_is_p3_p4_p5_row_major():
    torch.manual_seed(0)
    model = YOLOv8("n", num_classes=3).eval()
    with torch.no_grad():
        for branch in model.head.box_branches:  # uniform DFL histograms -> every side 7.5 grid units
            branch[-1].weight.zero_()
            branch[-1].bias.zero_()
        decoded, maps = model(torch.rand(1, 3, 96, 64))
    assert [tuple(m.shape[-2:]) for m in maps] == [(12, 8), (6, 4), (3, 2)]
    points, strides = make_anchors([(12, 8), (6, 4), (3, 2)], (8, 16, 32))
    torch.testing.assert_close(decoded[0, :2].T, points * strides)
    torch.testing.assert_close(decoded[0, 2:4].T, (15 * strides).expand(-1, 2))


def test_train_and_eval_outputs_agree_for_the_same_normalisation(plain_n):
    images = torch.rand(2, 3, 64, 128)
    model = YOLOv8("n", num_classes=5)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()  # same running statistics in both passes
    with torch.no_grad():
        train_maps = model(images)
        model.eval()
        decoded, eval_maps = model(images)
    assert isinstance(train_maps, list) and len(train_maps) == 3
    assert [tuple(m.shape) for m in train_maps] == [(2, 69, 8, 16), (2, 69, 4, 8), (2, 69, 2, 4)]
    for train_map, eval_map in zip(train_maps, eval_maps, strict=True):
        torch.testing.assert_close(train_map, eval_map)
    torch.testing.assert_close(decoded, model.head.decode(train_maps))
    assert decoded.shape == (2, 4 + 5, 128 + 32 + 8)
    assert 0 <= decoded[:, 4:].min() and decoded[:, 4:].max() <= 1


@pytest.mark.parametrize("size", [(32, 32), (64, 160), (160, 64)])
def test_any_multiple_of_32_works(plain_n, size):
    with torch.no_grad():
        decoded, maps = plain_n(torch.rand(1, 3, *size))
    assert [tuple(m.shape[-2:]) for m in maps] == [(size[0] // s, size[1] // s) for s in (8, 16, 32)]
    assert decoded.shape[-1] == sum(size[0] * size[1] // s**2 for s in (8, 16, 32))


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (
            torch.rand(1, 3, 64, 48),
            ValueError,
            "YOLOv8: the input size must be a positive multiple of 32, got 64x48",
        ),
        (torch.rand(1, 3, 100, 96), ValueError, "100x96"),
        (torch.rand(1, 1, 64, 64), ValueError, r"\(B, 3, H, W\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "float images"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(plain_n, images, error, match):
    with pytest.raises(error, match=match):
        plain_n(images)


@pytest.mark.parametrize(
    ("placements", "size"),
    [
        (DEFAULT_STA, (64, 64)),
        (DEFAULT_STA, (96, 160)),
        (
            [
                STAPlacement(layer=15, stoken_size=(4, 4), depth=2, layer_scale=1e-2, drop_path=0.1),
                STAPlacement(layer=18, stoken_size=2, num_heads=4, mlp_ratio=2.0, n_iter=2),
                STAPlacement(layer=1, stoken_size=(8, 4)),
            ],
            (64, 96),
        ),
    ],
)
def test_sta_variants_forward_and_backward(placements, size):
    torch.manual_seed(0)
    model = YOLOv8("n", num_classes=4, sta=placements).train()
    images = torch.rand(2, 3, *size)
    maps = model(images)
    assert [tuple(m.shape) for m in maps] == [(2, 68, size[0] // s, size[1] // s) for s in (8, 16, 32)]
    sum(m.square().mean() for m in maps).backward()
    assert model.layers[0].conv.weight.grad.abs().sum() > 0
    sta_grads = [p.grad for p in model.sta.parameters() if p.requires_grad]
    assert sta_grads and all(g is not None and torch.isfinite(g).all() for g in sta_grads)
    model.eval()
    with torch.no_grad():
        decoded, _ = model(images)
    assert torch.isfinite(decoded).all()


def test_sta_refines_the_layer_output_in_place():
    """The refined map is what both the next layer and the skip concatenations see."""
    model = YOLOv8("n", sta=[STAPlacement(layer=4, stoken_size=(4, 4))]).eval()
    seen = {}
    model.layers[5].register_forward_pre_hook(lambda m, args: seen.__setitem__("next", args[0]))
    model.layers[14].register_forward_pre_hook(lambda m, args: seen.__setitem__("skip", args[0][1]))
    model.sta["layer4"].register_forward_hook(lambda m, args, out: None)
    refined = {}
    model.sta["layer4"][0].register_forward_hook(lambda m, args, out: refined.__setitem__("out", out))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    assert seen["next"] is refined["out"] and seen["skip"] is refined["out"]


def test_capture_associations_returns_one_entry_per_super_token_block():
    p3 = STAPlacement(layer=4, stoken_size=(8, 8))
    model = YOLOv8("n", sta=[p3, *DEFAULT_STA, STAPlacement(layer=18, stoken_size=(2, 2), depth=2)]).eval()
    images = torch.rand(2, 3, 96, 160)  # P3 12x20, P4 6x10, P5 3x5
    with torch.no_grad(), model.capture_associations() as maps:
        model(images)
    # the global-attention block after layer 8 has no association
    assert sorted(maps) == ["sta.layer18.0", "sta.layer18.1", "sta.layer4.0", "sta.layer6.0"]
    expected = {  # (map size, grid, stoken size); the grid covers the map with zero padding
        "sta.layer4.0": ((12, 20), (2, 3), (8, 8)),
        "sta.layer6.0": ((6, 10), (2, 3), (4, 4)),
        "sta.layer18.0": ((6, 10), (3, 5), (2, 2)),
    }
    for name, (map_size, grid, stoken_size) in expected.items():
        association = maps[name]
        assert association.weights.shape == (2, 9, *map_size)
        assert tuple(association.grid) == grid and tuple(association.stoken_size) == stoken_size
        assert not association.weights.requires_grad
    with torch.no_grad():
        model(images)  # outside the context: nothing captured, the old dict untouched
    assert model._associations is None and len(maps) == 4


def test_capture_associations_is_empty_without_sta(plain_n):
    with torch.no_grad(), plain_n.capture_associations() as maps:
        plain_n(torch.rand(1, 3, 64, 64))
    assert maps == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": 22}, "layer must be a reference layer index 0-21"),
        ({"layer": -1}, "layer must be"),
        ({"layer": 4, "stoken_size": (0, 8)}, "stoken_size"),
        ({"layer": 4, "n_iter": 0}, "n_iter"),
        ({"layer": 4, "depth": 0}, "depth"),
        ({"layer": 4, "drop_path": 1.0}, "drop_path"),
        ({"layer": 4, "num_heads": 0}, "num_heads"),
    ],
)
def test_bad_placement_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        STAPlacement(**kwargs)


def test_placement_checks_against_the_scale():
    with pytest.raises(ValueError, match="num_heads=3 does not divide the 64 channels"):
        YOLOv8("n", sta=[STAPlacement(layer=4, num_heads=3)])
    with pytest.raises(ValueError, match="two STA placements after layer 6"):
        YOLOv8("n", sta=[STAPlacement(layer=6), STAPlacement(layer=6, stoken_size=(2, 2))])
    # default heads: channels // 32, or the largest divisor below it (x: layer 0 has 80 channels)
    assert STAPlacement(layer=4).heads_for(64) == 2
    assert STAPlacement(layer=0).heads_for(80) == 2
    assert STAPlacement(layer=0).heads_for(24) == 1
    assert STAPlacement(layer=0).heads_for(576) == 18


def test_sta_parameters_come_after_the_detector_and_reference_weights_still_load():
    torch.manual_seed(0)
    plain = YOLOv8("n", num_classes=3)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p))  # distinct values, so a misplaced tensor would show
    with_sta = YOLOv8("n", num_classes=3, sta=DEFAULT_STA)
    plain_keys, sta_keys = list(plain.state_dict()), list(with_sta.state_dict())
    assert sta_keys[: len(plain_keys)] == plain_keys
    assert all(key.startswith("sta.") for key in sta_keys[len(plain_keys) :])
    sta_before = {k: v.clone() for k, v in with_sta.state_dict().items() if k.startswith("sta.")}
    renamed = {f"model.{i}": v for i, v in enumerate(plain.state_dict().values())}  # keys are not used
    load_reference_state_dict(with_sta, renamed)
    state = with_sta.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value), key
    for key, value in sta_before.items():
        assert torch.equal(state[key], value), key


def test_reference_conversion_refuses_a_wrong_scale_or_class_count():
    state = YOLOv8("n").state_dict()
    with pytest.raises(ValueError, match="355 tensors, the YOLOv8-m detector has 475"):
        load_reference_state_dict(YOLOv8("m"), state)
    with pytest.raises(ValueError, match=r"tensor #\d+ 'head.class_branches.0.0.conv.weight'.*check scale"):
        load_reference_state_dict(YOLOv8("n", num_classes=3), state)


def test_sta_placements_build_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(YOLOv8, "model")
    config = parser.parse_string(
        "model:\n  scale: n\n  num_classes: 3\n  sta:\n"
        "    - {layer: 6, stoken_size: [4, 4], mlp_ratio: 2.0}\n"
        "    - {layer: 8, stoken_size: [1, 1], mlp_ratio: 2.0}\n"
    )
    model = parser.instantiate_classes(config).model
    assert model.sta_placements == DEFAULT_STA
    assert list(model.sta) == ["layer6", "layer8"]
