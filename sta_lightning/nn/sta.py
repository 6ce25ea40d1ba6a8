"""Super Token Attention (Huang et al., "Vision Transformer with Super Token Sampling", CVPR 2023).

Computes the same function as the official ``StokenAttention`` (forward and gradients), with the same
learnable parameters, but with a layout chosen for speed: pixels are grouped per super-token cell once as
(B, M, C, P) (M = number of cells, P = pixels per cell), the 3x3 neighbourhood of the super-token map is
gathered with ``F.unfold`` and scattered back with ``F.fold``, and the refine MHSA runs through
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The official code divides by (affinity sum + 1e-12); we keep that eps and compute it in >= float32.
_EPS = 1e-12
_NEIGHBOURS = 9  # 3x3 super-token neighbourhood; slot k is the offset (k // 3 - 1, k % 3 - 1)
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
        qkv = self.qkv(x).view(b, self.num_heads, 3, self.head_dim, h * w)
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(2)  # each (B, heads, N, d)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return self.proj_drop(self.proj(out))


def _gather_neighbours(tokens: Tensor) -> Tensor:
    """(B, C, hh, ww) super-token map -> (B, M, C, 9): each cell's 3x3 neighbours, zeros outside the grid."""
    b, c, hh, ww = tokens.shape
    return F.unfold(tokens, 3, padding=1).view(b, c, _NEIGHBOURS, hh * ww).permute(0, 3, 1, 2)


def _scatter_neighbours(per_cell: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, M, C, 9) contributions of each cell to its 9 neighbours -> (B, C, hh, ww) sums per super token.

    Contributions to neighbours outside the grid are dropped (``F.fold`` is the adjoint of ``F.unfold``).
    """
    b, m, c, _ = per_cell.shape
    columns = per_cell.permute(0, 2, 3, 1).reshape(b, c * _NEIGHBOURS, m)
    return F.fold(columns, grid, 3, padding=1)


class StokenAttention(nn.Module):
    """Super Token Attention on (B, C, H, W) maps of any size, returning (B, C, H, W).

    Pixels are softly associated with the super tokens of the 3x3 cells around their own ``stoken_size`` cell
    (``n_iter`` rounds of association, the map zero-padded right/bottom to whole cells), the super tokens are
    refined by global MHSA and mapped back to pixels through the same association. As in the official code the
    association is never differentiated. ``stoken_size`` (1, 1) is plain global MHSA over all positions.
    Learnable parameters: ``stoken_refine.{qkv,proj}.{weight,bias}`` (official keys); official state dicts,
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

    def _associate(self, pixels: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Soft assignment of pixels (B, M, C, P) to the neighbour tokens of (B, C, hh, ww).

        Returns the affinity (B, M, P, 9) (softmax over the 9 slots, out-of-grid slots included with logit 0)
        and the affinity mass each super token receives, (B, 1, hh, ww).
        """
        logits = pixels.transpose(-1, -2) @ _gather_neighbours(tokens) * self.scale
        affinity = logits.softmax(-1)
        mass = _scatter_neighbours(affinity.sum(2).unsqueeze(2), tokens.shape[-2:])
        return affinity, mass

    def _stoken_forward(
        self, x: Tensor, return_association: bool
    ) -> Tensor | tuple[Tensor, StokenAssociation]:
        b, c, h0, w0 = x.shape
        h, w = self.stoken_size
        pad_bottom, pad_right = -h0 % h, -w0 % w
        if pad_bottom or pad_right:
            x = F.pad(x, (0, pad_right, 0, pad_bottom))
        hh, ww = x.shape[-2] // h, x.shape[-1] // w
        # Association and pooling run in >= float32 (fp16 would turn the 1e-12 eps into 0).
        work_dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            pixels = x.to(work_dtype).reshape(b, c, hh, h, ww, w).permute(0, 2, 4, 1, 3, 5)
            pixels = pixels.reshape(b, hh * ww, c, h * w)  # (B, M, C, P), w stays innermost
            frozen = pixels.detach()  # the association is never differentiated
            tokens = frozen.mean(-1).transpose(1, 2).reshape(b, c, hh, ww)  # block means, padding included
            for i in range(self.n_iter):
                affinity, mass = self._associate(frozen, tokens)
                if i < self.n_iter - 1:
                    tokens = _scatter_neighbours(frozen @ affinity, (hh, ww)) / (mass + _EPS)
            tokens = _scatter_neighbours(pixels @ affinity, (hh, ww)) / (mass + _EPS)
        tokens = self.stoken_refine(tokens.to(x.dtype))
        out = _gather_neighbours(tokens) @ affinity.transpose(-1, -2).to(tokens.dtype)  # (B, M, C, P)
        out = out.view(b, hh, ww, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh * h, ww * w)
        out = out[:, :, :h0, :w0]
        if not return_association:
            return out
        return out, self._association_map(affinity, (hh, ww), (h0, w0))

    def _association_map(
        self, affinity: Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> StokenAssociation:
        """Affinity (B, M, P, 9) -> StokenAssociation with (B, 9, H, W) weights, out-of-grid slots zeroed."""
        (h, w), (hh, ww) = self.stoken_size, grid
        inside = F.unfold(affinity.new_ones(1, 1, hh, ww), 3, padding=1).view(1, _NEIGHBOURS, hh, 1, ww, 1)
        weights = affinity.detach().view(-1, hh, ww, h, w, _NEIGHBOURS).permute(0, 5, 1, 3, 2, 4) * inside
        weights = weights.reshape(-1, _NEIGHBOURS, hh * h, ww * w)[:, :, : size[0], : size[1]]
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
    expected = torch.eye(_NEIGHBOURS).view(_NEIGHBOURS, 1, 3, 3)
    for name in _OFFICIAL_FIXED_BANKS:
        bank = state_dict.pop(prefix + name, None)
        if bank is None:
            continue
        if bank.shape != expected.shape or not torch.equal(bank.detach().cpu().float(), expected):
            error_msgs.append(
                f"{prefix + name}: expected the official StokenAttention's fixed one-hot (9, 1, 3, 3) bank, "
                f"got a tensor of shape {tuple(bank.shape)} with other values"
            )
