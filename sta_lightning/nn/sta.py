"""Super Token Attention (Huang et al., "Vision Transformer with Super Token Sampling", CVPR 2023).

Computes the same function as the official ``StokenAttention`` (forward and gradients), with the same
learnable parameters, but laid out for speed: the pixel-level work (association, pooling into super tokens,
mapping back) runs as a pair of adjoint custom autograd Functions in one of two layouts
(``sta_lightning.nn.sta_pixels``: "rows" for eager CPU work, "cells" on GPUs and under compile or export),
and the refine MHSA runs through ``F.scaled_dot_product_attention`` on the super tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sta_lightning.nn import sta_pixels
from sta_lightning.nn.sta_pixels import NEIGHBOUR_SLOTS

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
        self.logit_scale = qk_scale or self.head_dim**-0.5  # same `or` semantics as the official code
        self.attn_drop = attn_drop
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return self.attend(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(b, c, h, w)

    def attend(self, tokens: Tensor) -> Tensor:
        """The same attention on tokens (B, N, C) -> (B, N, C)."""
        b, n, c = tokens.shape
        # The 1x1 convs run as F.linear on the (B, N, C) tokens: one GEMM each, no layout copies.
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = qkv.view(b, n, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.logit_scale
        )
        out = F.linear(out.transpose(1, 2).reshape(b, n, c), self.proj.weight.flatten(1), self.proj.bias)
        return self.proj_drop(out)


def _run(function: type[torch.autograd.Function], forward: Callable[..., Any], *args: Any) -> Any:
    """``function.apply(*args)``, or ``forward(*args)`` (its forward, the same values) under torch.jit.trace,
    which records custom autograd Functions as Python calls that TorchScript cannot save."""
    return forward(*args) if torch.jit.is_tracing() else function.apply(*args)


PixelLayout = Literal["auto", "rows", "cells", "triton"]
PIXEL_LAYOUTS: tuple[str, ...] = get_args(PixelLayout)


def _check_layout(layout: str) -> None:
    if layout not in PIXEL_LAYOUTS:
        raise ValueError(f"pixel_layout must be one of {PIXEL_LAYOUTS}, got {layout!r}")


def set_pixel_layout(model: nn.Module, layout: str) -> nn.Module:
    """Every ``StokenAttention`` in ``model`` runs its pixel-level work in ``layout`` (one of
    ``PIXEL_LAYOUTS``; the same function in each); returns ``model``."""
    _check_layout(layout)
    for module in model.modules():
        if isinstance(module, StokenAttention):
            module.pixel_layout = layout
    return model


def _sta_triton() -> ModuleType:
    """``sta_lightning.nn.sta_triton``, imported on first use: Triton comes with CUDA builds of torch only."""
    try:
        from sta_lightning.nn import sta_triton as module
    except ImportError as error:
        raise ImportError(
            f"pixel_layout 'triton' needs the triton package (it comes with CUDA builds of torch): {error}"
        ) from error
    return module


def _work_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the pixel-level products: autocast's where it is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class StokenAttention(nn.Module):
    """Super Token Attention on (B, C, H, W) maps of any size, returning (B, C, H, W).

    Pixels are softly associated with the super tokens of the 3x3 cells around their own ``stoken_size`` cell
    (``n_iter`` rounds of association, the map zero-padded right/bottom to whole cells), the super tokens are
    refined by global MHSA and mapped back to pixels through the same association. As in the official code the
    association is never differentiated. ``stoken_size`` (1, 1) is plain global MHSA over all positions.
    Learnable parameters: ``stoken_refine.qkv.weight``, ``stoken_refine.qkv.bias`` (with ``qkv_bias``),
    ``stoken_refine.proj.{weight,bias}`` (official keys); official state dicts,
    which also hold the fixed ``unfold.weights``/``fold.weights`` banks, load with ``strict=True``.

    ``pixel_layout`` picks how the pixel-level work runs (``sta_lightning.nn.sta_pixels``; the same function):
    ``"rows"`` (no copies of the map), ``"cells"`` (one pass over a per-cell copy) or ``"auto"``: rows for
    eager float32/float64 work on CPU, cells otherwise (GPUs, ``torch.compile``, ``torch.export``, tracing,
    float16/bfloat16 or autocast), so an exported or compiled module computes what its eager run on the same
    device and dtype does when that is half precision, and equals it to rounding in float32. ``"triton"``:
    the cells layout's work as fused Triton kernels (``sta_lightning.nn.sta_triton``) in eager CUDA runs (the
    cells layout under ``torch.compile``, ``torch.export`` and tracing), opt-in until a GPU measurement
    decides whether ``"auto"`` should pick it there.
    Precision: the pixel-level products run in the input's dtype, or in the autocast dtype where autocast is
    on for the input's device (float16/bfloat16 matrix units); the softmax, the affinity sums, the 1e-12 eps
    and the super tokens stay in >= float32 (in float16 the official eps would be 0). A forced rows layout
    runs everything in >= float32 and returns the input's dtype.
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
        pixel_layout: str = "auto",
    ) -> None:
        super().__init__()
        stoken_size = tuple(int(s) for s in stoken_size)
        if len(stoken_size) != 2 or min(stoken_size) < 1:
            raise ValueError(f"stoken_size must be two positive ints (h, w), got {stoken_size}")
        if int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1 (number of association rounds), got {n_iter}")
        _check_layout(pixel_layout)
        self.stoken_size: tuple[int, int] = stoken_size
        self.n_iter = int(n_iter)
        self.pixel_layout = pixel_layout
        self.logit_scale = dim**-0.5  # association logits' scale: full channel width, as in the official code
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

    def layout(self, x: Tensor) -> str:
        """The pixel layout a forward on ``x`` runs in: rows, cells or triton (see the class docstring)."""
        graph = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if self.pixel_layout == "triton":
            return "cells" if graph else "triton"
        if self.pixel_layout != "auto":
            return self.pixel_layout
        eager_cpu = x.device.type == "cpu" and not graph
        return "rows" if eager_cpu and _work_dtype(x) in (torch.float32, torch.float64) else "cells"

    def _stoken_forward(
        self, x: Tensor, return_association: bool
    ) -> Tensor | tuple[Tensor, StokenAssociation]:
        h0, w0 = x.shape[-2:]
        h, w = self.stoken_size
        pad_bottom, pad_right = -h0 % h, -w0 % w
        if pad_bottom or pad_right:
            x = F.pad(x, (0, pad_right, 0, pad_bottom))
        grid = (x.shape[-2] // h, x.shape[-1] // w)
        device = x.device.type
        # both depend on autocast: decided before the pixel-level work switches it off
        layout, dtype = self.layout(x), _work_dtype(x)
        with torch.autocast(device, enabled=False):
            if layout == "rows":
                tokens, affinity, _ = sta_pixels.RowPool.apply(
                    x, self.n_iter, self.logit_scale, self.stoken_size
                )
            elif layout == "triton":
                tokens, affinity, _ = _sta_triton().TritonPool.apply(
                    x, self.n_iter, self.logit_scale, self.stoken_size, dtype
                )
            else:
                tokens, affinity, _ = _run(
                    sta_pixels.CellPool,
                    sta_pixels.cell_pool,
                    x,
                    self.n_iter,
                    self.logit_scale,
                    self.stoken_size,
                    dtype,
                )
        tokens = self.stoken_refine.attend(tokens.to(x.dtype))
        with torch.autocast(device, enabled=False):
            if layout == "rows":  # computed in >= float32; returned in the input's dtype
                out = sta_pixels.RowUnpool.apply(tokens, affinity, x.shape[-2:]).to(x.dtype)
            elif layout == "triton":
                out = _sta_triton().TritonUnpool.apply(tokens, affinity, self.stoken_size, grid)
            else:
                out = _run(
                    sta_pixels.CellUnpool, sta_pixels.cell_unpool, tokens, affinity, self.stoken_size, grid
                )
        out = out[:, :, :h0, :w0]
        if not return_association:
            return out
        slot_weights = sta_pixels.row_slot_weights if layout == "rows" else sta_pixels.cell_slot_weights
        return out, self._association(slot_weights(affinity, self.stoken_size, grid), grid, (h0, w0))

    def _association(
        self, weights: Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> StokenAssociation:
        """(B, 9, hh*h, ww*w) slot weights -> StokenAssociation: out-of-grid slots zeroed, cropped."""
        (h, w), (hh, ww) = self.stoken_size, grid
        inside = F.unfold(weights.new_ones(1, 1, hh, ww), 3, padding=1).view(1, NEIGHBOUR_SLOTS, hh, 1, ww, 1)
        weights = weights.view(-1, NEIGHBOUR_SLOTS, hh, h, ww, w) * inside
        weights = weights.view(-1, NEIGHBOUR_SLOTS, hh * h, ww * w)[:, :, : size[0], : size[1]]
        return StokenAssociation(weights.float().detach(), grid, self.stoken_size)


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
