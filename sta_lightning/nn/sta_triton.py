"""The cells layout's pixel work as two fused Triton kernels (CUDA; the ``"triton"`` pixel layout of STA).

``sta_pixels.cell_pool`` / ``cell_unpool`` copy the map into cells and back and run small batched products
between the copies. Here one program per (image, cell) reads its cell's pixels straight from the map (any
strides: channels-last too) and does the cell's whole step in registers:

- ``_pool_kernel``: the association logits of the cell's P pixels with its 9 neighbour super tokens
  (out-of-grid ones are zero tokens), their softmax over the 9 slots, and the pooled sums each neighbour
  receives, (9, C), with the affinity mass per slot. Without association it pools with a given affinity (the
  adjoint of unpooling, for the tokens' gradient).
- ``_unpool_kernel``: each pixel's affinity-weighted sum of its 9 neighbour tokens, written into the map (the
  adjoint of pooling, for the map's gradient).

The per-slot sums reach their super tokens through ``sta_pixels.scatter_neighbours`` (no atomics: the results
are deterministic). Values, dtypes and the affinity's layout (B, M, 9, P) are those of ``cell_pool`` /
``cell_unpool``; products accumulate in >= float32 (float64 for float64 work), float32 products in full
precision (no TF32). Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests
check it without a GPU). Cells hold at most ``MAX_CELL_PIXELS`` pixels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from sta_lightning.nn.sta_pixels import EPS, NEIGHBOUR_SLOTS, adjoint_functions, scatter_neighbours

# Triton's interpreter (TRITON_INTERPRET=1) replaces the kernels when they are defined, at import
_KNOBS = getattr(triton, "knobs", None)  # Triton >= 3.3
INTERPRETED = _KNOBS.runtime.interpret if _KNOBS else os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_CELL_PIXELS = 1024  # one cell's pixels are one block of the kernels


@triton.jit
def _cell_frame(program, cells, grid_w, cell_h, cell_w, BLOCK_P: tl.constexpr):
    """A program's image b and cell m; the cell's slots (the 9 padded to 16, the smallest block of a Triton
    product: neighbour token index, inside the grid and a real slot) and its pixels (row y, column x,
    p < P)."""
    b = (program // cells).to(tl.int64)
    m = program % cells
    i = m // grid_w
    j = m % grid_w
    slots = tl.arange(0, 16)
    ni = i + slots // 3 - 1
    nj = j + slots % 3 - 1
    inside = (slots < 9) & (ni >= 0) & (ni < cells // grid_w) & (nj >= 0) & (nj < grid_w)
    pixels = tl.arange(0, BLOCK_P)
    y = i * cell_h + pixels // cell_w
    x = j * cell_w + pixels % cell_w
    return b, m, slots, ni * grid_w + nj, inside, pixels, y, x, pixels < cell_h * cell_w


@triton.jit
def _pool_kernel(
    image_ptr,  # (B, C, H, W), any strides
    tokens_ptr,  # (B, M, C) contiguous: the super tokens to associate with (read with ASSOCIATE)
    affinity_ptr,  # (B, M, 9, P) contiguous, the work dtype: written with ASSOCIATE, else read
    pooled_ptr,  # (B, M, 9, C) contiguous, the accumulation dtype: written
    mass_ptr,  # (B, M, 9) contiguous, the accumulation dtype: written with ASSOCIATE
    channels,
    cells,
    grid_w,
    cell_h,
    cell_w,
    stride_b,
    stride_c,
    stride_y,
    stride_x,
    scale,
    ASSOCIATE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    WORK = affinity_ptr.dtype.element_ty  # the products' dtype
    ACC = pooled_ptr.dtype.element_ty  # their accumulation's
    b, m, slots, neighbour, inside, pixels, y, x, real = _cell_frame(
        tl.program_id(0), cells, grid_w, cell_h, cell_w, BLOCK_P
    )
    n_pixels = cell_h * cell_w
    cell = b * cells + m
    pixel_offsets = b * stride_b + y * stride_y + x * stride_x  # (BLOCK_P,)
    slot_pixel = (slots[:, None] < 9) & real[None, :]
    affinity_offsets = (cell * 9 + slots[:, None]) * n_pixels + pixels[None, :]
    channel_block = tl.arange(0, BLOCK_C)
    if ASSOCIATE:
        logits = tl.zeros((16, BLOCK_P), ACC)
        for c0 in range(0, channels, BLOCK_C):
            channel = c0 + channel_block
            pixel_values = tl.load(
                image_ptr + pixel_offsets[None, :] + channel[:, None] * stride_c,
                mask=(channel[:, None] < channels) & real[None, :],
                other=0.0,
            ).to(WORK)
            neighbours = tl.load(
                tokens_ptr + (b * cells + neighbour)[:, None] * channels + channel[None, :],
                mask=inside[:, None] & (channel[None, :] < channels),
                other=0.0,
            ).to(WORK)
            logits = tl.dot(neighbours, pixel_values, logits, input_precision="ieee", out_dtype=ACC)
        logits = tl.where(slots[:, None] < 9, logits * scale, float("-inf"))
        weights = tl.exp(logits - tl.max(logits, 0)[None, :])
        affinity = tl.where(real[None, :], weights / tl.sum(weights, 0)[None, :], 0.0)
        tl.store(mass_ptr + cell * 9 + slots, tl.sum(affinity, 1), mask=slots < 9)
        affinity = affinity.to(WORK)
        tl.store(affinity_ptr + affinity_offsets, affinity, mask=slot_pixel)
    else:
        affinity = tl.load(affinity_ptr + affinity_offsets, mask=slot_pixel, other=0.0).to(WORK)
    for c0 in range(0, channels, BLOCK_C):
        channel = c0 + channel_block
        pixel_values = tl.load(
            image_ptr + pixel_offsets[:, None] + channel[None, :] * stride_c,
            mask=real[:, None] & (channel[None, :] < channels),
            other=0.0,
        ).to(WORK)
        pooled = tl.dot(affinity, pixel_values, input_precision="ieee", out_dtype=ACC)  # (16, BLOCK_C)
        tl.store(
            pooled_ptr + (cell * 9 + slots[:, None]) * channels + channel[None, :],
            pooled,
            mask=(slots[:, None] < 9) & (channel[None, :] < channels),
        )


@triton.jit
def _unpool_kernel(
    tokens_ptr,  # (B, M, C) contiguous
    affinity_ptr,  # (B, M, 9, P) contiguous, the work dtype
    out_ptr,  # (B, C, H, W), any strides: written
    channels,
    cells,
    grid_w,
    cell_h,
    cell_w,
    stride_b,
    stride_c,
    stride_y,
    stride_x,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    WORK = affinity_ptr.dtype.element_ty  # the products' dtype
    ACC = tl.float64 if WORK == tl.float64 else tl.float32  # their accumulation's
    b, m, slots, neighbour, inside, pixels, y, x, real = _cell_frame(
        tl.program_id(0), cells, grid_w, cell_h, cell_w, BLOCK_P
    )
    affinity = tl.load(
        affinity_ptr + ((b * cells + m) * 9 + slots[:, None]) * (cell_h * cell_w) + pixels[None, :],
        mask=(slots[:, None] < 9) & real[None, :],
        other=0.0,
    ).to(WORK)
    pixel_offsets = b * stride_b + y * stride_y + x * stride_x
    channel_block = tl.arange(0, BLOCK_C)
    for c0 in range(0, channels, BLOCK_C):
        channel = c0 + channel_block
        neighbours = tl.load(
            tokens_ptr + (b * cells + neighbour)[None, :] * channels + channel[:, None],
            mask=(channel[:, None] < channels) & inside[None, :],
            other=0.0,
        ).to(WORK)  # (BLOCK_C, 16)
        values = tl.dot(neighbours, affinity, input_precision="ieee", out_dtype=ACC)  # (BLOCK_C, BLOCK_P)
        tl.store(
            out_ptr + pixel_offsets[None, :] + channel[:, None] * stride_c,
            values.to(out_ptr.dtype.element_ty),
            mask=(channel[:, None] < channels) & real[None, :],
        )


def _launch_shape(channels: int, stoken_size: tuple[int, int]) -> dict:
    """The kernels' block sizes and the accumulation settings shared by every launch."""
    n_pixels = stoken_size[0] * stoken_size[1]
    if n_pixels > MAX_CELL_PIXELS:
        raise ValueError(
            f"the triton pixel layout takes super-token cells of at most {MAX_CELL_PIXELS} pixels, got "
            f"{stoken_size} ({n_pixels}); use pixel_layout 'cells'"
        )
    return dict(
        BLOCK_C=min(64, max(16, triton.next_power_of_2(channels))),
        BLOCK_P=max(16, triton.next_power_of_2(n_pixels)),
    )


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """The dtype products and sums accumulate in for work in ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _pool_slots(
    image: Tensor,
    stoken_size: tuple[int, int],
    affinity: Tensor,
    scale: float = 0.0,
    tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One ``_pool_kernel`` launch on a (B, C, hh*h, ww*w) map. With ``tokens`` (B, M, C) it associates them
    with the pixels (logits times ``scale``) and writes ``affinity`` (B, M, 9, P) in place; without, it pools
    with the given affinity. Returns the per-slot pooled sums (B, M, 9, C) and the per-slot masses (B, M, 9,
    written only with tokens), both in the accumulation dtype."""
    b, c, height, width = image.shape
    (h, w), cells = stoken_size, affinity.shape[1]
    accumulation = _accumulation(affinity.dtype)
    pooled = image.new_empty(b, cells, NEIGHBOUR_SLOTS, c, dtype=accumulation)
    mass = image.new_empty(b, cells, NEIGHBOUR_SLOTS, dtype=accumulation)
    _pool_kernel[(b * cells,)](
        image,
        pooled if tokens is None else tokens.contiguous(),  # not read without association
        affinity,
        pooled,
        mass,
        c,
        cells,
        width // w,
        h,
        w,
        *image.stride(),
        scale,
        ASSOCIATE=tokens is not None,
        **_launch_shape(c, stoken_size),
    )
    return pooled, mass


