"""The "triton" pixel layout of STA (``sta_lightning.nn.sta_triton``) against the dense float64 reference
and the cells layout: natively on a CUDA GPU; without one, on the CPU under Triton's interpreter. The
interpreter is chosen when the kernels are defined (``TRITON_INTERPRET=1`` at import), so on the CPU one test
runs this file again in a subprocess with it set. The interpreter's bfloat16 products are wrong (a Triton
limitation), so bfloat16 is checked on CUDA only."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sta import CASES, random_module, reference_sta, structured_input

from sta_lightning.models import DEFAULT_STA, YOLOv8, YOLOv8Loss
from sta_lightning.nn import StokenAttention, set_pixel_layout

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED, reason="on the CPU this runs in the interpreter's subprocess"
)


def test_kernels_under_the_interpreter_on_the_cpu():
    if DEVICE == "cuda" or INTERPRETED:
        pytest.skip("the kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


@kernels
@pytest.mark.parametrize(("b", "c", "h", "w", "stoken", "n_iter", "heads", "qkv_bias"), CASES[:-1])
def test_matches_dense_reference_forward_and_gradients_in_float64(
    b, c, h, w, stoken, n_iter, heads, qkv_bias
):
    module = random_module(c, stoken, n_iter, heads, qkv_bias, pixel_layout="triton").to(DEVICE)
    params = {name: p.detach().clone().cpu().requires_grad_() for name, p in module.named_parameters()}
    x_ref = structured_input(b, c, h, w).requires_grad_()
    x = x_ref.detach().to(DEVICE).requires_grad_()
    upstream = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    out = module(x)
    (out * upstream.to(DEVICE)).sum().backward()
    expected, _ = reference_sta(x_ref, params, stoken, n_iter, heads)
    (expected * upstream).sum().backward()

    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=0, atol=1e-10)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), params[name].grad, rtol=0, atol=1e-9, msg=name)


HALF = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_cells_layout_with_its_association(dtype, channels_last):
    """Outputs, input gradients and association weights as the cells layout's, in the module's dtype (C=80:
    a partial channel block; 3x5 cells: a partial pixel block; 14x17: a padded map)."""
    torch.manual_seed(0)
    cells = StokenAttention(80, (3, 5), n_iter=2, num_heads=4, qkv_bias=True, pixel_layout="cells")
    triton = StokenAttention(80, (3, 5), n_iter=2, num_heads=4, qkv_bias=True, pixel_layout="triton")
    triton.load_state_dict(cells.state_dict())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 80, 14, 17).to(DEVICE, dtype, memory_format=memory_format)
    upstream = torch.randn(2, 80, 14, 17, device=DEVICE)
    results = []
    for module in (cells, triton):
        module.to(DEVICE, dtype)
        inputs = x.clone().requires_grad_()
        out, association = module(inputs, return_association=True)
        (out.float() * upstream).sum().backward()
        results.append((out.float(), inputs.grad.float(), association.weights))
    (out, grad, weights), (out_triton, grad_triton, weights_triton) = results
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out_triton, out, rtol=0, atol=tolerance * out.abs().max().item())
    torch.testing.assert_close(grad_triton, grad, rtol=0, atol=tolerance * grad.abs().max().item())
    torch.testing.assert_close(weights_triton, weights, rtol=0, atol=tolerance)


@kernels
def test_autocast_runs_the_products_in_the_autocast_dtype():
    torch.manual_seed(0)
    module = StokenAttention(32, (4, 4), num_heads=4, pixel_layout="triton").to(DEVICE)
    x = torch.randn(1, 32, 16, 16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out, association = module(x, return_association=True)
    reference = StokenAttention(32, (4, 4), num_heads=4, pixel_layout="cells").to(DEVICE)
    reference.load_state_dict(module.state_dict())
    with torch.autocast(DEVICE, dtype=torch.float16):
        expected, _ = reference(x, return_association=True)
    assert association.weights.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=4e-3 * expected.abs().max().item())


@kernels
def test_cells_over_the_limit_are_refused_with_the_layout_to_use():
    module = StokenAttention(16, (33, 32), num_heads=2, pixel_layout="triton").to(DEVICE)
    with pytest.raises(ValueError, match=r"at most 1024 pixels, got \(33, 32\).*'cells'"):
        module(torch.randn(1, 16, 33, 32, device=DEVICE))


@kernels
def test_a_detector_training_step_matches_the_cells_layout():
    """YOLOv8n with the default STA at 96 px (a padded 6x6 P4 map): loss and every gradient, to float32
    rounding (the rows layout differs from the cells one by 5e-6 of the largest gradient here)."""
    torch.manual_seed(0)
    cells = set_pixel_layout(YOLOv8("n", 3, DEFAULT_STA), "cells").to(DEVICE).train()
    triton = set_pixel_layout(copy.deepcopy(cells), "triton")
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    targets = {
        "bboxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 90.0, 80.0]], device=DEVICE),
        "cls": torch.tensor([0, 2], device=DEVICE),
        "batch_idx": torch.tensor([0, 1], device=DEVICE),
    }
    loss = YOLOv8Loss(3)
    totals = []
    for model in (cells, triton):
        total, _ = loss(model(images), targets)
        total.backward()
        totals.append(total.detach())
    torch.testing.assert_close(totals[1], totals[0], rtol=1e-5, atol=0)
    largest = max(p.grad.abs().max().item() for p in cells.parameters() if p.grad is not None)
    for (name, p), q in zip(cells.named_parameters(), triton.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=2e-5 * largest, msg=name)


def test_outside_cuda_the_layout_is_refused_and_traced_graphs_take_the_cells_layout():
    module = StokenAttention(16, (4, 4), num_heads=2, pixel_layout="triton").eval()
    x = torch.randn(1, 16, 12, 12)
    if not INTERPRETED:
        with pytest.raises(ValueError, match="runs on CUDA tensors, got a cpu tensor"):
            module(x)
    # a graph cannot hold the kernels: the same function in cells (no eager check run: that would refuse)
    traced = torch.jit.trace(module, x, check_trace=False)
    cells = StokenAttention(16, (4, 4), num_heads=2, pixel_layout="cells").eval()
    cells.load_state_dict(module.state_dict())
    torch.testing.assert_close(traced(x), cells(x), rtol=0, atol=0)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter replaces the kernels")
@pytest.mark.parametrize("work", ["fp32", "fp16", "bf16"])
def test_kernels_compile_for_cuda_without_a_gpu(work):
    """Triton compiles both kernels to sm_80 and sm_90 machine code (its bundled ptxas; no GPU needed), so
    the code the interpreter ran lowers as written; half-precision products use the tensor cores (mma.sync,
    wgmma), float32 ones full-precision FMA (no TF32)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from sta_lightning.nn import sta_triton

    def signature(kernel, pointers: dict[str, str]) -> dict[str, str]:
        kinds = {"scale": "fp32"}
        return {
            name: pointers.get(name) or kinds.get(name) or ("constexpr" if name.isupper() else "i32")
            for name in kernel.arg_names
        }

    pointers = {
        "image_ptr": "*fp32",
        "tokens_ptr": "*fp32",
        "affinity_ptr": f"*{work}",
        "pooled_ptr": "*fp32",
    }
    pointers |= {"mass_ptr": "*fp32", "out_ptr": "*fp32"}
    sources = [
        ASTSource(sta_triton._pool_kernel, signature(sta_triton._pool_kernel, pointers), constants)
        for constants in (
            {"ASSOCIATE": True, "BLOCK_C": 64, "BLOCK_P": 64},
            {"ASSOCIATE": False, "BLOCK_C": 32, "BLOCK_P": 16},
        )
    ]
    sources.append(
        ASTSource(
            sta_triton._unpool_kernel,
            signature(sta_triton._unpool_kernel, pointers),
            {"BLOCK_C": 64, "BLOCK_P": 64},
        )
    )
    for capability in (80, 90):
        for source in sources:
            ptx = compile(source, target=GPUTarget("cuda", capability, 32)).asm["ptx"]
            tensor_cores = "mma.sync" in ptx or "wgmma.mma_async" in ptx  # Ampere's or Hopper's
            assert tensor_cores == (work != "fp32"), (capability, source.fn.__name__)
