"""sta_lightning.callbacks.drawing: association and box rendering, on real StokenAttention output."""

import numpy as np
import pytest
import torch
from matplotlib import colormaps

from sta_lightning.callbacks.drawing import (
    association_panel,
    blend_heatmap,
    draw_detections,
    hard_assignment,
    label_boundaries,
    resize_heatmap,
    resize_labels,
    spread_tokens,
    token_weight_map,
)
from sta_lightning.nn import StokenAttention


@pytest.fixture(scope="module")
def association():
    """A real association: 13x19 map (padded to a 4x5 grid of 4x4 cells), one image, weights (9, 13, 19)."""
    torch.manual_seed(0)
    attention = StokenAttention(16, stoken_size=(4, 4), num_heads=2).eval()
    with torch.no_grad():
        _, assoc = attention(torch.randn(1, 16, 13, 19), return_association=True)
    return assoc.weights[0].numpy(), assoc.grid, assoc.stoken_size


def _slot_for(y, x, token_row, token_col, stoken_size):
    """Slot index of token (row, col) for pixel (y, x), or None outside its 3x3 neighbourhood."""
    dy, dx = token_row - y // stoken_size[0] + 1, token_col - x // stoken_size[1] + 1
    return dy * 3 + dx if 0 <= dy < 3 and 0 <= dx < 3 else None


def test_token_heatmap_equals_association_weights(association):
    weights, grid, stoken_size = association
    assert grid == (4, 5)
    for token in range(grid[0] * grid[1]):
        row, col = divmod(token, grid[1])
        heatmap = token_weight_map(weights, grid, stoken_size, token)
        for y in range(weights.shape[1]):
            for x in range(weights.shape[2]):
                slot = _slot_for(y, x, row, col, stoken_size)
                assert heatmap[y, x] == (0.0 if slot is None else weights[slot, y, x])
    # every pixel's weights over all tokens add up to its in-grid mass (no weight lost or double counted)
    total = sum(token_weight_map(weights, grid, stoken_size, t) for t in range(grid[0] * grid[1]))
    np.testing.assert_allclose(total, weights.sum(0), rtol=1e-6)


def test_hard_assignment_is_argmax_token(association):
    weights, grid, stoken_size = association
    labels = hard_assignment(weights, grid, stoken_size)
    for y in range(weights.shape[1]):
        for x in range(weights.shape[2]):
            slot = int(weights[:, y, x].argmax())
            row = y // stoken_size[0] + slot // 3 - 1
            col = x // stoken_size[1] + slot % 3 - 1
            assert 0 <= row < grid[0] and 0 <= col < grid[1]
            assert labels[y, x] == row * grid[1] + col


def test_boundaries_exactly_where_assignment_changes():
    # Hand-made association on a 4x6 map, 2x2 cells (grid 2x3): each pixel takes the token of its own cell
    # except pixel (1, 1), which takes its right neighbour's token, and pixel (2, 4), the token above.
    grid, stoken_size = (2, 3), (2, 2)
    weights = np.full((9, 4, 6), 0.01, dtype=np.float32)
    weights[4] = 0.9
    weights[:, 1, 1] = 0.01
    weights[5, 1, 1] = 0.9
    weights[:, 2, 4] = 0.01
    weights[1, 2, 4] = 0.9
    labels = hard_assignment(weights, grid, stoken_size)
    expected = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 2], [3, 3, 4, 4, 2, 5], [3, 3, 4, 4, 5, 5]])
    np.testing.assert_array_equal(labels, expected)

    upsampled = resize_labels(labels, (32, 48))  # stride 8
    np.testing.assert_array_equal(upsampled, np.kron(expected, np.ones((8, 8), dtype=np.int64)))
    boundaries = label_boundaries(upsampled)
    for y in range(32):
        for x in range(48):
            changes = (x + 1 < 48 and upsampled[y, x] != upsampled[y, x + 1]) or (
                y + 1 < 32 and upsampled[y, x] != upsampled[y + 1, x]
            )
            assert boundaries[y, x] == changes
    assert boundaries[:, 15].sum() > 0 and not boundaries[:8, :7].any()


def test_association_panel_tiles(association):
    weights, grid, stoken_size = association
    image = np.random.default_rng(0).integers(0, 256, (52, 76, 3), dtype=np.uint8)  # stride 4 over 13x19
    tokens = spread_tokens(grid, [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75), (0.8, 0.7)])
    assert tokens == [6, 8, 16, 18]  # the (0.8, 0.7) position falls in the same cell as (0.75, 0.75)
    panel = association_panel(image, weights, grid, stoken_size, tokens)
    assert panel.shape == (52, 76 * 5, 3) and panel.dtype == np.uint8

    labels = resize_labels(hard_assignment(weights, grid, stoken_size), (52, 76))
    hard_tile = panel[:, :76]
    changed = (hard_tile != image).any(-1)
    np.testing.assert_array_equal(
        changed & label_boundaries(labels), changed
    )  # only boundary pixels repainted
    assert (hard_tile[label_boundaries(labels)] == (255, 255, 0)).all()

    heatmap = resize_heatmap(token_weight_map(weights, grid, stoken_size, tokens[0]), (52, 76))
    expected = blend_heatmap(image, heatmap / heatmap.max())
    tile = panel[:, 76:152]
    row, col = divmod(tokens[0], grid[1])
    y1, x1, y2, x2 = row * 16, col * 16, row * 16 + 15, col * 16 + 15  # the outlined cell
    interior = np.ones((52, 76), dtype=bool)
    interior[[y1, y2], x1 : x2 + 1] = False
    interior[y1 : y2 + 1, [x1, x2]] = False
    np.testing.assert_array_equal(tile[interior], expected[interior])
    assert (tile[~interior] == 255).all()


def test_blend_heatmap_opacity_follows_value():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    heatmap = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    blended = blend_heatmap(image, heatmap, cmap="viridis", alpha=1.0)
    assert (blended[0, 0] == 100).all()  # value 0: the image untouched
    np.testing.assert_array_equal(blended[1, 1], (np.asarray(colormaps["viridis"](1.0)[:3]) * 255).round())
    colour = np.asarray(colormaps["viridis"](0.5)[:3]) * 255
    np.testing.assert_array_equal(blended[1, 0], (0.5 * colour + 0.5 * 100).round())


def test_draw_detections_paints_box_edges_only():
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    drawn = draw_detections(
        image, np.array([[5.0, 6.0, 30.0, 35.0]]), ["person 0.90"], color=(0, 255, 0), width=1
    )
    assert (drawn[6, 5:31] == (0, 255, 0)).all() and (drawn[6:36, 30] == (0, 255, 0)).all()
    assert (drawn[20, 10:25] == 0).all()  # interior untouched
    assert draw_detections(image, np.zeros((0, 4)), []).shape == image.shape
