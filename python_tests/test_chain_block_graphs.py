"""facm_ext.chain block graphs: FSDP2 units replayed from CUDA graphs (facm_ext/chain/_graphs.py).

GPU: one process, an NCCL process group of one rank (FSDP2 gathers, prefetches and reshards as on more ranks),
tiny LightningDiT and Wan models in bf16 (the fused kernels' path): the replayed JVP equals the eager one for the
call that captured and for later calls with new inputs, in tangent mode and in grad mode (outputs, tangents and
FSDP2-reduced parameter gradients), every block is captured and none failed, the gathers per block and the most
blocks gathered at once are unchanged, and ``grad=False`` keeps grad mode eager; the same for the blocks of an
explicit ChainJVP, and for FACM's loss (FM forward + JVP with grad, one backward) step after step. CPU: the settings' errors, that
CPU calls run eagerly, that a ChainJVP sends its FSDP2 blocks to the block graphs, and the replay plumbing of both
modes with stand-in graphs.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from conftest import REL_TOL, rel_err, requires_cuda

import facm_ext
import facm_ext.chain
from facm_ext.chain import GatherMonitor, _graphs

# Replay runs the eager call's kernels on the same values: equal up to what cuBLAS may choose differently in a
# capture. A wrong parameter set or a stale argument would be off by O(1).
REPLAY_TOL = REL_TOL[torch.bfloat16] / 10


# ------------------------------------------------------------------------------------------------------------ CPU
def test_set_block_graphs_rejects_bad_arguments():
    with pytest.raises(ValueError, match="enabled: expected a bool"):
        facm_ext.chain.set_block_graphs(1)
    with pytest.raises(ValueError, match="warmup: expected an int >= 1"):
        facm_ext.chain.set_block_graphs(True, warmup=0)
    with pytest.raises(ValueError, match="grad: expected a bool"):
        facm_ext.chain.set_block_graphs(True, grad=None)
    assert _graphs.SETTINGS.enabled is False


def test_cpu_calls_run_eagerly_and_capture_nothing():
    calls = []

    def run_module(module, args, kwargs):
        calls.append(module)
        return args[0] * 2

    block = nn.Linear(2, 2)
    facm_ext.chain.set_block_graphs(True)
    try:
        with torch.no_grad():
            for _ in range(4):
                out = _graphs.run(block, (torch.ones(2),), {}, run_module)
    finally:
        facm_ext.chain.set_block_graphs(False)
    assert torch.equal(out, torch.full((2,), 2.0)) and len(calls) == 4
    assert block not in _graphs._UNITS


def test_copy_into_copies_large_and_small_tensors():
    """Large copies one by one, small ones in one foreach launch: every target gets its source, layouts kept."""
    large = torch.randn(_graphs._FOREACH_BYTES // 4 + 7)  # float32: just over the threshold
    small = torch.randn(3, 5).t()  # a transposed view
    targets = [torch.empty_like(large), torch.empty(3, 5).t(), torch.empty(2, dtype=torch.float64)]
    sources = [large, small, torch.tensor([1.5, -2.0])]
    _graphs._copy_into(targets, sources)
    for target, source in zip(targets, sources):
        assert torch.equal(target, source.to(target.dtype))
    assert targets[1].stride() == (1, 5)


def test_argument_layout_round_trip_keeps_constants():
    """Constants that look like the layout's own markers (1, 2) come back as themselves."""
    from facm_ext.jvp import make_dual, split_dual

    a, ta, b = torch.randn(3), torch.randn(3), torch.randn(2)
    args, kwargs = (make_dual(a, ta), 1, b, 2), {"scale": 2, "name": "x", "none": None}
    tensors, signature, spec, layout = _graphs._flat_arguments(args, kwargs, split_dual)
    assert [t.data_ptr() for t in tensors] == [a.data_ptr(), ta.data_ptr(), b.data_ptr()]
    assert hash(signature) is not None
    new_args, new_kwargs = _graphs._rebuild_arguments(tensors, spec, layout, make_dual)
    assert new_args[1] == 1 and new_args[3] == 2 and new_kwargs == {"scale": 2, "name": "x", "none": None}
    primal, tangent = split_dual(new_args[0])
    assert torch.equal(primal, a) and torch.equal(tangent, ta) and new_args[2] is b
    # The signature tells shapes and constants apart.
    other = _graphs._flat_arguments((make_dual(a, ta), 2, b, 2), kwargs, split_dual)[1]
    assert other != signature


