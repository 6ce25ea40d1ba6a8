"""The Super Token Attention block of STViT (position encoding, STA, convolutional FFN)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from sta_lightning.nn.sta import StokenAssociation, StokenAttention


class ResidualDepthwiseConv(nn.Module):
    """x + depthwise 3x3 conv(x) (with bias); (B, C, H, W) -> (B, C, H, W). Official parameter ``conv``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, eps 1e-6.

    Written here rather than torchvision's LayerNorm2d so the parameters keep the official ``.norm.`` keys.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvFFN(nn.Module):
    """1x1 expand to ``hidden`` channels, GELU, residual depthwise 3x3, 1x1 project; (B, C, H, W) in/out."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv = ResidualDepthwiseConv(hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.conv(self.act1(self.fc1(x))))


class STABlock(nn.Module):
    """STViT block on (B, C, H, W) maps, returning (B, C, H, W):

    x = x + DWConv3x3(x); x = x + drop_path(gamma_1 * STA(LayerNorm2d(x)));
    x = x + drop_path(gamma_2 * ConvFFN(BatchNorm2d(x))).

    Submodule names follow the official ``StokenAttentionLayer`` (``pos_embed``, ``norm1``, ``attn``,
    ``norm2``, ``mlp2``, ``gamma_1``/``gamma_2``), so its state dicts load directly. The layer-scale gammas
    (1, C, 1, 1) exist only when ``layer_scale`` is not None and start at that value. ``drop_path`` is the
    per-sample stochastic-depth rate of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        stoken_size: Sequence[int] = (8, 8),
        n_iter: int = 1,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.pos_embed = ResidualDepthwiseConv(dim)
        self.norm1 = LayerNorm2d(dim)
        self.attn = StokenAttention(dim, stoken_size, n_iter, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp2 = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = StochasticDepth(drop_path, mode="row")
        if layer_scale is not None:
            self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(
        self, x: Tensor, return_association: bool = False
    ) -> Tensor | tuple[Tensor, StokenAssociation | None]:
        """x (B, C, H, W) -> (B, C, H, W); with ``return_association`` also the attention's association."""
        x = self.pos_embed(x)
        attended = self.attn(self.norm1(x), return_association=return_association)
        attended, association = attended if return_association else (attended, None)
        x = x + self.drop_path(self._scaled(attended, self.gamma_1))
        x = x + self.drop_path(self._scaled(self.mlp2(self.norm2(x)), self.gamma_2))
        return (x, association) if return_association else x

    @torch.no_grad()
    def zero_residuals(self) -> None:
        """Zero the last layer of each residual branch (position encoding, STA projection, FFN output): the
        block becomes the identity, and those layers still get gradients, so the block learns from there."""
        for layer in (self.pos_embed.conv, self.attn.stoken_refine.proj, self.mlp2.fc2):
            layer.weight.zero_()
            layer.bias.zero_()

    @staticmethod
    def _scaled(branch: Tensor, gamma: Tensor | None) -> Tensor:
        return branch if gamma is None else gamma * branch
