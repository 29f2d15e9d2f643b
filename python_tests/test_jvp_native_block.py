"""The native adaLN block op (``adaln_block_jvp_cuda``, csrc/blocks) that facm_ext.jvp runs for a verified DiT /
LightningDiT block without grad, on CUDA under autocast.

GPU: blocks and whole tiny models under bf16 autocast with fp32 parameters, without grad: the native path's primal
and tangent against a float64 ``torch.func.jvp`` of the same block (math attention), within the bf16 tolerance or
twice the error of ``torch.func.jvp`` in the same precision, whichever is larger, and against the per-op path
(FACM_EXT_NATIVE_BLOCKS=0); odd token counts, a non-contiguous x, no tangent on c; the report names the op once per
block; with grad, the primal is the block's own forward (bit for bit) and its gradients (x, c, every parameter) are
checked against float64 and the per-op path; the cases where the per-op path must run instead (a head dim whose
default attention kernel is Triton, bf16 parameters, the switch, a forward hook, more rows than the auto mode's
limit); the op's own argument errors
and ``torch.library.opcheck``. CPU: the per-op path runs (the op is CUDA-only) and the report does not name it; a bad
value of the switch is a ValueError.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import facm_ext
from facm_ext import _extension
from facm_ext.jvp import JVPReport
from facm_ext.models import DiT, LightningDiT
from facm_ext.models.dit import DiTBlock
from facm_ext.models.lightningdit import LightningDiTBlock, VisionRotaryEmbedding2D

from conftest import REL_TOL, randomize_weights, rel_err, requires_cuda

F64, BF16 = torch.float64, torch.bfloat16
OP = "adaln_block_jvp_cuda"


def _block(kind: str, channels: int, heads: int, grid: int, seed: int = 0):
    """(block, rope module or None) with fp32 parameters on the CPU. "dit_affine": DiT with LayerNorms that have a
    weight (no bias), a form the block rule fuses too."""
    if kind == "lightningdit":
        block = LightningDiTBlock(channels, heads, use_qknorm=True, use_swiglu=True, use_rmsnorm=True)
        rope = VisionRotaryEmbedding2D(channels // heads, grid)
    else:
        block, rope = DiTBlock(channels, heads), None
        if kind == "dit_affine":
            block.norm1 = torch.nn.LayerNorm(channels, eps=1e-6, bias=False)
            block.norm2 = torch.nn.LayerNorm(channels, eps=1e-6, bias=False)
    return randomize_weights(block, seed), rope


def _inputs(batch: int, tokens: int, channels: int, seed: int, device):
    gen = torch.Generator().manual_seed(seed + 1)
    x, tx = torch.randn(batch, tokens, channels, generator=gen), torch.randn(batch, tokens, channels, generator=gen)
    c, tc = torch.randn(batch, channels, generator=gen), torch.randn(batch, channels, generator=gen)
    return tuple(t.to(device) for t in (x, tx, c, tc))


def _run(block, rope, x, tx, c, tc, *, native: bool, monkeypatch, report=False):
    """facm_ext.jvp of the block without grad under bf16 autocast; tc None: c carries no tangent."""
    monkeypatch.setenv("FACM_EXT_NATIVE_BLOCKS", "1" if native else "0")
    extra = () if rope is None else (rope,)
    with torch.no_grad(), torch.autocast("cuda", BF16):
        if tc is None:
            return facm_ext.jvp(lambda x_: block(x_, c, *extra), (x,), (tx,), report=report)
        return facm_ext.jvp(lambda x_, c_: block(x_, c_, *extra), (x, c), (tx, tc), report=report)


def _references(block, rope, x, tx, c, tc):
    """(float64 torch.func.jvp, torch.func.jvp under bf16 autocast): both with math attention."""
    block64, rope64 = copy.deepcopy(block).double(), None if rope is None else copy.deepcopy(rope).double()
    extra64 = () if rope64 is None else (rope64,)
    extra = () if rope is None else (rope,)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        if tc is None:
            ref = torch.func.jvp(lambda x_: block64(x_, c.double(), *extra64), (x.double(),), (tx.double(),))
            with torch.autocast("cuda", BF16):
                base = torch.func.jvp(lambda x_: block(x_, c, *extra), (x,), (tx,))
        else:
            ref = torch.func.jvp(lambda x_, c_: block64(x_, c_, *extra64), (x.double(), c.double()),
                                 (tx.double(), tc.double()))
            with torch.autocast("cuda", BF16):
                base = torch.func.jvp(lambda x_, c_: block(x_, c_, *extra), (x, c), (tx, tc))
    return ref, base


def _native_calls(report: JVPReport) -> int:
    return sum(count for key, count in report.fused.items() if OP in key)


def _assert_close_to_reference(out, ref, base, what: str):
    err, base_err = rel_err(out, ref), rel_err(base, ref)
    assert err <= max(REL_TOL[BF16], 2 * base_err), f"{what}: {err:.2e} vs float64 (torch.func.jvp: {base_err:.2e})"


needs_native_op = pytest.mark.skipif(not _extension.has_kernel(OP), reason="extension built without CUDA kernels")


# ------------------------------------------------------------------------------------------------------ GPU
@requires_cuda
@needs_native_op
@pytest.mark.parametrize("kind,channels,heads,grid,batch", [
    ("lightningdit", 144, 2, 3, 3),      # 9 tokens: odd length, C = 2 x 72
    ("lightningdit", 1152, 16, 16, 2),   # LightningDiT-XL/1's block at 256 tokens
    ("dit", 216, 3, 5, 2),               # 25 tokens, C = 3 x 72
    ("dit", 1152, 16, 16, 2),            # DiT-XL/2's block at 256 tokens
    ("dit_affine", 144, 2, 4, 2),        # LayerNorms with a weight
])
@pytest.mark.parametrize("c_tangent", [True, False], ids=["tc", "no_tc"])
def test_native_block_matches_float64_and_per_op_path(kind, channels, heads, grid, batch, c_tangent, monkeypatch):
    block, rope = _block(kind, channels, heads, grid)
    block = block.cuda()
    rope = None if rope is None else rope.cuda()
    x, tx, c, tc = _inputs(batch, grid * grid, channels, 0, "cuda")
    if not c_tangent:
        tc = None
    report = JVPReport()
    out, tout = _run(block, rope, x, tx, c, tc, native=True, monkeypatch=monkeypatch, report=report)
    assert _native_calls(report) == 1, f"the native op did not run:\n{report}"
    assert out.dtype == x.dtype and tout.dtype == x.dtype and out.shape == x.shape
    (ref, tref), (base, tbase) = _references(block, rope, x, tx, c, tc)
    _assert_close_to_reference(out, ref, base, "primal")
    _assert_close_to_reference(tout, tref, tbase, "tangent")

    per_op_report = JVPReport()
    out_ops, tout_ops = _run(block, rope, x, tx, c, tc, native=False, monkeypatch=monkeypatch, report=per_op_report)
    assert _native_calls(per_op_report) == 0
    # The two paths run the same kernels except the MLP (fused Triton epilogue vs cuBLAS + activation kernel).
    assert rel_err(out, out_ops) <= REL_TOL[BF16] and rel_err(tout, tout_ops) <= REL_TOL[BF16]


@requires_cuda
@needs_native_op
def test_native_block_reads_a_noncontiguous_residual_stream(monkeypatch):
    block, rope = _block("lightningdit", 144, 2, 4)
    block, rope = block.cuda(), rope.cuda()
    x, tx, c, tc = _inputs(2, 16, 144, 3, "cuda")
    # Every other token of a twice-as-long buffer: rows with a unit channel stride but a token stride of 2C.
    x_wide = torch.randn(2, 32, 144, device="cuda")
    x_wide[:, ::2] = x
    x_view = x_wide[:, ::2]
    assert not x_view.is_contiguous()
    report = JVPReport()
    out, tout = _run(block, rope, x_view, tx, c, tc, native=True, monkeypatch=monkeypatch, report=report)
    assert _native_calls(report) == 1
    out_ref, tout_ref = _run(block, rope, x, tx, c, tc, native=True, monkeypatch=monkeypatch)
    assert torch.equal(out, out_ref) and torch.equal(tout, tout_ref)


@requires_cuda
@needs_native_op
@pytest.mark.parametrize("name", ["lightningdit", "dit"])
def test_whole_model_without_grad_runs_every_block_natively(name, monkeypatch):
    if name == "lightningdit":
        model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=144, depth=3, num_heads=2,
                             num_classes=10)
    else:
        model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=144, depth=3, num_heads=2, num_classes=10)
    model = randomize_weights(model, 5).cuda()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, model.input_size, model.input_size, generator=gen).cuda()
    v = torch.randn(x.shape, generator=gen).cuda()
    t = torch.tensor([0.3, 0.7], device="cuda")
    y = torch.tensor([1, 7], device="cuda")

    def func(x_, t_):
        return model(x_, t_, y)

    report = JVPReport()
    with torch.no_grad(), torch.autocast("cuda", BF16):
        out, tout = facm_ext.jvp(func, (x, t), (v, torch.ones_like(t)), report=report)
    assert _native_calls(report) == 3, f"expected one native call per block:\n{report}"
    model64 = copy.deepcopy(model).double()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref, tref = torch.func.jvp(lambda x_, t_: model64(x_, t_, y), (x.double(), t.double()),
                                   (v.double(), torch.ones_like(t, dtype=F64)))
        with torch.autocast("cuda", BF16):
            base, tbase = torch.func.jvp(func, (x, t), (v, torch.ones_like(t)))
    _assert_close_to_reference(out, ref, base, "primal")
    _assert_close_to_reference(tout, tref, tbase, "tangent")


def _weighted_sum(out: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    return (out * weights).sum() + out.square().sum()


def _with_grad(block, rope, x, tx, c, tc, *, native: bool, monkeypatch, report=False):
    """(primal, tangent, gradients of a loss of the primal w.r.t. x, c and the block's parameters), bf16 autocast."""
    monkeypatch.setenv("FACM_EXT_NATIVE_BLOCKS", "1" if native else "0")
    extra = () if rope is None else (rope,)
    x, c = x.detach().requires_grad_(), c.detach().requires_grad_()
    with torch.autocast("cuda", BF16):
        out, tout = facm_ext.jvp(lambda x_, c_: block(x_, c_, *extra), (x, c), (tx, tc), report=report)
    assert not tout.requires_grad
    return out, tout, torch.autograd.grad(_weighted_sum(out.float()), [x, c, *block.parameters()])


@requires_cuda
@needs_native_op
@pytest.mark.parametrize("kind,channels,heads,grid", [("lightningdit", 144, 2, 3), ("dit", 216, 3, 5),
                                                      ("lightningdit", 1152, 16, 16)])
def test_with_grad_the_primal_and_its_gradients_come_from_the_blocks_own_forward(kind, channels, heads, grid,
                                                                                  monkeypatch):
    block, rope = _block(kind, channels, heads, grid, seed=2)
    block = block.cuda()
    rope = None if rope is None else rope.cuda()
    x, tx, c, tc = _inputs(2, grid * grid, channels, 5, "cuda")
    report = JVPReport()
    out, tout, grads = _with_grad(block, rope, x, tx, c, tc, native=True, monkeypatch=monkeypatch, report=report)
    assert any("the primal with grad from the block's own forward" in key for key in report.fused), str(report)
    extra = () if rope is None else (rope,)
    with torch.autocast("cuda", BF16):
        plain = block(x, c, *extra)
    assert torch.equal(out, plain)  # the block's own forward, bit for bit
    _, tout_ops, grads_ops = _with_grad(block, rope, x, tx, c, tc, native=False, monkeypatch=monkeypatch)
    assert rel_err(tout, tout_ops) <= REL_TOL[BF16]

    block64, rope64 = copy.deepcopy(block).double(), None if rope is None else copy.deepcopy(rope).double()
    x64, c64 = x.double().requires_grad_(), c.double().requires_grad_()
    ref = block64(x64, c64, *(() if rope64 is None else (rope64,)))
    grads_ref = torch.autograd.grad(_weighted_sum(ref), [x64, c64, *block64.parameters()])
    names = ["x", "c"] + [name for name, _ in block.named_parameters()]
    for name, g, g_ops, g_ref in zip(names, grads, grads_ops, grads_ref):
        err, err_ops = rel_err(g, g_ref), rel_err(g_ops, g_ref)
        assert err <= max(REL_TOL[BF16], 2 * err_ops), f"grad {name}: {err:.2e} vs float64 (per-op path: {err_ops:.2e})"


@requires_cuda
@needs_native_op
@pytest.mark.parametrize("case", ["head_dim_64", "bf16_params", "switch_off", "forward_hook"])
def test_per_op_path_runs_where_the_native_op_does_not_apply(case, monkeypatch):
    heads = 2 if case != "head_dim_64" else 3  # C = 192: 3 heads of 64 take the Triton attention kernel by default
    channels = 144 if case != "head_dim_64" else 192
    block, rope = _block("dit", channels, heads, 3)
    block = block.cuda()
    if case == "bf16_params":
        block = block.to(BF16)  # a block's fused form is verified only with fp32/fp64 parameters
    if case == "forward_hook":
        block.mlp.register_forward_hook(lambda module, args, out: out)
    x, tx, c, tc = _inputs(2, 9, channels, 1, "cuda")
    if case == "bf16_params":
        x, tx, c, tc = (t.to(BF16) for t in (x, tx, c, tc))
    report = JVPReport()
    _run(block, rope, x, tx, c, tc, native=case != "switch_off", monkeypatch=monkeypatch, report=report)
    assert _native_calls(report) == 0, f"the native op ran ({case}):\n{report}"


@requires_cuda
@needs_native_op
@pytest.mark.parametrize("tokens,native", [(6144, True), (6145, False)])
def test_auto_mode_uses_the_native_op_up_to_its_row_limit(tokens, native, monkeypatch):
    from facm_ext.jvp._blocks import NATIVE_BLOCK_MAX_ROWS

    assert 2 * 6144 == NATIVE_BLOCK_MAX_ROWS  # the two cases sit on either side of the limit
    block, _ = _block("dit", 144, 2, 3)
    block = block.cuda()
    x, tx, c, tc = _inputs(2, tokens, 144, 4, "cuda")
    monkeypatch.setenv("FACM_EXT_NATIVE_BLOCKS", "auto")
    report = JVPReport()
    with torch.no_grad(), torch.autocast("cuda", BF16):
        facm_ext.jvp(lambda x_, c_: block(x_, c_), (x, c), (tx, tc), report=report)
    assert _native_calls(report) == (1 if native else 0), str(report)


@requires_cuda
@needs_native_op
def test_graph_captures_the_per_op_path(monkeypatch):
    """facm_ext.jvp.graph warms up and captures the per-op path (a replay costs no host time; its kernels take the
    least GPU time): the replay equals the eager per-op JVP bit for bit."""
    block, _ = _block("dit", 144, 2, 3)
    block = block.cuda()
    x, tx, c, tc = _inputs(2, 9, 144, 6, "cuda")
    monkeypatch.setenv("FACM_EXT_NATIVE_BLOCKS", "1")
    with torch.no_grad(), torch.autocast("cuda", BF16, cache_enabled=False):
        graphed = facm_ext.jvp.graph(lambda x_, c_: block(x_, c_), (x, c), (tx, tc), module=block)
        out, tout = graphed((x, c), (tx, tc))
    out_ops, tout_ops = _run(block, None, x, tx, c, tc, native=False, monkeypatch=monkeypatch)
    assert torch.equal(out, out_ops) and torch.equal(tout, tout_ops)


def _op_args(batch=2, tokens=9, channels=144, heads=2, dtype=BF16, rope=True):
    gen = torch.Generator().manual_seed(7)

    def rand(*shape, dt=dtype):
        return (torch.randn(*shape, generator=gen) * 0.2).to(device="cuda", dtype=dt)

    head_dim = channels // heads
    cos = sin = None
    if rope:
        angles = torch.rand(tokens, head_dim, generator=gen) * 6.28
        cos, sin = angles.cos().cuda(), angles.sin().cuda()
    hidden = 2 * channels
    return [rand(batch, tokens, channels), rand(batch, tokens, channels), rand(batch, channels), rand(batch, channels),
            rand(6 * channels, channels), rand(6 * channels), 2, rand(channels, dt=torch.float32),
            rand(channels, dt=torch.float32), 1e-6, 1e-6, dtype, rand(3 * channels, channels), rand(3 * channels),
            heads, rand(head_dim, dt=torch.float32) if rope else None,
            rand(head_dim, dt=torch.float32) if rope else None, 1e-6, 1e-6, cos, sin, True, rand(channels, channels),
            rand(channels), rand(2 * hidden, channels), rand(2 * hidden), rand(channels, hidden), rand(channels),
            "swiglu", None, None, None]


@requires_cuda
@needs_native_op
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no_rope"])
def test_op_opcheck(rope):
    args = _op_args(rope=rope)
    if not rope:
        args[7] = args[8] = None  # no norm weights: the LayerNorm form
        args[6] = 1
    torch.library.opcheck(getattr(torch.ops.facm_ext, OP).default, tuple(args))


@requires_cuda
@needs_native_op
@pytest.mark.parametrize("index,value,message", [
    (2, "c_wrong_shape", "c must be [B, C]"),
    (14, 5, "heads must divide C"),
    (28, "gelu", "activation must be 'gelu_tanh' or 'swiglu'"),
    (24, "fc1_wrong_shape", "fc1 weight must be"),
    (0, "x_2d", "x must be a [B, L, C] CUDA tensor"),
])
def test_op_rejects_bad_arguments_with_a_clear_error(index, value, message):
    args = _op_args()
    if value == "c_wrong_shape":
        value = args[2][:, :-1]
    elif value == "fc1_wrong_shape":
        value = args[24][:-2]
    elif value == "x_2d":
        value = args[0][0]
    args[index] = value
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        getattr(torch.ops.facm_ext, OP)(*args)


# ------------------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("kind", ["lightningdit", "dit"])
def test_cpu_blocks_take_the_per_op_path(kind):
    block, rope = _block(kind, 144, 2, 3)
    x, tx, c, tc = _inputs(2, 9, 144, 2, "cpu")
    extra = () if rope is None else (rope,)
    report = JVPReport()
    with torch.no_grad(), torch.autocast("cpu", BF16):
        out, tout = facm_ext.jvp(lambda x_, c_: block(x_, c_, *extra), (x, c), (tx, tc), report=report)
    assert _native_calls(report) == 0
    assert any("adaln_jvp" in key for key in report.fused), f"the fused block rule did not run:\n{report}"
    assert out.shape == x.shape and tout.shape == x.shape


def test_bad_native_block_switch_is_a_clear_error(monkeypatch):
    block, _ = _block("dit", 144, 2, 3)
    x, tx, c, tc = _inputs(2, 9, 144, 2, "cpu")
    monkeypatch.setenv("FACM_EXT_NATIVE_BLOCKS", "yes")
    with pytest.raises(ValueError, match="FACM_EXT_NATIVE_BLOCKS: expected auto, 0 or 1"):
        facm_ext.jvp(lambda x_, c_: block(x_, c_), (x, c), (tx, tc))