class _FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: replay computes the block from the static buffers, as the
    captured kernels would."""

    def __init__(self, module, static_args, static_params, static_outputs):
        self.module, self.args, self.params, self.outputs = module, static_args, static_params, static_outputs
        self.replays = 0

    def replay(self):
        x, tx, c = self.args
        weight, bias = self.params
        self.outputs[0].copy_(x @ weight.t() + bias + c)
        self.outputs[1].copy_(tx @ weight.t())
        self.replays += 1


def test_replay_plumbing_on_the_cpu(monkeypatch):
    """run(): warmup calls eager, then the probe, then one capture per signature; every later call copies its
    arguments and the unit's current parameters into the static buffers, replays, and returns fresh duals. A
    unit the probe turns down stays eager, with a warning. (Real captures: the GPU tests below.)"""
    from facm_ext.jvp import make_dual, split_dual

    block = nn.Linear(3, 3).double()
    eager_calls, captures = [], []

    def run_module(module, args, kwargs):
        eager_calls.append(1)
        x, c = args
        x_p, x_t = split_dual(x)
        return make_dual(x_p @ module.weight.t() + module.bias + c, x_t @ module.weight.t())

    def fake_capture(module, params, tensors, spec, layout, run_module_, make_dual_, split_dual_, probe):
        static_args = _graphs._shared("args", tensors)
        static_params = _graphs._shared("params", params)
        static_outputs = [torch.empty_like(tensors[0]), torch.empty_like(tensors[1])]
        graph = _FakeGraph(module, static_args, static_params, static_outputs)
        captures.append(graph)
        out_spec = torch.utils._pytree.tree_flatten(torch.zeros(1))[1]
        return _graphs._Graph(graph, static_args, static_params, static_outputs, out_spec, [True])

    monkeypatch.setattr(_graphs, "_all_cuda", lambda tensors: True)
    monkeypatch.setattr(_graphs, "_probe", lambda *a, **k: [])
    monkeypatch.setattr(_graphs, "_capture", fake_capture)
    _graphs.reset_block_graphs()
    facm_ext.chain.set_block_graphs(True, warmup=2)
    try:
        with torch.no_grad():
            outputs = []
            for seed in range(5):
                g = torch.Generator().manual_seed(seed)
                x, tx, c = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3))
                if seed == 4:
                    block.weight.add_(1.0)  # parameters change between calls: the replay reads the new ones
                out = _graphs.run(block, (make_dual(x, tx), c), {}, run_module)
                out_p, out_t = split_dual(out)
                torch.testing.assert_close(out_p, x @ block.weight.t() + block.bias + c)
                torch.testing.assert_close(out_t, tx @ block.weight.t())
                outputs.append(out_p)
        assert len(eager_calls) == 2 and len(captures) == 1 and captures[0].replays == 3
        assert outputs[2].data_ptr() != captures[0].outputs[0].data_ptr()  # a fresh tensor, not the buffer
        # Another signature (batch 4) is a new capture.
        with torch.no_grad():
            for _ in range(3):
                x = torch.randn(4, 3, dtype=torch.float64)
                _graphs.run(block, (make_dual(x, x), x), {}, run_module)
        assert len(captures) == 2
        # A unit the probe turns down.
        other = nn.Linear(3, 3).double()
        monkeypatch.setattr(_graphs, "_probe", lambda *a, **k: "it synchronizes with the host: test")
        eager_calls.clear()
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="cannot be captured"):
            for _ in range(4):
                _graphs.run(other, (make_dual(x, x), x), {}, run_module)
        assert len(eager_calls) == 4 and len(captures) == 2
        assert _graphs.block_graph_failures() == {"Linear": "it synchronizes with the host: test"}
    finally:
        facm_ext.chain.set_block_graphs(False)
        _graphs.reset_block_graphs()


def test_probe_returns_the_outputs_and_which_ones_get_gradients(monkeypatch):
    """The probe's eager run (sync debug mode stubbed out on the CPU): detached outputs flagged as the outputs
    were (the grad-mode capture allocates its buffers and gradient paths from them), or why the unit cannot be
    captured; an unrelated error propagates."""
    from facm_ext.jvp import make_dual, split_dual

    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(_graphs, "_all_cuda", lambda tensors: True)
    block = nn.Linear(3, 3).double()
    x, tx, c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True), torch.randn(2, 3), torch.randn(2, 3)
    tensors, _, spec, layout = _graphs._flat_arguments((make_dual(x, tx), c.double()), {}, split_dual)
    params = list(block.parameters())

    def run_module(module, args, kwargs):
        h, c = args
        h_p, h_t = split_dual(h)
        return make_dual(h_p @ module.weight.t() + c, h_t @ module.weight.t()), c.sum()

    probe = _graphs._probe(block, tensors, params, spec, layout, run_module, make_dual, split_dual, grad=True)
    assert [t.requires_grad for t in probe] == [True, False, False]
    assert all(t.grad_fn is None for t in probe)
    assert x.grad is None and block.weight.grad is None  # its backward accumulates nothing
    reason = _graphs._probe(block, tensors, params, spec, layout, lambda m, a, k: (a[1], 3), make_dual, split_dual,
                            grad=False)
    assert reason == "it returns a int; only tensors (and None) can be replayed"

    def syncing(module, args, kwargs):
        raise RuntimeError("called a synchronizing CUDA operation")

    assert _graphs._probe(block, tensors, params, spec, layout, syncing, make_dual, split_dual,
                          grad=True).startswith("it synchronizes with the host")

    def broken(module, args, kwargs):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        _graphs._probe(block, tensors, params, spec, layout, broken, make_dual, split_dual, grad=True)


class _FakeGradGraphs:
    """Stand-ins for a unit's grad-mode forward and backward graphs on the CPU (a linear block
    ``out = x @ W.T + b + c``, tangent ``tx @ W.T``): the forward keeps what a captured forward would save (x)
    in its own memory, the backward reads it from there and the parameters from the static buffers."""

    def __init__(self, entry_buffers):
        self.args, self.params, self.outputs, self.grad_outputs, self.grads = entry_buffers
        self.saved_x = torch.empty_like(self.args[0])

    def forward_replay(self):
        x, tx, c = self.args
        weight, bias = self.params
        self.saved_x.copy_(x)
        self.outputs[0].copy_(x @ weight.t() + bias + c)
        self.outputs[1].copy_(tx @ weight.t())

    def backward_replay(self):
        (g,) = self.grad_outputs
        weight, _ = self.params
        grad_x, grad_c, grad_w, grad_b = self.grads
        grad_x.copy_(g @ weight)
        grad_c.copy_(g)
        grad_w.copy_(g.t() @ self.saved_x)
        grad_b.copy_(g.sum(0))


def test_grad_mode_replay_plumbing_on_the_cpu(monkeypatch):
    """Grad mode: a captured unit's call returns outputs whose backward replays the backward graph; gradients of
    the arguments and of the unit's current parameters equal eager autograd's (accumulated into ``.grad``), the
    tangent carries no graph, and a backward whose saved activations a later replay overwrote raises instead of
    returning wrong gradients. (Real captures: the GPU tests below.)"""
    import types

    from facm_ext.jvp import make_dual, split_dual

    def run_module(module, args, kwargs):
        x, c = args
        x_p, x_t = split_dual(x)
        return make_dual(x_p @ module.weight.t() + module.bias + c, x_t @ module.weight.t())

    pool = _graphs._Pool((0, 0), None)
    fakes = {}

    def fake_capture_grad(module, params, tensors, spec, layout, run_module_, make_dual_, split_dual_, probe):
        static = [_graphs._shared("args", tensors), _graphs._shared("params", params),
                  [torch.empty_like(tensors[0]), torch.empty_like(tensors[1])], [torch.empty_like(tensors[0])],
                  [torch.empty_like(tensors[0]), torch.empty_like(tensors[2])] + [torch.empty_like(p) for p in params]]
        fake = fakes[module] = _FakeGradGraphs(static)
        out_spec = torch.utils._pytree.tree_flatten(torch.zeros(1))[1]
        position = pool.captured
        pool.captured += 1
        return _graphs._GradGraph(
            types.SimpleNamespace(replay=fake.forward_replay), types.SimpleNamespace(replay=fake.backward_replay),
            pool, position, static[0], static[1], static[2], out_spec, [True], [True, False], static[3],
            [static[4][0], None, static[4][1]] + static[4][2:], [])

    monkeypatch.setattr(_graphs, "_all_cuda", lambda tensors: True)
    monkeypatch.setattr(_graphs, "_probe", lambda *a, **k: [])
    monkeypatch.setattr(_graphs, "_capture_grad", fake_capture_grad)
    torch.manual_seed(0)
    blocks = [nn.Linear(3, 3).double() for _ in range(2)]

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x, tx, c = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3))
        return x.requires_grad_(), tx, c.requires_grad_()

    def chain(x, tx, c, *, graphs):
        """Two units in a row, then a loss; returns (loss, tangent out)."""
        h = make_dual(x, tx)
        for block in blocks:
            h = _graphs.run(block, (h, c), {}, run_module) if graphs else run_module(block, (h, c), {})
        out, tangent = split_dual(h)
        return (out * torch.arange(3.0, dtype=torch.float64)).sum(), tangent

    def gradients(seed, *, graphs):
        for block in blocks:
            block.zero_grad(set_to_none=True)
        x, tx, c = inputs(seed)
        loss, tangent = chain(x, tx, c, graphs=graphs)
        assert not tangent.requires_grad
        loss.backward()
        return [x.grad, c.grad] + [p.grad.clone() for b in blocks for p in b.parameters()], tangent

    _graphs.reset_block_graphs()
    facm_ext.chain.set_block_graphs(True, warmup=1)
    try:
        for call, seed in enumerate((0, 0, 1, 2)):  # warmup (eager), capture + replay, two replays
            got, got_tangent = gradients(seed, graphs=True)
            expected, expected_tangent = gradients(seed, graphs=False)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b)
            torch.testing.assert_close(got_tangent, expected_tangent)
        assert set(fakes) == set(blocks)
        # Gradient accumulation: a second backward pass adds to .grad as eager autograd does.
        x, tx, c = inputs(3)
        for block in blocks:
            block.zero_grad(set_to_none=True)
        chain(x, tx, c, graphs=True)[0].backward()
        chain(x, tx, c, graphs=True)[0].backward()
        accumulated = [p.grad.clone() for b in blocks for p in b.parameters()]
        once = gradients(3, graphs=False)[0][2:]
        for a, b in zip(accumulated, once):
            torch.testing.assert_close(a, 2 * b)
        # Two grad-mode calls before their backward: the second replay overwrote the first call's activations.
        x, tx, c = inputs(4)
        first = chain(x, tx, c, graphs=True)[0]
        second = chain(x, tx, c, graphs=True)[0]
        second.backward()
        with pytest.raises(RuntimeError, match="activations this backward needs were overwritten"):
            first.backward()
        # Replaying an earlier-captured unit alone forgets the later ones (their memory may be reused) but not the
        # unit's own forward when only its backward ran in between.
        h = make_dual(x, tx)
        first_out = _graphs.run(blocks[1], (h, c), {}, run_module)
        _graphs.run(blocks[0], (h, c), {}, run_module)
        with pytest.raises(RuntimeError, match="overwritten"):
            split_dual(first_out)[0].sum().backward()
    finally:
        facm_ext.chain.set_block_graphs(False)
        _graphs.reset_block_graphs()


def test_grad_mode_capture_code_on_the_cpu(monkeypatch):
    """_capture_grad's own code on the CPU, the CUDA graph capture replaced by running the captured code once (so
    the static buffers hold what one replay would produce): a LightningDiT block whose residual stream is the
    transposed view PatchEmbed gives (strides (L*C, 1, L)). The forward sees that layout, as eagerly; the
    gradient buffers are row-major, as autograd's gradients are; outputs, tangents and the gradients of the
    arguments and parameters for a given output gradient equal eager autograd's."""
    import contextlib
    import types

    from facm_ext.jvp import make_dual, run_module, split_dual
    from facm_ext.models import LightningDiT

    pool = _graphs._Pool((0, 0), None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: types.SimpleNamespace(replay=lambda: None))
    monkeypatch.setattr(_graphs, "_pool", lambda device, kind: pool)
    monkeypatch.setattr(_graphs, "_capture_context", lambda graph, pool: contextlib.nullcontext())
    monkeypatch.setattr(_graphs, "_all_cuda", lambda tensors: True)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    torch.manual_seed(0)
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=1, num_heads=2,
                         num_classes=10).double()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    block, rope = model.blocks[0], model.feat_rope
    block.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=torch.float64)))  # gets no gradient
    params = list(block.parameters())
    x = torch.randn(2, 64, 16, dtype=torch.float64).transpose(1, 2).requires_grad_()  # [B, L, C], transposed
    c = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    tx, tc = torch.randn(2, 16, 64, dtype=torch.float64), torch.randn(2, 64, dtype=torch.float64)
    grad_out = torch.randn(2, 16, 64, dtype=torch.float64)

    out_ref, tangent_ref = facm_ext.jvp(lambda x, c: block(x, c, rope), (x, c), (tx, tc))
    grads_ref = torch.autograd.grad(out_ref, [x, c] + params, grad_out, allow_unused=True)
    unused = 2 + next(i for i, p in enumerate(params) if p is block.unused)
    assert [i for i, g in enumerate(grads_ref) if g is None] == [unused]
    captured = {}

    def capture_inside_the_transform(x_dual, c_dual):
        tensors, _, spec, layout = _graphs._flat_arguments((x_dual, c_dual, rope), {}, split_dual)
        probe = _graphs._probe(block, tensors, params, spec, layout, run_module, make_dual, split_dual, grad=True)
        # What the replay copies in before the graph runs (and the output gradient its backward copies in).
        _graphs._copy_into(_graphs._shared("args", tensors), [t.detach() for t in tensors])
        _graphs._copy_into(_graphs._shared("params", params), [p.detach() for p in params])
        _graphs._shared("grad_outputs", [probe[0]], contiguous=True)[0].copy_(grad_out)
        captured["entry"] = _graphs._capture_grad(block, params, tensors, spec, layout, run_module, make_dual,
                                                  split_dual, probe)
        return x_dual

    _graphs.reset_block_graphs()
    try:
        facm_ext.jvp(capture_inside_the_transform, (x, c), (tx, tc))
        entry = captured["entry"]
        assert entry.static_args[0].stride() == x.stride()  # the forward's layout is the eager one
        assert entry.differentiable == [True, False]
        assert all(t.is_contiguous() for t in entry.static_grad_outputs)
        assert all(t is None or t.is_contiguous() for t in entry.static_grads)
        torch.testing.assert_close(entry.static_outputs[0], out_ref.detach())
        torch.testing.assert_close(entry.static_outputs[1], tangent_ref)
        # static_grads: x, its tangent (none), c, its tangent (none), then the parameters (the unused one: none)
        assert [g is None for g in entry.static_grads[:4]] == [False, True, False, True]
        grads = entry.static_grads[0:1] + entry.static_grads[2:3] + entry.static_grads[4:]
        assert len(grads) == len(grads_ref) and [i for i, g in enumerate(grads) if g is None] == [unused]
        for got, expected in zip(grads, grads_ref):
            if expected is not None:
                torch.testing.assert_close(got, expected)
        assert pool.captured == 1 and entry.position == 0 and entry.autograd_graph
    finally:
        _graphs.reset_block_graphs()


