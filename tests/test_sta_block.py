"""STABlock: the block formula, official key names, gradients, layer scale and drop path."""

import pytest
import torch
import torch.nn.functional as F

from sta_lightning.nn import STABlock


def randomised(block):
    """Random weights and BN statistics so that every branch contributes."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
        block.norm2.running_mean.normal_(0.0, 0.5)
        block.norm2.running_var.uniform_(0.5, 2.0)
    return block


def test_eval_forward_follows_the_block_formula():
    block = randomised(STABlock(16, (4, 4), num_heads=2, mlp_ratio=2.0, layer_scale=0.5)).double().eval()
    x = torch.randn(2, 16, 11, 9, dtype=torch.float64)

    x1 = x + F.conv2d(x, block.pos_embed.conv.weight, block.pos_embed.conv.bias, padding=1, groups=16)
    normed = F.layer_norm(x1.permute(0, 2, 3, 1), (16,), block.norm1.norm.weight, block.norm1.norm.bias, 1e-6)
    x2 = x1 + block.gamma_1 * block.attn(normed.permute(0, 3, 1, 2))
    bn = block.norm2
    y = F.batch_norm(x2, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    mlp = block.mlp2
    hidden = F.gelu(F.conv2d(y, mlp.fc1.weight, mlp.fc1.bias))
    hidden = hidden + F.conv2d(hidden, mlp.conv.conv.weight, mlp.conv.conv.bias, padding=1, groups=32)
    expected = x2 + block.gamma_2 * F.conv2d(hidden, mlp.fc2.weight, mlp.fc2.bias)

    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-12)


def official_block_keys(dim, hidden, layer_scale):
    keys = {
        "pos_embed.conv.weight": (dim, 1, 3, 3),
        "pos_embed.conv.bias": (dim,),
        "norm1.norm.weight": (dim,),
        "norm1.norm.bias": (dim,),
        "attn.stoken_refine.qkv.weight": (3 * dim, dim, 1, 1),
        "attn.stoken_refine.qkv.bias": (3 * dim,),
        "attn.stoken_refine.proj.weight": (dim, dim, 1, 1),
        "attn.stoken_refine.proj.bias": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "norm2.running_mean": (dim,),
        "norm2.running_var": (dim,),
        "norm2.num_batches_tracked": (),
        "mlp2.fc1.weight": (hidden, dim, 1, 1),
        "mlp2.fc1.bias": (hidden,),
        "mlp2.conv.conv.weight": (hidden, 1, 3, 3),
        "mlp2.conv.conv.bias": (hidden,),
        "mlp2.fc2.weight": (dim, hidden, 1, 1),
        "mlp2.fc2.bias": (dim,),
    }
    if layer_scale:
        keys |= {"gamma_1": (1, dim, 1, 1), "gamma_2": (1, dim, 1, 1)}
    return keys


@pytest.mark.parametrize("layer_scale", [None, 1e-5])
def test_state_dict_uses_official_keys_and_loads_official_dict_strictly(layer_scale):
    block = STABlock(32, (8, 8), num_heads=4, layer_scale=layer_scale)
    expected = official_block_keys(32, 128, layer_scale)
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == expected

    official = {k: v.clone() for k, v in randomised(block).state_dict().items()}
    official["attn.unfold.weights"] = torch.eye(9).view(9, 1, 3, 3)
    official["attn.fold.weights"] = torch.eye(9).view(9, 1, 3, 3)
    target = STABlock(32, (8, 8), num_heads=4, layer_scale=layer_scale)
    target.load_state_dict(official, strict=True)
    x = torch.randn(1, 32, 12, 10)
    torch.testing.assert_close(target.eval()(x), block.eval()(x), rtol=0, atol=0)


def test_odd_sizes_gradients_reach_every_parameter_and_association_passes_through():
    block = STABlock(16, (4, 4), n_iter=2, num_heads=2, layer_scale=1e-2)
    x = torch.randn(2, 16, 13, 7, requires_grad=True)
    out, association = block(x, return_association=True)
    assert out.shape == x.shape
    assert association.weights.shape == (2, 9, 13, 7) and association.grid == (4, 2)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_global_attention_block_returns_no_association():
    block = STABlock(16, (1, 1), num_heads=4).eval()
    out, association = block(torch.randn(1, 16, 5, 6), return_association=True)
    assert out.shape == (1, 16, 5, 6) and association is None


def test_layer_scale_gammas():
    assert STABlock(16, (4, 4), num_heads=2).gamma_1 is None
    block = STABlock(16, (4, 4), num_heads=2, layer_scale=0.0).eval()
    assert torch.all(block.gamma_1 == 0) and torch.all(block.gamma_2 == 0)
    x = torch.randn(1, 16, 8, 8)
    # Zero gammas switch both residual branches off: only the position encoding remains.
    torch.testing.assert_close(block(x), block.pos_embed(x), rtol=0, atol=0)


def test_drop_path_drops_whole_samples_in_training_only():
    block = randomised(STABlock(16, (4, 4), num_heads=2, drop_path=1.0))
    x = torch.randn(3, 16, 8, 8)
    reference = randomised(STABlock(16, (4, 4), num_heads=2)).eval()
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), reference(x))  # eval: drop path is the identity
        torch.testing.assert_close(block.train()(x), block.pos_embed(x), rtol=0, atol=0)
