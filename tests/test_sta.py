"""StokenAttention against a naive dense float64 reference written from the algorithm's description.

The reference (section 5 of ../shared/docs/sta-reference.md) builds the dense masked pixel -> super-token
association Q (B, N, M) with one extra column holding the zero-logit mass of out-of-grid neighbours, pools S =
Q^T X / (colsum Q + 1e-12) with Q constant for autograd, refines S with a per-head loop over the grouped q|k|v
layout, and returns Q MHSA(S). It shares no code with the module (no unfold/fold, no SDPA)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sta_lightning.nn import StokenAssociation, StokenAttention


def reference_mhsa(tokens, params, num_heads, qk_scale=None):
    """tokens (B, N, C) -> (B, N, C): official grouped layout, head g owns qkv channels [3d*g, 3d*(g+1))."""
    b, n, c = tokens.shape
    d = c // num_heads
    qkv = tokens @ params["stoken_refine.qkv.weight"].flatten(1).T
    if "stoken_refine.qkv.bias" in params:
        qkv = qkv + params["stoken_refine.qkv.bias"]
    heads = []
    for g in range(num_heads):
        q, k, v = (qkv[..., (3 * g + i) * d : (3 * g + i + 1) * d] for i in range(3))
        logits = q @ k.transpose(1, 2) * (qk_scale or d**-0.5)  # (B, queries, keys)
        heads.append(logits.softmax(-1) @ v)
    out = torch.cat(heads, -1)
    return out @ params["stoken_refine.proj.weight"].flatten(1).T + params["stoken_refine.proj.bias"]


def neighbour_mask(hp, wp, h, w):
    """(N, M) bool: super token m is in the 3x3 cells around pixel n's cell; (N,) count of outside slots."""
    hh, ww = hp // h, wp // w
    cy, cx = (torch.arange(hp) // h)[:, None].expand(hp, wp).flatten(), (torch.arange(wp) // w).repeat(hp)
    ty, tx = torch.arange(hh)[:, None].expand(hh, ww).flatten(), torch.arange(ww).repeat(hh)
    mask = ((cy[:, None] - ty[None]).abs() <= 1) & ((cx[:, None] - tx[None]).abs() <= 1)
    return mask, 9 - mask.sum(1)


def dense_association(pixels, tokens, mask, outside):
    """pixels (B, N, C), tokens (B, M, C) -> Q (B, N, M): masked softmax, outside mass dropped."""
    logits = (pixels @ tokens.transpose(1, 2) * pixels.shape[-1] ** -0.5).masked_fill(~mask, -math.inf)
    outside_logit = torch.log(outside.to(pixels.dtype))[None, :, None].expand(pixels.shape[0], -1, 1)
    # `outside` zero logits folded into one column of logit log(count) (-inf when there are none)
    return torch.cat([logits, outside_logit], -1).softmax(-1)[..., :-1]


def reference_sta(x, params, stoken_size, n_iter, num_heads):
    """x (B, C, H, W) -> (out (B, C, H, W), Q (B, N, M) over the padded map)."""
    b, c, h0, w0 = x.shape
    h, w = stoken_size
    if (h, w) == (1, 1):
        out = reference_mhsa(x.flatten(2).transpose(1, 2), params, num_heads)
        return out.transpose(1, 2).reshape(b, c, h0, w0), None
    xp = F.pad(x, (0, -w0 % w, 0, -h0 % h))
    hp, wp = xp.shape[-2:]
    hh, ww = hp // h, wp // w
    pixels = xp.flatten(2).transpose(1, 2)  # (B, N, C)
    cell = torch.arange(hp)[:, None] // h * ww + torch.arange(wp)[None, :] // w
    members = F.one_hot(cell.flatten(), hh * ww).to(x.dtype)  # (N, M)
    mask, outside = neighbour_mask(hp, wp, h, w)
    with torch.no_grad():
        tokens = members.T @ pixels / (h * w)  # block means, padded zeros included
        for _ in range(n_iter):
            q = dense_association(pixels, tokens, mask, outside)
            tokens = q.transpose(1, 2) @ pixels / (q.sum(1)[..., None] + 1e-12)
    tokens = q.transpose(1, 2) @ pixels / (q.sum(1)[..., None] + 1e-12)
    out = q @ reference_mhsa(tokens, params, num_heads)
    return out.transpose(1, 2).reshape(b, c, hp, wp)[:, :, :h0, :w0], q


def random_module(dim, stoken_size, n_iter, num_heads, qkv_bias, seed=0, pixel_layout="auto"):
    torch.manual_seed(seed)
    module = StokenAttention(dim, stoken_size, n_iter, num_heads, qkv_bias, pixel_layout=pixel_layout)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def structured_input(b, c, h, w, seed=1):
    """Smooth spatial structure plus noise, so associations are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.randn(b, c, 3, 3, generator=g, dtype=torch.float64), (h, w), mode="bilinear")
    return 2.0 * base + 0.5 * torch.randn(b, c, h, w, generator=g, dtype=torch.float64)


CASES = [  # (B, C, H, W, stoken, n_iter, heads, qkv_bias)
    (1, 16, 16, 16, (8, 8), 1, 4, False),
    (2, 16, 13, 19, (4, 4), 1, 2, True),
    (1, 16, 13, 19, (4, 4), 2, 4, False),
    (1, 24, 21, 10, (8, 4), 2, 3, True),
    (1, 8, 20, 20, (8, 8), 3, 2, True),
    (2, 8, 5, 6, (8, 8), 1, 1, False),
    (2, 16, 6, 7, (1, 1), 1, 4, True),
]


@pytest.mark.parametrize("layout", ["rows", "cells"])
@pytest.mark.parametrize(("b", "c", "h", "w", "stoken", "n_iter", "heads", "qkv_bias"), CASES)
def test_matches_dense_reference_forward_and_gradients(b, c, h, w, stoken, n_iter, heads, qkv_bias, layout):
    module = random_module(c, stoken, n_iter, heads, qkv_bias, pixel_layout=layout)
    params = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}
    x = structured_input(b, c, h, w).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    out = module(x)
    (out * upstream).sum().backward()
    expected, _ = reference_sta(x_ref, params, stoken, n_iter, heads)
    (expected * upstream).sum().backward()

    assert out.shape == (b, c, h, w)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-10)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=0, atol=1e-10, msg=name)


def test_auto_layout_is_rows_in_eager_float32_cpu_runs_and_cells_elsewhere():
    module = StokenAttention(16, (4, 4), num_heads=2)
    assert module.layout(torch.empty(1, 16, 8, 8)) == "rows"
    assert module.layout(torch.empty(1, 16, 8, 8, dtype=torch.float64)) == "rows"
    assert module.layout(torch.empty(1, 16, 8, 8, device="meta")) == "cells"  # any other device
    assert module.layout(torch.empty(1, 16, 8, 8, dtype=torch.bfloat16)) == "cells"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.layout(torch.empty(1, 16, 8, 8)) == "cells"
    for forced in ("rows", "cells", "triton"):
        module = StokenAttention(16, (4, 4), num_heads=2, pixel_layout=forced)
        assert module.layout(torch.empty(1, 16, 8, 8, dtype=torch.bfloat16)) == forced
    with pytest.raises(ValueError, match="pixel_layout"):
        StokenAttention(16, (4, 4), pixel_layout="chunks")


def test_rows_and_cells_layouts_agree_in_float32_on_a_detector_sized_map():
    """The two layouts on an 8x8-cell map with padding: equal outputs and gradients to float32 rounding."""
    torch.manual_seed(0)
    rows = StokenAttention(32, (8, 8), num_heads=4, qkv_bias=True, pixel_layout="rows")
    cells = StokenAttention(32, (8, 8), num_heads=4, qkv_bias=True, pixel_layout="cells")
    cells.load_state_dict(rows.state_dict())
    x = (3 * torch.randn(2, 32, 37, 45)).requires_grad_()
    upstream = torch.randn(2, 32, 37, 45)
    results = []
    for module in (rows, cells):
        out, association = module(x, return_association=True)
        (out * upstream).sum().backward()
        results.append((out, association.weights, x.grad, module.stoken_refine.qkv.weight.grad))
        x.grad = None
    for name, expected, actual in zip(("out", "association", "x.grad", "qkv.grad"), *results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", ["rows", "cells"])
def test_association_matches_dense_q_and_sums_to_one_minus_outside_mass(layout):
    b, c, h, w, stoken = 2, 8, 13, 19, (4, 4)
    module = random_module(c, stoken, 2, 2, True, pixel_layout=layout)
    x = structured_input(b, c, h, w)
    params = dict(module.named_parameters())
    with torch.no_grad():
        out, association = module(x, return_association=True)
        expected, q = reference_sta(x, params, stoken, 2, 2)
    torch.testing.assert_close(out, module(x))
    assert isinstance(association, StokenAssociation)
    assert association.grid == (4, 5) and association.stoken_size == stoken
    weights = association.weights
    assert weights.shape == (b, 9, h, w) and weights.dtype == torch.float32 and not weights.requires_grad

    # Scatter the 9 slots into the dense (B, N, M) layout of the padded map and compare with Q.
    hh, ww = association.grid
    dense = torch.zeros(b, hh * 4, ww * 4, hh * ww, dtype=torch.float64)
    for k in range(9):
        for y in range(h):
            for x_ in range(w):
                ty, tx = y // 4 + k // 3 - 1, x_ // 4 + k % 3 - 1
                if 0 <= ty < hh and 0 <= tx < ww:
                    dense[:, y, x_, ty * ww + tx] = weights[:, k, y, x_].double()
                else:
                    assert torch.all(weights[:, k, y, x_] == 0)
    q_cropped = q.view(b, hh * 4, ww * 4, -1)[:, :h, :w]
    torch.testing.assert_close(dense[:, :h, :w], q_cropped, rtol=0, atol=1e-6)

    sums = weights.sum(1)
    assert torch.all(sums <= 1 + 1e-6)
    assert torch.all(sums[:, 4:8, 4:8] > 1 - 1e-6)  # an interior cell has all 9 neighbours
    assert torch.all(sums[:, :4, :4] < 1)  # a corner cell loses the mass of its 5 outside slots
    torch.testing.assert_close(sums.double(), q_cropped.sum(-1), rtol=0, atol=1e-6)


def test_global_path_returns_no_association():
    module = StokenAttention(16, (1, 1), num_heads=4)
    x = torch.randn(1, 16, 5, 7)
    out, association = module(x, return_association=True)
    assert association is None
    torch.testing.assert_close(out, module(x))


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="n_iter"):
        StokenAttention(16, (4, 4), n_iter=0)
    with pytest.raises(ValueError, match="stoken_size"):
        StokenAttention(16, (0, 4))
    with pytest.raises(ValueError, match="num_heads"):
        StokenAttention(16, (4, 4), num_heads=3)


def official_state_dict(module):
    """Our parameters under their official keys plus the official fixed one-hot unfold/fold banks."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    bank = torch.eye(9).view(9, 1, 3, 3)
    return {"unfold.weights": bank.clone(), "fold.weights": bank.clone(), **state}


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_loads_official_state_dict_strict_and_round_trips(qkv_bias):
    source = StokenAttention(32, (4, 4), num_heads=4, qkv_bias=qkv_bias)
    expected_keys = {"stoken_refine.qkv.weight", "stoken_refine.proj.weight", "stoken_refine.proj.bias"}
    assert set(source.state_dict()) == expected_keys | ({"stoken_refine.qkv.bias"} if qkv_bias else set())
    assert source.state_dict()["stoken_refine.qkv.weight"].shape == (96, 32, 1, 1)

    official = official_state_dict(source)
    target = StokenAttention(32, (4, 4), num_heads=4, qkv_bias=qkv_bias)
    target.load_state_dict(official, strict=True)
    assert set(official) >= {"unfold.weights", "fold.weights"}  # the caller's dict is left untouched
    x = torch.randn(1, 32, 9, 11)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)

    again = StokenAttention(32, (4, 4), num_heads=4, qkv_bias=qkv_bias)
    again.load_state_dict(target.state_dict(), strict=True)
    torch.testing.assert_close(again(x), source(x), rtol=0, atol=0)