def triton_unpool(
    tokens: Tensor,
    affinity: Tensor,
    stoken_size: tuple[int, int],
    grid: tuple[int, int],
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``cell_unpool``: super tokens (B, M, C) and affinity (B, M, 9, P) -> (B, C, hh*h, ww*w) map in
    ``dtype`` (default the affinity's), the products in the affinity's dtype."""
    b, cells, c = tokens.shape
    (h, w), (hh, ww) = stoken_size, grid
    out = tokens.new_empty(b, c, hh * h, ww * w, dtype=dtype or affinity.dtype)
    _unpool_kernel[(b * cells,)](
        tokens.contiguous(),
        affinity,
        out,
        c,
        cells,
        ww,
        h,
        w,
        *out.stride(),
        **_launch_shape(c, stoken_size),
    )
    return out


def triton_pool_slots(image: Tensor, stoken_size: tuple[int, int], affinity: Tensor) -> Tensor:
    """``cell_pool_slots``: a map pooled with a given affinity, per-slot sums (B, M, 9, C) in the
    accumulation dtype."""
    return _pool_slots(image, stoken_size, affinity)[0]


def _check_device(tensor: Tensor) -> None:
    """CUDA tensors, or any under Triton's interpreter (``TRITON_INTERPRET=1``, read at import)."""
    if tensor.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"the triton pixel layout of STA runs on CUDA tensors, got a {tensor.device.type} tensor; use "
            "pixel_layout 'auto' (sta_pixel_layout in configs)"
        )


def triton_pool(
    image: Tensor, n_iter: int, scale: float, stoken_size: tuple[int, int], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``cell_pool``: ``n_iter`` rounds of association and pooling of a (B, C, hh*h, ww*w) map, the products
    in ``dtype``. Returns super tokens (B, M, C), the last affinity (B, M, 9, P) in ``dtype`` and the mass
    each super token received (B, M, 1), tokens and mass in at least float32."""
    _check_device(image)
    (h, w), (height, width) = stoken_size, image.shape[-2:]
    grid = (height // h, width // w)
    cells = image.unflatten(3, (grid[1], w)).unflatten(2, (grid[0], h))  # (B, C, hh, h, ww, w) view
    tokens = cells.mean((3, 5), dtype=_accumulation(dtype)).flatten(2).transpose(1, 2)  # (B, M, C)
    affinity = image.new_empty(image.shape[0], grid[0] * grid[1], NEIGHBOUR_SLOTS, h * w, dtype=dtype)
    for _ in range(n_iter):
        pooled, mass = _pool_slots(image, stoken_size, affinity, scale, tokens)
        mass = scatter_neighbours(mass.unsqueeze(-1), grid)
        tokens = scatter_neighbours(pooled, grid) / (mass + EPS)
    return tokens, affinity, mass


TritonPool, TritonUnpool = adjoint_functions("Triton", triton_pool, triton_unpool, triton_pool_slots)
