"""Super Token Attention (Huang et al., "Vision Transformer with Super Token Sampling", CVPR 2023).

Computes the same function as the official ``StokenAttention`` (forward and gradients), with the same
learnable parameters, but with a layout chosen for speed: the pixel-level products (association, pooling
into super tokens, mapping back) run over cache-sized chunks of cell rows with the pixels of each
super-token cell grouped together (M = number of cells, P = pixels per cell), the 3x3 neighbourhood of the
super-token map is gathered as an unfold view of the padded map and scattered back with ``F.fold`` (an
adjoint autograd pair), and the refine MHSA runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The official code divides by (affinity sum + 1e-12); we keep that eps and compute it in >= float32.
_EPS = 1e-12
NEIGHBOUR_SLOTS = 9  # 3x3 super-token neighbourhood; slot k is the offset (k // 3 - 1, k % 3 - 1)
# Fixed one-hot (9, 1, 3, 3) conv banks the official module stores as parameters; they carry no information.
_OFFICIAL_FIXED_BANKS = ("unfold.weights", "fold.weights")


class StokenAssociation(NamedTuple):
    """Soft pixel -> super-token assignment returned by ``StokenAttention(..., return_association=True)``.

    ``weights``: (B, 9, H, W) float32, detached. Slot k of pixel (y, x) is its weight for the super token in
    cell (y // h + k // 3 - 1, x // w + k % 3 - 1); slots outside the grid are 0, so a pixel's weights sum to
    1 minus the softmax mass the official algorithm gives to (and then drops for) out-of-grid neighbours.
    ``grid``: (hh, ww) super-token grid of the zero-padded map. ``stoken_size``: (h, w) cell size in pixels.
    """

    weights: Tensor
    grid: tuple[int, int]
    stoken_size: tuple[int, int]


class GroupedHeadAttention(nn.Module):
    """Global multi-head self-attention over the positions of a (B, C, H, W) map, returning (B, C, H, W).

    Official STA channel layout: the 1x1 ``qkv`` conv output is grouped per head, head g owning channels
    [3d*g, 3d*(g+1)) split into q | k | v (d = head width); output channel g*d + j. Parameter names and shapes
    (``qkv`` (3C, C, 1, 1), ``proj`` (C, C, 1, 1)) match the official ``Attention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5  # same `or` semantics as the official code
        self.attn_drop = attn_drop
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # The 1x1 convs run as F.linear on the (B, N, C) token view: one GEMM each, no layout copies.
        tokens = x.flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = qkv.view(b, h * w, self.num_heads, 3, self.head_dim).permute(
            3, 0, 2, 1, 4
        )  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        out = F.linear(out.transpose(1, 2).reshape(b, h * w, c), self.proj.weight.flatten(1), self.proj.bias)
        return self.proj_drop(out).transpose(1, 2).view(b, c, h, w)


def _gather_neighbours(tokens: Tensor) -> Tensor:
    """(B, C, hh, ww) super-token map -> (B, M, 9, C): each cell's 3x3 neighbours, zeros outside the grid."""
    b, c, hh, ww = tokens.shape
    padded = F.pad(tokens.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, hh+2, ww+2, C)
    windows = padded.unfold(1, 3, 1).unfold(2, 3, 1)  # (B, hh, ww, C, 3, 3) view
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(b, hh * ww, NEIGHBOUR_SLOTS, c)


def _scatter_neighbours(per_cell: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, M, 9, C) contributions of each cell to its 9 neighbours -> (B, C, hh, ww) sums per super token.

    Contributions to neighbours outside the grid are dropped (``F.fold`` is the adjoint of ``F.unfold``).
    """
    b, m, _, c = per_cell.shape
    return F.fold(per_cell.permute(0, 3, 2, 1).reshape(b, c * NEIGHBOUR_SLOTS, m), grid, 3, padding=1)


def _run(function: type[torch.autograd.Function], forward: Callable[..., Any], *args: Any) -> Any:
    """``function.apply(*args)``, or ``forward(*args)`` (its forward, the same values) under torch.jit.trace,
    which records custom autograd Functions as Python calls that TorchScript cannot save."""
    return forward(*args) if torch.jit.is_tracing() else function.apply(*args)


# Gather and scatter are adjoint linear maps; as custom autograd each one's backward is the other, which is
# cheaper than autograd's backward of the strided unfold view or of F.fold.
class _GatherNeighbours(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: Tensor) -> Tensor:
        ctx.grid = tokens.shape[-2:]
        return _gather_neighbours(tokens)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _scatter_neighbours(grad, ctx.grid)


class _ScatterNeighbours(torch.autograd.Function):
    @staticmethod
    def forward(ctx, per_cell: Tensor, grid: tuple[int, int]) -> Tensor:
        return _scatter_neighbours(per_cell, grid)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _gather_neighbours(grad), None


# Pixel-level work runs over chunks of whole cell rows, each about this many elements: a chunk's per-cell copy
# and the products that read or write it stay in the CPU cache, so pixels cross main memory once per pass
# (the per-cell layout of the whole map would be written and re-read several times).
_CHUNK_ELEMENTS = 1 << 17


def _row_chunks(image: Tensor, stoken_size: tuple[int, int]) -> list[tuple[slice, slice]]:
    """(pixel-row slice, cell slice) of each chunk of whole cell rows of a (B, C, hh*h, ww*w) map."""
    b, c, height, width = image.shape
    h, w = stoken_size
    # A symbolic batch (torch.export with a free batch): chunks sized for one image keep the graph batch-free.
    images = 1 if isinstance(b, torch.SymInt) else b
    rows = max(1, _CHUNK_ELEMENTS // (images * c * h * width))
    cells_per_row = width // w
    return [
        (slice(r * h, (r + rows) * h), slice(r * cells_per_row, (r + rows) * cells_per_row))
        for r in range(0, height // h, rows)
    ]


def _to_cells(image: Tensor, stoken_size: tuple[int, int]) -> Tensor:
    """(B, C, R*h, ww*w) pixel rows -> (B, R*ww, C, h*w) per-cell copy."""
    b, c, height, width = image.shape
    h, w = stoken_size
    cells = image.reshape(b, c, height // h, h, width // w, w).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, -1, c, h * w)


def _copy_cells_to_image(image: Tensor, cells: Tensor, stoken_size: tuple[int, int]) -> None:
    """Inverse of ``_to_cells``, in place: (B, R*ww, C, h*w) cells -> (B, C, R*h, ww*w) pixel rows."""
    b, c, height, width = image.shape
    h, w = stoken_size
    pixels = image.view(b, c, height // h, h, width // w, w)
    pixels.copy_(cells.view(b, height // h, width // w, c, h, w).permute(0, 3, 1, 4, 2, 5))


def _associate_and_pool(
    image: Tensor, neighbours: Tensor, scale: float, stoken_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Association and affinity-weighted pixel sums of a (B, C, hh*h, ww*w) map, chunk by chunk.

    ``neighbours`` (B, M, 9, C): each cell's 3x3 super tokens. Returns the pooled sums (B, M, 9, C) and the
    affinity (B, M, 9, P) (softmax over the 9 slots, out-of-grid slots included with logit 0).
    """
    pooled, affinities = [], []
    for rows, cells in _row_chunks(image, stoken_size):
        pixels = _to_cells(image[:, :, rows], stoken_size)
        affinity = (neighbours[:, cells] @ pixels * scale).softmax(-2)
        pooled.append(affinity @ pixels.transpose(-1, -2))
        affinities.append(affinity)
    return torch.cat(pooled, 1), torch.cat(affinities, 1)


def _pool(image: Tensor, affinity: Tensor, stoken_size: tuple[int, int]) -> Tensor:
    """Affinity-weighted pixel sums per neighbour slot: (B, C, hh*h, ww*w), (B, M, 9, P) -> (B, M, 9, C)."""
    return torch.cat(
        [
            affinity[:, cells] @ _to_cells(image[:, :, rows], stoken_size).transpose(-1, -2)
            for rows, cells in _row_chunks(image, stoken_size)
        ],
        1,
    )


def _unpool(
    per_slot: Tensor, affinity: Tensor, stoken_size: tuple[int, int], grid: tuple[int, int]
) -> Tensor:
    """Adjoint of ``_pool``: (B, M, 9, C) values per neighbour slot -> (B, C, hh*h, ww*w) weighted pixels."""
    b, _, _, c = per_slot.shape
    (h, w), (hh, ww) = stoken_size, grid
    per_slot = per_slot.contiguous()  # gradients arrive as a strided view; slicing it per chunk is slower
    image = per_slot.new_empty(b, c, hh * h, ww * w)
    for rows, cells in _row_chunks(image, stoken_size):
        weighted = per_slot[:, cells].transpose(-1, -2) @ affinity[:, cells]  # (B, R*ww, C, P)
        _copy_cells_to_image(image[:, :, rows], weighted, stoken_size)
    return image


# Custom autograd for the two pixel-level products with a constant affinity: each one's backward is the
# other (they are adjoint linear maps), so the backward passes are chunked like the forward ones and never
# build the per-cell layout of the whole map; plain autograd would.
class _AssociateAndPool(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, image: Tensor, neighbours: Tensor, scale: float, stoken_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        pooled, affinity = _associate_and_pool(image, neighbours.detach(), scale, stoken_size)
        ctx.save_for_backward(affinity)
        ctx.stoken_size, ctx.grid = (
            stoken_size,
            (image.shape[-2] // stoken_size[0], image.shape[-1] // stoken_size[1]),
        )
        ctx.mark_non_differentiable(affinity)
        return pooled, affinity

    @staticmethod
    def backward(ctx, grad: Tensor, _: Tensor) -> tuple[Tensor, None, None, None]:
        return _unpool(grad, ctx.saved_tensors[0], ctx.stoken_size, ctx.grid), None, None, None


class _Unpool(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, per_slot: Tensor, affinity: Tensor, stoken_size: tuple[int, int], grid: tuple[int, int]
    ) -> Tensor:
        ctx.save_for_backward(affinity)
        ctx.stoken_size = stoken_size
        return _unpool(per_slot, affinity, stoken_size, grid)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _pool(grad, ctx.saved_tensors[0], ctx.stoken_size), None, None, None


class StokenAttention(nn.Module):
    """Super Token Attention on (B, C, H, W) maps of any size, returning (B, C, H, W).

    Pixels are softly associated with the super tokens of the 3x3 cells around their own ``stoken_size`` cell
    (``n_iter`` rounds of association, the map zero-padded right/bottom to whole cells), the super tokens are
    refined by global MHSA and mapped back to pixels through the same association. As in the official code the
    association is never differentiated. ``stoken_size`` (1, 1) is plain global MHSA over all positions.
    Learnable parameters: ``stoken_refine.qkv.weight``, ``stoken_refine.qkv.bias`` (with ``qkv_bias``),
    ``stoken_refine.proj.{weight,bias}`` (official keys); official state dicts,
    which also hold the fixed ``unfold.weights``/``fold.weights`` banks, load with ``strict=True``.
    """

    def __init__(
        self,
        dim: int,
        stoken_size: Sequence[int] = (8, 8),
        n_iter: int = 1,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        stoken_size = tuple(int(s) for s in stoken_size)
        if len(stoken_size) != 2 or min(stoken_size) < 1:
            raise ValueError(f"stoken_size must be two positive ints (h, w), got {stoken_size}")
        if int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1 (number of association rounds), got {n_iter}")
        self.stoken_size: tuple[int, int] = stoken_size
        self.n_iter = int(n_iter)
        self.scale = dim**-0.5  # association scale: full channel width, as in the official code
        self.stoken_refine = GroupedHeadAttention(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.register_load_state_dict_pre_hook(_drop_official_fixed_banks)

    @property
    def is_global(self) -> bool:
        """True for stoken_size (1, 1): plain global attention, no super tokens."""
        return self.stoken_size == (1, 1)

    def forward(
        self, x: Tensor, return_association: bool = False
    ) -> Tensor | tuple[Tensor, StokenAssociation | None]:
        """x (B, C, H, W) -> (B, C, H, W); with ``return_association`` also the association (None: global)."""
        if self.is_global:
            out = self.stoken_refine(x)
            return (out, None) if return_association else out
        return self._stoken_forward(x, return_association)

    def _stoken_forward(
        self, x: Tensor, return_association: bool
    ) -> Tensor | tuple[Tensor, StokenAssociation]:
        b, c, h0, w0 = x.shape
        affinity, tokens = self._pool_super_tokens(x)
        tokens = self.stoken_refine(tokens.to(x.dtype))
        grid = tokens.shape[-2:]
        neighbours = _run(_GatherNeighbours, _gather_neighbours, tokens)
        out = _run(_Unpool, _unpool, neighbours, affinity.to(tokens.dtype), self.stoken_size, grid)
        out = out[:, :, :h0, :w0]
        if not return_association:
            return out
        return out, self._association_map(affinity, grid, (h0, w0))

    def _pool_super_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) -> affinity (B, M, 9, P) (constant), super tokens (B, C, hh, ww) (differentiable).

        Runs in >= float32 with autocast off (in fp16 the official 1e-12 eps would be 0).
        """
        b, c, h0, w0 = x.shape
        h, w = self.stoken_size
        pad_bottom, pad_right = -h0 % h, -w0 % w
        if pad_bottom or pad_right:
            x = F.pad(x, (0, pad_right, 0, pad_bottom))
        grid = (x.shape[-2] // h, x.shape[-1] // w)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            frozen = x.detach()  # the association is never differentiated
            # block means (padded zeros included); two single-axis means read the map faster than avg_pool2d
            tokens = frozen.reshape(b, c, grid[0], h, grid[1], w).mean(5).mean(3)
            for _ in range(self.n_iter - 1):
                pooled, affinity = _associate_and_pool(
                    frozen, _gather_neighbours(tokens), self.scale, self.stoken_size
                )
                tokens = _scatter_neighbours(pooled, grid) / (self._mass(affinity, grid) + _EPS)
            pooled, affinity = _run(
                _AssociateAndPool,
                _associate_and_pool,
                x,
                _gather_neighbours(tokens),
                self.scale,
                self.stoken_size,
            )
            tokens = _run(_ScatterNeighbours, _scatter_neighbours, pooled, grid)
            tokens = tokens / (self._mass(affinity, grid) + _EPS)
        return affinity, tokens

    @staticmethod
    def _mass(affinity: Tensor, grid: tuple[int, int]) -> Tensor:
        """Affinity (B, M, 9, P) -> the affinity mass each super token receives, (B, 1, hh, ww)."""
        return _scatter_neighbours(affinity.sum(-1, keepdim=True), grid)

    def _association_map(
        self, affinity: Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> StokenAssociation:
        """Affinity (B, M, 9, P) -> StokenAssociation with (B, 9, H, W) weights, out-of-grid slots zeroed."""
        (h, w), (hh, ww) = self.stoken_size, grid
        inside = F.unfold(affinity.new_ones(1, 1, hh, ww), 3, padding=1).view(
            1, NEIGHBOUR_SLOTS, hh, 1, ww, 1
        )
        weights = affinity.view(-1, hh, ww, NEIGHBOUR_SLOTS, h, w).permute(0, 3, 1, 4, 2, 5) * inside
        weights = weights.reshape(-1, NEIGHBOUR_SLOTS, hh * h, ww * w)[:, :, : size[0], : size[1]]
        return StokenAssociation(weights.float(), grid, self.stoken_size)


def _drop_official_fixed_banks(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Load-state-dict pre-hook: drop the official fixed banks from the dict, checking they are one-hot."""
    expected = torch.eye(NEIGHBOUR_SLOTS).view(NEIGHBOUR_SLOTS, 1, 3, 3)
    for name in _OFFICIAL_FIXED_BANKS:
        bank = state_dict.pop(prefix + name, None)
        if bank is None:
            continue
        if bank.shape != expected.shape or not torch.equal(bank.detach().cpu().float(), expected):
            error_msgs.append(
                f"{prefix + name}: expected the official StokenAttention's fixed one-hot (9, 1, 3, 3) bank, "
                f"got a tensor of shape {tuple(bank.shape)} with other values"
            )