def test_rejects_official_dict_with_altered_fixed_bank():
    module = StokenAttention(16, (4, 4), num_heads=2)
    state = official_state_dict(module)
    state["fold.weights"] = torch.ones(9, 1, 3, 3)
    with pytest.raises(RuntimeError, match="fold.weights"):
        module.load_state_dict(state)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize(("stoken", "layout"), [((4, 4), "rows"), ((4, 4), "cells"), ((1, 1), "auto")])
def test_autocast_is_finite_and_close_to_float32(dtype, tolerance, stoken, layout):
    torch.manual_seed(0)
    module = StokenAttention(32, stoken, n_iter=2, num_heads=4, qkv_bias=True, pixel_layout=layout)
    x = (4.0 * torch.randn(2, 32, 11, 13)).requires_grad_()
    reference = module(x)
    reference.square().mean().backward()
    reference_grad = x.grad.clone()
    x.grad = None
    with torch.autocast("cpu", dtype=dtype):
        out = module(x)
        out.float().square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    scale = reference.abs().max()
    assert (out.float() - reference).abs().max() <= tolerance * scale
    assert (x.grad - reference_grad).abs().max() <= 4 * tolerance * reference_grad.abs().max()


@pytest.mark.parametrize("layout", ["rows", "cells"])
def test_bfloat16_module_keeps_bfloat16_and_stays_close_to_float32(layout):
    """A bfloat16 module on bfloat16 maps returns bfloat16; the softmax, mass and eps run in float32."""
    torch.manual_seed(0)
    module = StokenAttention(32, (4, 4), n_iter=2, num_heads=4, qkv_bias=True, pixel_layout=layout)
    x = (4.0 * torch.randn(2, 32, 11, 13)).requires_grad_()
    reference = module(x)
    reference.square().mean().backward()
    reference_grad = x.grad
    x_half = x.detach().bfloat16().requires_grad_()
    out = module.bfloat16()(x_half)
    out.float().square().mean().backward()
    assert out.dtype == x_half.grad.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= 3e-2 * reference.abs().max()
    assert (x_half.grad.float() - reference_grad).abs().max() <= 4e-2 * reference_grad.abs().max()


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_torch_compile_fullgraph_matches_eager(autocast):
    """Compiled (the cells layout, as on GPUs) against eager, forward and backward, in float32 and under
    bfloat16 autocast (the products in bfloat16 both ways)."""
    torch.manual_seed(0)
    module = StokenAttention(16, (4, 4), n_iter=2, num_heads=2, qkv_bias=True, pixel_layout="cells")
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 16, 10, 13, requires_grad=True)
    results = []
    for run in (compiled, module):
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            out, association = run(x, return_association=True)
        out.float().sum().backward()
        results.append((out, association.weights, x.grad))
        x.grad = None
    assert results[0][0].dtype == (autocast or torch.float32)
    for name, actual, expected in zip(("out", "association", "x.grad"), *results, strict=True):
        torch.testing.assert_close(actual, expected, msg=name)


def test_inductor_compile_and_torch_export_match_eager():
    torch.manual_seed(0)
    module = StokenAttention(16, (4, 4), n_iter=2, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(1, 16, 10, 13)
    with torch.no_grad():
        expected = module(x)
        compiled = torch.compile(module, fullgraph=True)(x)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-6, atol=1e-6)
