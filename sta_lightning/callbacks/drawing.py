"""Pure rendering of super-token associations and detections as (H, W, 3) uint8 RGB numpy images.

No Lightning and no logger here: the callbacks in ``sta_lightning.callbacks`` decide what to render and where
to send it. Association maps come from ``YOLOv8.capture_associations()`` (one ``StokenAssociation`` per STA
block) and live at feature resolution; they are upsampled to the letterboxed input image before drawing.
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torchvision.utils import draw_bounding_boxes

from sta_lightning.nn.sta import NEIGHBOUR_SLOTS


def slot_token_indices(
    size: tuple[int, int], grid: tuple[int, int], stoken_size: tuple[int, int]
) -> np.ndarray:
    """Absolute super-token index (row-major over ``grid``) of each of the 9 slots of every pixel.

    size: (H, W) feature-map pixels; grid: (hh, ww) super tokens; stoken_size: (h, w) pixels per cell.
    Returns (9, H, W) int64, -1 where the slot's cell lies outside the grid.
    """
    (height, width), (grid_h, grid_w), (cell_h, cell_w) = size, grid, stoken_size
    cell_y = (np.arange(height) // cell_h)[:, None]
    cell_x = (np.arange(width) // cell_w)[None, :]
    indices = np.empty((NEIGHBOUR_SLOTS, height, width), dtype=np.int64)
    for slot in range(NEIGHBOUR_SLOTS):
        token_y = cell_y + slot // 3 - 1
        token_x = cell_x + slot % 3 - 1
        inside = (token_y >= 0) & (token_y < grid_h) & (token_x >= 0) & (token_x < grid_w)
        indices[slot] = np.where(inside, token_y * grid_w + token_x, -1)
    return indices


def hard_assignment(weights: np.ndarray, grid: tuple[int, int], stoken_size: tuple[int, int]) -> np.ndarray:
    """Absolute super-token index each pixel is most associated with: (9, H, W) weights -> (H, W) int64.

    Out-of-grid slots carry weight 0 (``StokenAssociation`` contract): the argmax always picks a real token.
    """
    slots = slot_token_indices(weights.shape[1:], grid, stoken_size)
    best_slot = weights.argmax(axis=0)[None]
    return np.take_along_axis(slots, best_slot, axis=0)[0]


def token_weight_map(
    weights: np.ndarray, grid: tuple[int, int], stoken_size: tuple[int, int], token: int
) -> np.ndarray:
    """Every pixel's soft weight for one super token (row-major index): (9, H, W) -> (H, W) float32.

    Pixels outside the token's 3x3 cell neighbourhood get 0; inside it exactly one slot refers to the token.
    """
    slots = slot_token_indices(weights.shape[1:], grid, stoken_size)
    return np.where(slots == token, weights, 0.0).sum(axis=0).astype(np.float32)


def spread_tokens(grid: tuple[int, int], positions: Sequence[tuple[float, float]]) -> list[int]:
    """Row-major indices of the super tokens at fractional (row, column) ``positions`` in the grid."""
    grid_h, grid_w = grid
    tokens = []
    for row_fraction, col_fraction in positions:
        row = min(int(row_fraction * grid_h), grid_h - 1)
        col = min(int(col_fraction * grid_w), grid_w - 1)
        if row * grid_w + col not in tokens:
            tokens.append(row * grid_w + col)
    return tokens


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) integer label map to ``size`` (h, w)."""
    resized = F.interpolate(torch.from_numpy(labels)[None, None].double(), size=size, mode="nearest")
    return resized[0, 0].long().numpy()


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners=False) of an (H, W) float map to ``size`` (h, w)."""
    resized = F.interpolate(torch.from_numpy(heatmap)[None, None].float(), size=size, mode="bilinear")
    return resized[0, 0].numpy()


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool, True at pixels whose right or lower neighbour has a different label (1-pixel lines)."""
    boundaries = np.zeros(labels.shape, dtype=bool)
    boundaries[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    boundaries[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return boundaries


def draw_boundaries(
    image: np.ndarray, boundaries: np.ndarray, color: tuple[int, int, int] = (255, 255, 0)
) -> np.ndarray:
    """Paint the True pixels of ``boundaries`` (H, W) in ``color`` on a copy of ``image`` (H, W, 3) uint8."""
    painted = image.copy()
    painted[boundaries] = color
    return painted


def blend_heatmap(
    image: np.ndarray, heatmap: np.ndarray, cmap: str = "jet", alpha: float = 0.7
) -> np.ndarray:
    """Colour-map an (H, W) heatmap with values in [0, 1] over ``image`` (H, W, 3) uint8.

    Each pixel's opacity is ``alpha * value``: the image shows through where the heatmap is 0.
    """
    values = np.clip(heatmap, 0.0, 1.0)[..., None]
    colored = colormaps[cmap](values[..., 0])[..., :3] * 255.0
    opacity = alpha * values
    return (opacity * colored + (1.0 - opacity) * image).round().astype(np.uint8)


def draw_cell_outline(
    image: np.ndarray, box: tuple[int, int, int, int], color: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """Outline the pixel box (x1, y1, x2, y2), end exclusive, on a copy of ``image`` (H, W, 3) uint8."""
    x1, y1, x2, y2 = box
    height, width = image.shape[:2]
    x2, y2 = min(x2, width) - 1, min(y2, height) - 1
    outlined = image.copy()
    outlined[y1, x1 : x2 + 1] = color
    outlined[y2, x1 : x2 + 1] = color
    outlined[y1 : y2 + 1, x1] = color
    outlined[y1 : y2 + 1, x2] = color
    return outlined


def association_panel(
    image: np.ndarray,
    weights: np.ndarray,
    grid: tuple[int, int],
    stoken_size: tuple[int, int],
    tokens: Sequence[int],
    cmap: str = "jet",
) -> np.ndarray:
    """One STA block's association for one image, as a side-by-side strip (S, S * (1 + len(tokens)), 3) uint8.

    image: (S, S, 3) uint8 letterboxed input; weights: (9, H, W) at feature resolution (stride S / H).
    First tile: boundaries of the hard assignment (nearest upsampling); then one tile per token: its soft
    weight (bilinear upsampling), divided by its peak so that weak maps stay visible, blended over the image,
    with the token's own cell outlined.
    """
    size = image.shape[:2]
    labels = resize_labels(hard_assignment(weights, grid, stoken_size), size)
    tiles = [draw_boundaries(image, label_boundaries(labels))]
    stride_y, stride_x = size[0] / weights.shape[1], size[1] / weights.shape[2]
    cell_h, cell_w = stoken_size[0] * stride_y, stoken_size[1] * stride_x
    for token in tokens:
        heatmap = resize_heatmap(token_weight_map(weights, grid, stoken_size, token), size)
        heatmap /= max(float(heatmap.max()), np.finfo(np.float32).tiny)
        row, col = divmod(token, grid[1])
        cell = (
            round(col * cell_w),
            round(row * cell_h),
            round((col + 1) * cell_w),
            round((row + 1) * cell_h),
        )
        tiles.append(draw_cell_outline(blend_heatmap(image, heatmap, cmap), cell))
    return np.concatenate(tiles, axis=1)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    color: tuple[int, int, int] = (0, 255, 0),
    width: int = 2,
) -> np.ndarray:
    """Draw xyxy pixel ``boxes`` (n, 4) with text ``labels`` on a copy of ``image`` (H, W, 3) uint8."""
    if len(boxes) == 0:
        return image.copy()
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    drawn = draw_bounding_boxes(
        canvas, torch.as_tensor(boxes, dtype=torch.float32), labels=list(labels), colors=color, width=width
    )
    return drawn.permute(1, 2, 0).numpy()