@pytest.mark.parametrize("mode", ["tangent", "grad"])
def test_chain_jvp_sends_its_fsdp2_blocks_to_block_graphs(tmp_path, monkeypatch, mode):
    """The FSDP2 blocks a ChainJVP drives reach the block graphs' entry point (on the CPU it runs them eagerly:
    same outputs, tangents and gradients as with block graphs off); without block graphs they do not."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from facm_ext.models import LightningDiT

    if dist.is_initialized():
        pytest.skip("another process group is active in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                             num_classes=10).double()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        chain = facm_ext.chain.ChainJVP(model.blocks, step=lambda block, x, c: block(x, c, model.feat_rope),
                                        root=model, mode=mode)
        x, tx = torch.randn(2, 16, 32, dtype=torch.float64), torch.randn(2, 16, 32, dtype=torch.float64)
        c, tc = torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
        seen = []  # the units whose parameters the block graphs' entry point looked up
        original_parameters = _graphs._parameters

        def recording_parameters(module):
            seen.append(module)
            return original_parameters(module)

        monkeypatch.setattr(_graphs, "_parameters", recording_parameters)

        def call():
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(mode == "grad"):
                out, tangent = chain(x, tx, c, context_tangents=(tc,))
            if mode == "grad":
                (out * tangent).sum().backward()
            return out.detach(), tangent, [p.grad.full_tensor() for p in model.blocks.parameters()
                                           if p.grad is not None]

        expected = call()
        assert seen == []
        facm_ext.chain.set_block_graphs(True, warmup=1)
        try:
            for _ in range(3):
                got = call()
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
        finally:
            facm_ext.chain.set_block_graphs(False)
            _graphs.reset_block_graphs()
        assert seen == list(model.blocks) * 3
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------ GPU
@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    import torch.distributed as dist

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if dist.is_initialized():
        if dist.get_world_size() != 1 or dist.get_backend() != "nccl":
            pytest.skip("another process group is active in this process")
        yield
        return
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def _lightningdit():
    from facm_ext.models import LightningDiT

    torch.manual_seed(0)
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=128, depth=3, num_heads=2,
                         num_classes=10).cuda()
    _randomize(model)
    model.feat_rope.to(torch.bfloat16)  # FSDP casts parameters only; fp32 tables would promote q and k
    y = torch.tensor([1, 7], device="cuda")

    def inputs(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(2, 4, 4, 4, generator=g, device="cuda")
        t = torch.rand(2, generator=g, device="cuda")
        return (x, t), (torch.randn(x.shape, generator=g, device="cuda"), torch.ones(2, device="cuda"))

    return model, (lambda net: (lambda x, t: net(x, t, y))), inputs


def _wan():
    from facm_ext.models import wan_small

    torch.manual_seed(0)
    model = wan_small(num_layers=3, dim=128, ffn_dim=256, num_heads=2).cuda()
    _randomize(model, scale=0.1)
    context = torch.randn(2, 8, 32, device="cuda")
    context_lens = torch.tensor([8, 5], device="cuda")

    def inputs(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(2, 4, 2, 4, 4, generator=g, device="cuda")
        t = torch.rand(2, generator=g, device="cuda")
        return (x, t), (torch.randn(x.shape, generator=g, device="cuda"), torch.ones(2, device="cuda"))

    return model, (lambda net: (lambda x, t: net(x, t, context, seq_len=10, context_lens=context_lens))), inputs


def _randomize(model, scale=0.2):
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device="cuda") * scale)


def _assert_every_block_captured(model, graph_type) -> None:
    """Block graphs turned no unit down and captured a ``graph_type`` for every block of ``model``."""
    assert _graphs.block_graph_failures() == {}
    assert _captured_blocks(model, graph_type) == list(model.blocks)


def _captured_blocks(model, graph_type) -> list:
    """The blocks of ``model`` that block graphs captured a ``graph_type`` (_Graph or _GradGraph) for."""
    return [b for b in model.blocks
            if any(isinstance(e, graph_type) for e in _graphs._UNITS.get(b, {}).values())]


def _assert_grads_equal(grads: dict, ref_grads: dict, where: tuple) -> None:
    """A replayed step's FSDP2-reduced gradients {name: full fp32 tensor} equal the eager step's: the same
    parameters, each within REPLAY_TOL."""
    assert set(grads) == set(ref_grads), where
    for name, grad in grads.items():
        error = rel_err(grad, ref_grads[name])
        assert error <= REPLAY_TOL, (*where, name, error)


def _shard_bf16(model):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@requires_cuda
@pytest.mark.parametrize("build", [_lightningdit, _wan], ids=["lightningdit", "wan"])
def test_replayed_blocks_match_eager(one_rank_group, build):
    model, make_fn, inputs = build()
    _shard_bf16(model)
    fn = make_fn(model)
    _graphs.reset_block_graphs()
    expected = {}
    with torch.no_grad():
        # The first call autotunes the Triton kernels: its tiles may round differently from the tuned ones.
        facm_ext.jvp(fn, *inputs(0))
        for seed in (0, 1):
            primals, tangents = inputs(seed)
            expected[seed] = facm_ext.jvp(fn, primals, tangents)  # block graphs off: eager
    facm_ext.chain.set_block_graphs(True, warmup=1)
    try:
        with torch.no_grad():
            # warmup (eager), capture + replay, replay; then new inputs through the same graphs
            for call, seed in enumerate((0, 0, 0, 1, 0)):
                primals, tangents = inputs(seed)
                with GatherMonitor(model.blocks) as monitor:
                    out, tangent = facm_ext.jvp(fn, primals, tangents)
                ref_out, ref_tangent = expected[seed]
                assert rel_err(out, ref_out) <= REPLAY_TOL, (call, seed, rel_err(out, ref_out))
                assert rel_err(tangent, ref_tangent) <= REPLAY_TOL, (call, seed, rel_err(tangent, ref_tangent))
                assert [monitor.gathers[b] for b in model.blocks] == [1] * len(model.blocks)
                assert monitor.max_gathered <= 2
        _assert_every_block_captured(model, _graphs._Graph)
        # Grad mode with grad=False runs eagerly: no new capture, and its output keeps its graph.
        facm_ext.chain.set_block_graphs(True, warmup=1, grad=False)
        before = {id(b): dict(_graphs._UNITS[b]) for b in model.blocks}
        primals, tangents = inputs(0)
        for _ in range(3):
            out, tangent = facm_ext.jvp(fn, primals, tangents)
        assert out.requires_grad and not tangent.requires_grad
        assert rel_err(out, expected[0][0]) <= REL_TOL[torch.bfloat16]
        assert all(_graphs._UNITS[b] == before[id(b)] for b in model.blocks)
    finally:
        facm_ext.chain.set_block_graphs(False)
        _graphs.reset_block_graphs()


@requires_cuda
@pytest.mark.parametrize("build", [_lightningdit, _wan], ids=["lightningdit", "wan"])
def test_grad_mode_replayed_blocks_match_eager(one_rank_group, build):
    """Grad mode (FACM's step): each block's forward and backward replayed from graphs give the outputs,
    tangents and (FSDP2-reduced) parameter gradients of the eager chain, for the capturing call, later calls with
    new inputs and a return to the first inputs; FSDP2 still gathers each block once for the forward and once for
    the backward, at most two at a time."""
    model, make_fn, inputs = build()
    _shard_bf16(model)
    fn = make_fn(model)
    _graphs.reset_block_graphs()

    def step(seed):
        model.zero_grad(set_to_none=True)
        primals, tangents = inputs(seed)
        with GatherMonitor(model.blocks) as monitor:
            out, tangent = facm_ext.jvp(fn, primals, tangents)
            assert out.requires_grad and not tangent.requires_grad
            (out.float() * tangent.float()).mean().backward()
        grads = {name: p.grad.full_tensor().float() for name, p in model.named_parameters() if p.grad is not None}
        return out.detach(), tangent, grads, monitor

    step(0)  # Triton autotuning, eagerly
    expected = {seed: step(seed)[:3] for seed in (0, 1)}
    facm_ext.chain.set_block_graphs(True, warmup=1)
    try:
        for call, seed in enumerate((0, 0, 0, 1, 0)):  # warmup (eager), capture + replay, replays
            out, tangent, grads, monitor = step(seed)
            ref_out, ref_tangent, ref_grads = expected[seed]
            assert rel_err(out, ref_out) <= REPLAY_TOL, (call, seed, rel_err(out, ref_out))
            assert rel_err(tangent, ref_tangent) <= REPLAY_TOL, (call, seed, rel_err(tangent, ref_tangent))
            _assert_grads_equal(grads, ref_grads, (call, seed))
            assert [monitor.gathers[b] for b in model.blocks] == [2] * len(model.blocks)
            assert monitor.max_gathered <= 2
        _assert_every_block_captured(model, _graphs._GradGraph)
    finally:
        facm_ext.chain.set_block_graphs(False)
        _graphs.reset_block_graphs()


@requires_cuda
def test_a_block_that_synchronizes_is_not_captured_and_runs_eagerly(one_rank_group):
    """A host synchronization inside a block (here ``.item()``) is found by the eager probe before any capture:
    recorded, warned, the block stays eager, and torch's CUDA random-number state stays usable (a capture that
    failed midway would leave it raising "Offset increment outside graph capture")."""
    model, make_fn, inputs = _lightningdit()
    _shard_bf16(model)
    fn = make_fn(model)
    with torch.no_grad():
        facm_ext.jvp(fn, *inputs(0))  # autotuning
        primals, tangents = inputs(0)
        ref_out, ref_tangent = facm_ext.jvp(fn, primals, tangents)
    block_type = type(model.blocks[0])

    def syncing_rule(module, args, kwargs):
        if torch.isnan(facm_ext.jvp.split_dual(args[0])[0]).any().item():  # a data-dependent branch
            raise AssertionError("no NaN expected here")
        return module.forward(*args, **kwargs)

    _graphs.reset_block_graphs()
    facm_ext.jvp.register_jvp_rule(block_type, syncing_rule)
    facm_ext.chain.set_block_graphs(True, warmup=1)
    try:
        with torch.no_grad():
            facm_ext.jvp(fn, primals, tangents)
            with pytest.warns(RuntimeWarning, match="cannot be captured .*synchroniz"):
                out, tangent = facm_ext.jvp(fn, primals, tangents)
            out, tangent = facm_ext.jvp(fn, primals, tangents)
        assert set(_graphs.block_graph_failures()) == {block_type.__name__}
        assert _captured_blocks(model, _graphs._Graph) == []
        assert rel_err(out, ref_out) <= REPLAY_TOL
        assert rel_err(tangent, ref_tangent) <= REPLAY_TOL
        torch.randn(4, device="cuda").sum().item()  # the CUDA RNG still works
        assert torch.cuda.get_sync_debug_mode() == 0
    finally:
        facm_ext.jvp.register_jvp_rule(block_type, None)
        facm_ext.chain.set_block_graphs(False)
        _graphs.reset_block_graphs()


@requires_cuda
def test_facm_loss_steps_with_block_graphs_match_eager(one_rank_group):
    """FACM's training step on an FSDP2 model: the FM anchor's plain forward (FSDP2's own path) and the JVP with
    grad (block graphs) in one autograd graph, one backward. The loss and the FSDP2-reduced gradients equal the eager
    chain's, step after step (capture, replays, new batches)."""
    from facm_ext.facm.objective import facm_loss

    model, _, _ = _lightningdit()
    _shard_bf16(model)
    _graphs.reset_block_graphs()

    def step(seed):
        model.zero_grad(set_to_none=True)
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(2, 4, 4, 4, generator=g, device="cuda")
        noise = torch.randn(x.shape, generator=g, device="cuda")
        velocity = torch.randn(x.shape, generator=g, device="cuda")
        t = torch.rand(2, generator=g, device="cuda")
        y = torch.tensor([1, 7], device="cuda")
        losses = facm_loss(model, x, y, t=t, noise=noise, velocity=velocity, cfg_scale=1.0)
        losses["loss"].backward()
        grads = {name: p.grad.full_tensor().float() for name, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach().float() for k, v in losses.items()}, grads

    step(0)  # Triton autotuning, eagerly
    expected = {seed: step(seed) for seed in (0, 1)}
    facm_ext.chain.set_block_graphs(True, warmup=1)
    try:
        for call, seed in enumerate((0, 0, 0, 1, 0)):
            losses, grads = step(seed)
            ref_losses, ref_grads = expected[seed]
            for key in ("loss", "cm", "fm"):
                assert rel_err(losses[key], ref_losses[key]) <= REPLAY_TOL, (call, seed, key)
            _assert_grads_equal(grads, ref_grads, (call, seed))
        _assert_every_block_captured(model, _graphs._GradGraph)
    finally:
        facm_ext.chain.set_block_graphs(False)
        _graphs.reset_block_graphs()


@requires_cuda
@pytest.mark.parametrize("mode", ["tangent", "grad"])
def test_chain_jvp_blocks_replayed_match_eager(one_rank_group, mode):
    """The explicit ChainJVP API with block graphs: its FSDP2 blocks are captured and replayed, and outputs,
    tangents and (grad mode) FSDP2-reduced gradients equal the eager ChainJVP's through capture, replays and new
    inputs, with the same gathers per block."""
    model, _, _ = _lightningdit()
    _shard_bf16(model)
    chain = facm_ext.chain.ChainJVP(model.blocks, step=lambda block, x, c: block(x, c, model.feat_rope),
                                    root=model, mode=mode)
    _graphs.reset_block_graphs()

    def call(seed):
        model.zero_grad(set_to_none=True)
        g = torch.Generator(device="cuda").manual_seed(seed)
        x, tx = (torch.randn(2, 16, 128, generator=g, device="cuda") for _ in range(2))
        c, tc = (torch.randn(2, 128, generator=g, device="cuda") for _ in range(2))
        with GatherMonitor(model.blocks) as monitor, torch.set_grad_enabled(mode == "grad"):
            out, tangent = chain(x, tx, c, context_tangents=(tc,))
            if mode == "grad":
                (out.float() * tangent.float()).mean().backward()
        grads = {name: p.grad.full_tensor().float() for name, p in model.blocks.named_parameters()
                 if p.grad is not None}
        assert [monitor.gathers[b] for b in model.blocks] == [2 if mode == "grad" else 1] * len(model.blocks)
        assert monitor.max_gathered <= 2
        return out.detach(), tangent, grads

    call(0)  # Triton autotuning, eagerly
    expected = {seed: call(seed) for seed in (0, 1)}
    facm_ext.chain.set_block_graphs(True, warmup=1)
    try:
        for index, seed in enumerate((0, 0, 0, 1, 0)):
            out, tangent, grads = call(seed)
            ref_out, ref_tangent, ref_grads = expected[seed]
            assert rel_err(out, ref_out) <= REPLAY_TOL, (index, seed)
            assert rel_err(tangent, ref_tangent) <= REPLAY_TOL, (index, seed)
            assert (mode == "tangent") == (not grads)
            _assert_grads_equal(grads, ref_grads, (index, seed))
        graph_type = _graphs._GradGraph if mode == "grad" else _graphs._Graph
        _assert_every_block_captured(model, graph_type)
    finally:
        facm_ext.chain.set_block_graphs(False)
        _graphs.reset_block_graphs()
