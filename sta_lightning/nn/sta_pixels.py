"""The pixel-level half of Super Token Attention: pooling a map into super tokens and mapping them back.

A (B, C, H, W) map (H, W multiples of the (h, w) super-token cell) has M = hh*ww cells of P = h*w pixels;
each pixel is associated with the super tokens of the 3x3 cells around its own (out-of-grid neighbours are
zero tokens: logit 0, their softmax mass dropped). With the association constant (the official code never
differentiates it), pooling (map -> super tokens) and unpooling (super tokens -> map) are adjoint linear maps,
so each one's backward is the other; both run as custom autograd Functions, in one of two layouts:

- ``cells``: one pass over a per-cell copy of the map, (B, M, C, P), with batched (9 x C) @ (C x P) products.
  A fixed, small number of kernels whatever the map size, float16/bfloat16 friendly, compilable, exportable:
  the layout for GPUs, ``torch.compile``, ``torch.export`` and tracing.
- ``rows``: no copy of the map at all. Each cell row's pixels are a (C, h*W) view of the map; they are
  associated with the 3 x (ww + 2) zero-padded super tokens of the cell rows around it in one GEMM, the
  tokens that are not among a pixel's 9 neighbours masked out of the softmax. That computes about ww / 3
  times the products the cells layout needs, but in large GEMMs straight on the map, which on CPUs is
  cheaper than copying the map into cells and back (2 copies forward, 2 backward). The eager CPU layout.

Both compute the same values (float32/float64 to rounding). The affinity each returns is in its own layout;
``slot_weights`` turns either into (B, 9, H, W).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# The official code divides by (affinity sum + 1e-12); we keep that eps and compute it in >= float32.
EPS = 1e-12
NEIGHBOUR_SLOTS = 9  # 3x3 super-token neighbourhood; slot k is the offset (k // 3 - 1, k % 3 - 1)


def _contiguous(view: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy of ``view`` in ``dtype``: one copy, also when the dtype changes."""
    return view.contiguous() if view.dtype == dtype else view.to(dtype, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------------
# cells layout


def _to_cells(image: Tensor, stoken_size: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """(B, C, hh*h, ww*w) map -> (B, M, C, P) per-cell copy in ``dtype`` (cells row-major)."""
    b, c, height, width = image.shape
    h, w = stoken_size
    cells = image.reshape(b, c, height // h, h, width // w, w).permute(0, 2, 4, 1, 3, 5)
    return _contiguous(cells, dtype).view(b, -1, c, h * w)


def _to_image(
    cells: Tensor, stoken_size: tuple[int, int], grid: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """Inverse of ``_to_cells``: (B, M, C, P) cells -> (B, C, hh*h, ww*w) map in ``dtype``."""
    b, _, c, _ = cells.shape
    (h, w), (hh, ww) = stoken_size, grid
    pixels = cells.view(b, hh, ww, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return _contiguous(pixels, dtype).view(b, c, hh * h, ww * w)


def _gather_neighbours(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, M, C) super tokens -> (B, M, 9, C): each cell's 3x3 neighbours, zeros outside the grid."""
    b, m, c = tokens.shape
    padded = F.pad(tokens.reshape(b, grid[0], grid[1], c), (0, 0, 1, 1, 1, 1))  # (B, hh+2, ww+2, C)
    windows = padded.unfold(1, 3, 1).unfold(2, 3, 1)  # (B, hh, ww, C, 3, 3) view
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(b, m, NEIGHBOUR_SLOTS, c)


def scatter_neighbours(per_cell: Tensor, grid: tuple[int, int]) -> Tensor:
    """Adjoint of ``_gather_neighbours``: (B, M, 9, C) contributions of each cell to its 9 neighbours ->
    (B, M, C) sums per super token; contributions to neighbours outside the grid are dropped."""
    b, m, _, c = per_cell.shape
    slots = per_cell.reshape(b, grid[0], grid[1], NEIGHBOUR_SLOTS, c)
    # slot k of cell (i, j) lands on (i + k // 3, j + k % 3) of the grid padded by one cell on each side
    padded = sum(
        F.pad(slots[:, :, :, k], (0, 0, k % 3, 2 - k % 3, k // 3, 2 - k // 3)) for k in range(NEIGHBOUR_SLOTS)
    )
    return padded[:, 1:-1, 1:-1].reshape(b, m, c)


def cell_pool(
    image: Tensor, n_iter: int, scale: float, stoken_size: tuple[int, int], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``n_iter`` rounds of association and pooling, in the cells layout, the products in ``dtype``.

    Returns the last round's super tokens (B, M, C), its affinity (B, M, 9, P) in ``dtype`` and the affinity
    mass each super token received, (B, M, 1). Tokens, softmax and mass are in ``dtype`` promoted to at least
    float32. The first round starts from the cells' means (padded zeros included, as in the official code).
    """
    h, w = stoken_size
    grid = (image.shape[-2] // h, image.shape[-1] // w)
    precise = torch.promote_types(dtype, torch.float32)
    cells = _to_cells(image, stoken_size, dtype)
    tokens = cells.mean(-1, dtype=precise)
    for _ in range(n_iter):
        logits = _gather_neighbours(tokens.to(dtype), grid) @ cells  # (B, M, 9, P)
        affinity = (logits.to(precise) * scale).softmax(-2)
        mass = scatter_neighbours(affinity.sum(-1, keepdim=True), grid)
        affinity = affinity.to(dtype)
        pooled = affinity @ cells.transpose(-1, -2)  # (B, M, 9, C)
        tokens = scatter_neighbours(pooled.to(precise), grid) / (mass + EPS)
    return tokens, affinity, mass


def cell_unpool(
    tokens: Tensor,
    affinity: Tensor,
    stoken_size: tuple[int, int],
    grid: tuple[int, int],
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Super tokens (B, M, C) -> (B, C, hh*h, ww*w) map in ``dtype`` (default the affinity's): each
    pixel's affinity-weighted sum of the super tokens of its 9 neighbour cells, the products in the
    affinity's dtype."""
    neighbours = _gather_neighbours(tokens.to(affinity.dtype), grid)  # (B, M, 9, C)
    return _to_image(neighbours.transpose(-1, -2) @ affinity, stoken_size, grid, dtype or affinity.dtype)


def cell_pool_slots(image: Tensor, stoken_size: tuple[int, int], affinity: Tensor) -> Tensor:
    """A (B, C, hh*h, ww*w) map pooled with a given affinity (B, M, 9, P), before the scatter: each cell's
    sums for its 9 neighbours, (B, M, 9, C) in the affinity's dtype (the adjoint of ``cell_unpool``)."""
    return affinity @ _to_cells(image, stoken_size, affinity.dtype).transpose(-1, -2)


def adjoint_functions(
    layout: str,
    pool: Callable[..., tuple[Tensor, Tensor, Tensor]],
    unpool: Callable[..., Tensor],
    pool_slots: Callable[[Tensor, tuple[int, int], Tensor], Tensor],
) -> tuple[type[torch.autograd.Function], type[torch.autograd.Function]]:
    """A layout's pooling and unpooling as autograd Functions, each one's backward the other with the
    association held constant (the official code never differentiates it). The layout gives:

    - ``pool(image, n_iter, scale, stoken_size, dtype)``: tokens (B, M, C), affinity (B, M, 9, P) and the
      mass each token received (B, M, 1), as ``cell_pool``;
    - ``unpool(tokens, affinity, stoken_size, grid, dtype=None)``: the map, as ``cell_unpool``;
    - ``pool_slots(image, stoken_size, affinity)``: per-slot sums (B, M, 9, C), as ``cell_pool_slots``.

    Returns the Functions ``<layout>Pool`` and ``<layout>Unpool``."""

    class Pool(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx, image: Tensor, n_iter: int, scale: float, stoken_size: tuple[int, int], dtype: torch.dtype
        ) -> tuple[Tensor, Tensor, Tensor]:
            tokens, affinity, mass = pool(image, n_iter, scale, stoken_size, dtype)
            ctx.save_for_backward(affinity, mass)
            ctx.stoken_size, ctx.image_dtype = stoken_size, image.dtype
            ctx.grid = (image.shape[-2] // stoken_size[0], image.shape[-1] // stoken_size[1])
            ctx.mark_non_differentiable(affinity, mass)
            return tokens, affinity, mass

        @staticmethod
        def backward(ctx, grad_tokens: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
            affinity, mass = ctx.saved_tensors
            grad = unpool(grad_tokens / (mass + EPS), affinity, ctx.stoken_size, ctx.grid, ctx.image_dtype)
            return grad, None, None, None, None

    class Unpool(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx, tokens: Tensor, affinity: Tensor, stoken_size: tuple[int, int], grid: tuple[int, int]
        ) -> Tensor:
            ctx.save_for_backward(affinity)
            ctx.stoken_size, ctx.grid, ctx.tokens_dtype = stoken_size, grid, tokens.dtype
            return unpool(tokens, affinity, stoken_size, grid)

        @staticmethod
        def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
            (affinity,) = ctx.saved_tensors
            per_slot = pool_slots(grad, ctx.stoken_size, affinity)
            return scatter_neighbours(per_slot, ctx.grid).to(ctx.tokens_dtype), None, None, None

    for function, name in ((Pool, "Pool"), (Unpool, "Unpool")):
        function.__name__ = function.__qualname__ = layout + name
        function.__doc__ = f"``{layout.lower()}_{name.lower()}`` with the gradient of its adjoint."
    return Pool, Unpool


CellPool, CellUnpool = adjoint_functions("Cell", cell_pool, cell_unpool, cell_pool_slots)


# ----------------------------------------------------------------------------------------------------------
# rows layout: per cell row i, a band of 3 x (ww + 2) tokens (the zero-padded token rows i-1, i, i+1; band
# index dy * (ww + 2) + padded column) against the row's h*W pixels (pixel index r * W + x).


def _pixel_rows(image: Tensor, cell_height: int) -> Tensor:
    """(B, C, hh*h, W) map -> (B, hh, C, h*W) view: each cell row's pixels as one matrix."""
    b, c, height, width = image.shape
    return image.reshape(b, c, height // cell_height, cell_height * width).transpose(1, 2)


def _token_bands(tokens: Tensor) -> Tensor:
    """(B, hh, ww, C) super tokens -> (B, hh, 3*(ww+2), C) view of each cell row's band (zero-padded)."""
    b, hh, ww, c = tokens.shape
    padded = F.pad(tokens, (0, 0, 1, 1, 1, 1))  # (B, hh+2, ww+2, C)
    return padded.unfold(1, 3, 1).permute(0, 1, 4, 2, 3).reshape(b, hh, 3 * (ww + 2), c)


def _scatter_bands(per_band: Tensor, ww: int) -> Tensor:
    """Adjoint of ``_token_bands``: (B, hh, 3*(ww+2), C) values per band slot -> (B, hh*ww, C) sums per super
    token; the padding's share is dropped."""
    b, hh, _, c = per_band.shape
    rows = per_band.view(b, hh, 3, ww + 2, c)
    padded = sum(F.pad(rows[:, :, dy], (0, 0, 0, 0, dy, 2 - dy)) for dy in range(3))  # (B, hh+2, ww+2, C)
    return padded[:, 1:-1, 1:-1].reshape(b, hh * ww, c)


@functools.lru_cache(maxsize=32)
def _band_outside(ww: int, stoken_size: tuple[int, int], device: torch.device) -> Tensor:
    """(3*(ww+2), h*W) bool: band slot t is not one of pixel p's 9 neighbours (its padded column is not one of
    the 3 around the pixel's cell column); the same for every cell row (cached: it depends on shapes only)."""
    h, w = stoken_size
    cell_column = (torch.arange(ww * w, device=device) // w).repeat(h)
    offset = torch.arange(ww + 2, device=device).repeat(3)[:, None] - cell_column[None, :]
    return (offset < 0) | (offset > 2)


def _per_image(product, batch: int) -> Tensor:
    """``product(i)`` for each image i of the batch, stacked (one image: no copy)."""
    return product(0).unsqueeze(0) if batch == 1 else torch.stack([product(i) for i in range(batch)])


def _bands_from_image(image: Tensor, affinity: Tensor) -> Tensor:
    """(B, C, H, W) map, band affinity (B, hh, 3*(ww+2), h*W) -> (B, hh, 3*(ww+2), C) weighted sums."""
    pixels = _pixel_rows(image, affinity.shape[-1] // image.shape[-1])
    return _per_image(lambda i: affinity[i] @ pixels[i].transpose(-1, -2), image.shape[0])


def _image_from_bands(per_band: Tensor, affinity: Tensor, size: tuple[int, int]) -> Tensor:
    """Adjoint of ``_bands_from_image``: (B, hh, 3*(ww+2), C) -> (B, C, H, W), each GEMM writing its cell row
    of the map in place."""
    b, hh, _, c = per_band.shape
    image = per_band.new_empty(b, c, *size)
    rows = _pixel_rows(image, size[0] // hh)
    for i in range(b):
        torch.bmm(per_band[i].transpose(-1, -2), affinity[i], out=rows[i])
    return image


def row_pool(
    image: Tensor, n_iter: int, scale: float, stoken_size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """``cell_pool`` in the rows layout, all in the map's dtype promoted to at least float32: super tokens
    (B, M, C), band affinity (B, hh, 3*(ww+2), h*W) (0 outside each pixel's 9 slots), mass (B, M, 1)."""
    image = image.to(torch.promote_types(image.dtype, torch.float32))
    b, c, height, width = image.shape
    h, w = stoken_size
    hh, ww = height // h, width // w
    pixels = _pixel_rows(image, h)
    outside = _band_outside(ww, stoken_size, image.device)
    # block means (padded zeros included); reducing the pixel rows first reads the map faster
    tokens = image.view(b, c, hh, h, ww, w).mean(3).mean(-1).permute(0, 2, 3, 1)  # (B, hh, ww, C)
    for _ in range(n_iter):
        bands = _token_bands(tokens)
        logits = _per_image(lambda i, bands=bands: bands[i] @ pixels[i], b)  # (B, hh, 3*(ww+2), h*W)
        affinity = logits.mul_(scale).masked_fill_(outside, -torch.inf).softmax(-2)
        mass = _scatter_bands(affinity.sum(-1, keepdim=True), ww)
        tokens = _scatter_bands(_bands_from_image(image, affinity), ww) / (mass + EPS)
        tokens = tokens.view(b, hh, ww, c)
    return tokens.view(b, hh * ww, c), affinity, mass


def row_unpool(tokens: Tensor, affinity: Tensor, size: tuple[int, int]) -> Tensor:
    """``cell_unpool`` in the rows layout: super tokens (B, M, C) -> (B, C, H, W) in the affinity's dtype."""
    b, _, c = tokens.shape
    hh = affinity.shape[1]
    bands = _token_bands(tokens.to(affinity.dtype).view(b, hh, -1, c))
    return _image_from_bands(bands, affinity, size)


class RowPool(torch.autograd.Function):
    """``row_pool`` with the gradient of the map from that of the tokens (the affinity constant)."""

    @staticmethod
    def forward(
        ctx, image: Tensor, n_iter: int, scale: float, stoken_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        tokens, affinity, mass = row_pool(image, n_iter, scale, stoken_size)
        ctx.save_for_backward(affinity, mass)
        ctx.image_size, ctx.image_dtype = image.shape[-2:], image.dtype
        ctx.grid = (image.shape[-2] // stoken_size[0], image.shape[-1] // stoken_size[1])
        ctx.mark_non_differentiable(affinity, mass)
        return tokens, affinity, mass

    @staticmethod
    def backward(ctx, grad_tokens: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        affinity, mass = ctx.saved_tensors
        scaled = (grad_tokens / (mass + EPS)).view(grad_tokens.shape[0], *ctx.grid, -1)
        grad = _image_from_bands(_token_bands(scaled), affinity, ctx.image_size)
        return grad.to(ctx.image_dtype), None, None, None


class RowUnpool(torch.autograd.Function):
    """``row_unpool`` with the gradient of the tokens from that of the map (the affinity constant)."""

    @staticmethod
    def forward(ctx, tokens: Tensor, affinity: Tensor, size: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(affinity)
        ctx.tokens_dtype, ctx.ww = tokens.dtype, tokens.shape[1] // affinity.shape[1]
        return row_unpool(tokens, affinity, size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (affinity,) = ctx.saved_tensors
        grad_tokens = _scatter_bands(_bands_from_image(grad.to(affinity.dtype), affinity), ctx.ww)
        return grad_tokens.to(ctx.tokens_dtype), None, None


# ----------------------------------------------------------------------------------------------------------


def cell_slot_weights(affinity: Tensor, stoken_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Cells-layout affinity (B, M, 9, P) -> (B, 9, hh*h, ww*w): slot k of each pixel."""
    (h, w), (hh, ww) = stoken_size, grid
    weights = affinity.view(-1, hh, ww, NEIGHBOUR_SLOTS, h, w).permute(0, 3, 1, 4, 2, 5)
    return weights.reshape(-1, NEIGHBOUR_SLOTS, hh * h, ww * w)


def row_slot_weights(affinity: Tensor, stoken_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Rows-layout affinity (B, hh, 3*(ww+2), h*W) -> (B, 9, hh*h, ww*w): slot k of each pixel."""
    (h, w), (hh, ww) = stoken_size, grid
    cell_column = (torch.arange(ww * w, device=affinity.device) // w).repeat(h)
    # slot k = (dy, dx) of a pixel in cell column j is band slot dy * (ww + 2) + j + dx
    slots = torch.arange(NEIGHBOUR_SLOTS, device=affinity.device)
    index = (slots // 3 * (ww + 2) + slots % 3)[:, None] + cell_column[None, :]  # (9, h*W)
    weights = affinity.gather(2, index.expand(affinity.shape[0], hh, -1, -1))  # (B, hh, 9, h*W)
    return (
        weights.view(-1, hh, NEIGHBOUR_SLOTS, h, ww * w)
        .transpose(1, 2)
        .reshape(-1, NEIGHBOUR_SLOTS, hh * h, ww * w)
    )
