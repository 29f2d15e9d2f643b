"""Reference models (facm_ext.models): shapes, official parameter names and counts, adaLN-Zero init, RoPE tables,
and forward-mode differentiability of the plain-PyTorch models (the reference other layers test against)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from facm_ext.models import (
    DiT,
    DiT_XL_2,
    LightningDiT,
    LightningDiT_XL_1,
    RMSNorm,
    Wan22_A14B_config,
    WanBlock,
    WanModel,
    load_checkpoint,
    load_dit_checkpoint,
    load_lightningdit_checkpoint,
    rope_2d_tables,
    wan_rope_tables,
    wan_small,
)


def tiny_lightningdit(**kw) -> LightningDiT:
    cfg = dict(input_size=6, patch_size=1, in_channels=4, hidden_size=48, depth=2, num_heads=4, num_classes=10)
    cfg.update(kw)
    return LightningDiT(**cfg)


def randomize_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Non-zero values in every parameter (the official init zeroes the adaLN heads and the output layer)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- LightningDiT


def test_lightningdit_xl_shapes_and_param_count():
    with torch.device("meta"):
        model = LightningDiT_XL_1()
    # Official LightningDiT-XL/1 (qk-norm, SwiGLU, RMSNorm, RoPE, 32 latent channels): 674,965,856 parameters.
    assert count_params(model) == 674_965_856
    block = model.blocks[0]
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 28
    assert tuple(block.mlp.w12.weight.shape) == (6144, 1152)
    assert tuple(block.mlp.w3.weight.shape) == (1152, 3072)
    assert tuple(block.attn.qkv.weight.shape) == (3456, 1152)
    assert tuple(block.attn.q_norm.weight.shape) == (72,)
    assert isinstance(block.norm1, RMSNorm) and isinstance(block.attn.q_norm, RMSNorm)
    assert tuple(model.feat_rope.freqs_cos.shape) == (256, 72)
    assert tuple(model.pos_embed.shape) == (1, 256, 1152)
    assert tuple(model.y_embedder.embedding_table.weight.shape) == (1001, 1152)
    assert tuple(model.final_layer.linear.weight.shape) == (32, 1152)


def official_lightningdit_keys(depth: int, qknorm: bool, rope: bool) -> set[str]:
    """State-dict keys of hustvl/LightningDiT models/lightningdit.py (RMSNorm, SwiGLU), written out by hand."""
    keys = {
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.norm_final.weight", "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }
    if rope:
        keys |= {"feat_rope.freqs_cos", "feat_rope.freqs_sin"}
    for i in range(depth):
        block = [
            "norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias",
            "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
        ]
        if qknorm:
            block += ["attn.q_norm.weight", "attn.k_norm.weight"]
        keys |= {f"blocks.{i}.{k}" for k in block}
    return keys


@pytest.mark.parametrize("qknorm", [True, False])
def test_lightningdit_state_dict_keys_are_official(qknorm):
    model = tiny_lightningdit(use_qknorm=qknorm)
    assert set(model.state_dict()) == official_lightningdit_keys(2, qknorm=qknorm, rope=True)
    no_rope = tiny_lightningdit(use_qknorm=qknorm, use_rope=False)
    assert set(no_rope.state_dict()) == official_lightningdit_keys(2, qknorm=qknorm, rope=False)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_lightningdit_forward_shape_and_zero_init(learn_sigma):
    model = tiny_lightningdit(learn_sigma=learn_sigma)
    x = torch.randn(3, 4, 6, 6)
    t = torch.rand(3)
    y = torch.tensor([0, 9, 10])  # 10 = null class
    out = model(x, t, y)
    assert out.shape == (3, 4, 6, 6)
    # adaLN-Zero: modulation heads and the final linear start at zero, so the fresh model's output is exactly 0 ...
    assert torch.count_nonzero(out) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
    # ... and each block is the identity on its input tokens.
    tokens, c = model.embed(x, t, y)
    assert torch.equal(model.blocks[0](tokens, c, model.feat_rope), tokens)
    randomize_(model)
    assert model(x, t, y).abs().sum() > 0


def test_lightningdit_rejects_bad_inputs():
    model = tiny_lightningdit()
    with pytest.raises(ValueError, match="x"):
        model(torch.randn(2, 3, 6, 6), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="t"):
        model(torch.randn(2, 4, 6, 6), torch.rand(3), torch.zeros(2, dtype=torch.long))


def test_rope_tables_match_direct_computation():
    head_dim, grid = 12, 5
    cos, sin = rope_2d_tables(head_dim, grid)
    assert cos.shape == (grid * grid, head_dim)
    half = head_dim // 2
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        for ch in range(head_dim):
            pos, local = (row, ch) if ch < half else (col, ch - half)
            pair = local // 2
            angle = pos * 10000.0 ** (-2 * pair / half)
            assert cos[token, ch].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin[token, ch].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_rope_module_rotates_interleaved_pairs():
    model = tiny_lightningdit()
    rope = model.feat_rope
    q = torch.randn(2, 4, 36, 12, dtype=torch.float64)
    out = rope.double()(q)
    cos, sin = rope.freqs_cos, rope.freqs_sin
    even, odd = q[..., 0::2], q[..., 1::2]
    # Pair (2i, 2i+1) rotated by angle_i: (a cos - b sin, b cos + a sin), each pair sharing one angle.
    assert torch.allclose(cos[:, 0::2], cos[:, 1::2]) and torch.allclose(sin[:, 0::2], sin[:, 1::2])
    c, s = cos[:, 0::2], sin[:, 0::2]
    assert torch.allclose(out[..., 0::2], even * c - odd * s)
    assert torch.allclose(out[..., 1::2], odd * c + even * s)
    # Rotations preserve the norm of each pair.
    assert torch.allclose(out.norm(dim=-1), q.norm(dim=-1))


def test_rmsnorm_float32_statistics_and_float64():
    norm = RMSNorm(40)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 40, dtype=torch.float64) * 7
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert torch.allclose(norm.double()(x), ref, rtol=1e-12, atol=1e-12)
    xb = x.to(torch.bfloat16)
    out = RMSNorm(40).to(torch.bfloat16)(xb)
    assert out.dtype == torch.bfloat16
    ref32 = xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(out, ref32.to(torch.bfloat16))


def test_lightningdit_torch_func_jvp_matches_finite_differences():
    # The plain model is the reference for facm_ext.jvp: torch.func.jvp must run through it in float64 (SDPA's
    # CPU flash kernel has no forward-AD formula, so the math backend is selected).
    model = randomize_(tiny_lightningdit()).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    t = torch.rand(2, dtype=torch.float64)
    y = torch.tensor([3, 10])
    tx, tt = torch.randn_like(x), torch.ones_like(t)

    def f(x_, t_):
        return model(x_, t_, y)

    with sdpa_kernel(SDPBackend.MATH):
        primal, tangent = torch.func.jvp(f, (x, t), (tx, tt))
    eps = 1e-6
    fd = (f(x + eps * tx, t + eps * tt) - f(x - eps * tx, t - eps * tt)) / (2 * eps)
    assert torch.allclose(primal, f(x, t))
    assert (fd - tangent).norm() / tangent.norm() < 1e-7


def test_lightningdit_meta_init_then_materialize():
    with torch.device("meta"):
        model = tiny_lightningdit()
    model.to_empty(device="cpu")
    model.initialize_weights()
    ref = tiny_lightningdit()
    assert torch.equal(model.pos_embed, ref.pos_embed)
    assert torch.equal(model.feat_rope.freqs_cos, ref.feat_rope.freqs_cos)
    x, t, y = torch.randn(2, 4, 6, 6), torch.rand(2), torch.tensor([1, 2])
    assert torch.count_nonzero(model(x, t, y)) == 0


def test_lightningdit_compiles_fullgraph():
    model = randomize_(tiny_lightningdit())
    x, t, y = torch.randn(2, 4, 6, 6), torch.rand(2), torch.tensor([1, 10])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-6)


def test_lightningdit_variant_keys_match_official_layers():
    # use_rmsnorm=False: LayerNorm without affine for norm1/norm2/norm_final and affine nn.LayerNorm for q/k norm;
    # use_swiglu=False: timm Mlp (fc1/fc2), as in the official module.
    model = tiny_lightningdit(use_rmsnorm=False, use_swiglu=False, use_qknorm=True)
    block_keys = {k.split(".", 2)[2] for k in model.state_dict() if k.startswith("blocks.0.")}
    assert block_keys == {
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
    }
    assert "final_layer.norm_final.weight" not in model.state_dict()
    assert tuple(model.blocks[0].mlp.fc1.weight.shape) == (192, 48)
    x, t, y = torch.randn(2, 4, 6, 6), torch.rand(2), torch.tensor([1, 10])
    assert randomize_(model)(x, t, y).shape == (2, 4, 6, 6)


@pytest.mark.parametrize("make", ["lightningdit", "dit"])
def test_bf16_models_run_without_autocast(make):
    model = randomize_(tiny_lightningdit() if make == "lightningdit" else tiny_dit())
    size = model.input_size
    x, t, y = torch.randn(2, 4, size, size), torch.rand(2), torch.tensor([1, 10])
    ref = model(x, t, y)
    out = model.to(torch.bfloat16)(x, t, y)
    assert out.dtype == torch.bfloat16
    # Two bf16 blocks on O(1) activations: a few bf16 roundings per layer (rel 2^-8 each).
    assert (out.float() - ref).norm() / ref.norm() < 5e-2


# --------------------------------------------------------------------------------------------- DiT


def tiny_dit(**kw) -> DiT:
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=4, num_classes=10)
    cfg.update(kw)
    return DiT(**cfg)


def official_dit_keys(depth: int) -> set[str]:
    """State-dict keys of facebookresearch/DiT models.py (timm PatchEmbed/Attention/Mlp), written out by hand."""
    keys = {
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }
    block = [
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
    ]
    for i in range(depth):
        keys |= {f"blocks.{i}.{k}" for k in block}
    return keys


def test_dit_xl_param_count_and_shapes():
    with torch.device("meta"):
        model = DiT_XL_2(learn_sigma=True)
    # Official DiT-XL/2 reports 675,129,632 parameters, counting its frozen pos_embed Parameter (here a buffer).
    assert count_params(model) + model.pos_embed.numel() == 675_129_632
    block = model.blocks[0]
    assert len(model.blocks) == 28
    assert tuple(block.mlp.fc1.weight.shape) == (4608, 1152)
    assert isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "tanh"
    assert block.norm1.elementwise_affine is False and block.norm1.eps == 1e-6
    assert tuple(model.final_layer.linear.weight.shape) == (2 * 2 * 8, 1152)
    assert tuple(model.pos_embed.shape) == (1, 256, 1152)


def test_dit_state_dict_keys_are_official():
    assert set(tiny_dit().state_dict()) == official_dit_keys(2)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_dit_forward_shape_and_zero_init(learn_sigma):
    model = tiny_dit(learn_sigma=learn_sigma)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    out = model(x, t, y)
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert torch.count_nonzero(out) == 0
    tokens, c = model.embed(x, t, y)
    assert tokens.shape == (3, 16, 48)
    assert torch.equal(model.blocks[1](tokens, c), tokens)
    randomize_(model)
    assert model(x, t, y).abs().sum() > 0


def test_dit_torch_func_jvp_matches_finite_differences():
    model = randomize_(tiny_dit()).double()
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([1, 10])
    tx, tt = torch.randn_like(x), torch.ones_like(t)

    def f(x_, t_):
        return model(x_, t_, y)

    with sdpa_kernel(SDPBackend.MATH):
        _, tangent = torch.func.jvp(f, (x, t), (tx, tt))
    eps = 1e-6
    fd = (f(x + eps * tx, t + eps * tt) - f(x - eps * tx, t - eps * tt)) / (2 * eps)
    assert (fd - tangent).norm() / tangent.norm() < 1e-7


def test_sincos_pos_embed_matches_official_formula():
    # Official (MAE) layout: channels [0, C/2) encode the column w, [C/2, C) the row h; each half is [sin, cos].
    model = tiny_dit(hidden_size=16, num_heads=2)
    pos = model.pos_embed[0]
    grid = model.grid_size
    omega = [1.0 / 10000 ** (i / 4) for i in range(4)]
    for token in range(grid * grid):
        h, w = divmod(token, grid)
        expect = [math.sin(w * o) for o in omega] + [math.cos(w * o) for o in omega]
        expect += [math.sin(h * o) for o in omega] + [math.cos(h * o) for o in omega]
        assert torch.allclose(pos[token], torch.tensor(expect), atol=1e-6)


# --------------------------------------------------------------------------------------------- checkpoints


def official_layout_state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A synthetic state dict with the official key names (from the hand-written lists) and random values."""
    return {prefix + k: torch.randn_like(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["bare", "ema", "model", "module_prefix", "compiled_prefix"])
def test_load_lightningdit_checkpoint_layouts(layout, tmp_path):
    model = tiny_lightningdit()
    state = official_layout_state_dict(model)
    assert set(state) == official_lightningdit_keys(2, qknorm=True, rope=True)
    if layout == "bare":
        ckpt = state
    elif layout == "ema":
        ckpt = {"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": state, "opt": {}}
    elif layout == "model":
        ckpt = {"model": state, "steps": 7}
    elif layout == "module_prefix":
        ckpt = {"ema": {"module." + k: v for k, v in state.items()}}
    else:
        ckpt = {"_orig_mod.module." + k: v for k, v in state.items()}
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    loaded = load_lightningdit_checkpoint(path, tiny_lightningdit())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    # Already-loaded dicts work too.
    assert torch.equal(load_lightningdit_checkpoint(ckpt, tiny_lightningdit()).pos_embed, state["pos_embed"])


def test_load_checkpoint_reports_missing_unexpected_and_shape_errors():
    state = official_layout_state_dict(tiny_lightningdit(use_qknorm=True))
    with pytest.raises(ValueError) as info:
        load_lightningdit_checkpoint(state, tiny_lightningdit(use_qknorm=False))
    assert "unexpected keys (4)" in str(info.value) and "blocks.0.attn.q_norm.weight" in str(info.value)
    del state["blocks.1.mlp.w3.bias"]
    state["final_layer.linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as info:
        load_lightningdit_checkpoint(state, tiny_lightningdit())
    msg = str(info.value)
    assert "missing keys (1): ['blocks.1.mlp.w3.bias']" in msg
    assert "final_layer.linear.weight: checkpoint (3, 3)" in msg
    with pytest.raises(ValueError, match="path_or_state_dict"):
        load_checkpoint("/nonexistent/ckpt.pt", tiny_lightningdit())
    with pytest.raises(ValueError, match="path_or_state_dict"):
        load_checkpoint(42, tiny_lightningdit())


def test_load_dit_checkpoint_official_keys():
    model = tiny_dit(learn_sigma=True)
    state = official_layout_state_dict(model)
    assert set(state) == official_dit_keys(2)
    loaded = load_dit_checkpoint(state, tiny_dit(learn_sigma=True))
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])


def test_load_checkpoint_refuses_pickled_objects_unless_trusted(tmp_path):
    import argparse

    state = official_layout_state_dict(tiny_dit())
    path = tmp_path / "with_args.pt"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ValueError, match="trust_pickle"):
        load_dit_checkpoint(path, tiny_dit())
    loaded = load_dit_checkpoint(path, tiny_dit(), trust_pickle=True)
    assert torch.equal(loaded.pos_embed, state["pos_embed"])


# --------------------------------------------------------------------------------------------- Wan 2.2


def official_wan_block_keys(cross_attn_norm: bool = True) -> set[str]:
    """State-dict keys of one Wan-Video/Wan2.2 WanAttentionBlock (qk_norm on), written out by hand."""
    keys = {"modulation", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias"}
    for attn in ("self_attn", "cross_attn"):
        for lin in "qkvo":
            keys |= {f"{attn}.{lin}.weight", f"{attn}.{lin}.bias"}
        keys |= {f"{attn}.norm_q.weight", f"{attn}.norm_k.weight"}
    if cross_attn_norm:
        keys |= {"norm3.weight", "norm3.bias"}
    return keys


def official_wan_model_keys(num_layers: int) -> set[str]:
    keys = {
        "patch_embedding.weight", "patch_embedding.bias",
        "text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
        "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
        "time_projection.1.weight", "time_projection.1.bias",
        "head.head.weight", "head.head.bias", "head.modulation",
    }
    for i in range(num_layers):
        keys |= {f"blocks.{i}.{k}" for k in official_wan_block_keys()}
    return keys


def wan_inputs(model: WanModel, batch: int = 2, frames: int = 3, height: int = 4, width: int = 6, dtype=torch.float32):
    x = torch.randn(batch, model.in_dim, frames, height, width, dtype=dtype)
    t = torch.rand(batch, dtype=dtype) * 1000
    context = torch.randn(batch, model.text_len, model.text_dim, dtype=dtype)
    return x, t, context


def test_wan_a14b_shapes_and_param_count():
    with torch.device("meta"):
        block = WanBlock(5120, 13824, 40)
        model = WanModel(**Wan22_A14B_config)
    assert count_params(block) == 351_394_304  # ~351M per block
    assert count_params(model) == 14_288_491_584  # ~14B per expert
    assert len(model.blocks) == 40 and model.head_dim == 128
    assert tuple(model.blocks[0].modulation.shape) == (1, 6, 5120)
    assert tuple(model.blocks[0].self_attn.norm_q.weight.shape) == (5120,)  # RMSNorm over all channels
    assert isinstance(model.blocks[0].self_attn.norm_q, RMSNorm)
    assert model.blocks[0].norm1.elementwise_affine is False and model.blocks[0].norm3.elementwise_affine is True


def test_wan_state_dict_keys_are_official():
    model = wan_small()
    assert set(model.state_dict()) == official_wan_model_keys(2)
    assert set(WanBlock(64, 128, 2, cross_attn_norm=False).state_dict()) == official_wan_block_keys(False)


def test_wan_forward_shape_and_zero_output_layer():
    model = wan_small()
    x, t, context = wan_inputs(model)
    out = model(x, t, context)
    assert out.shape == x.shape
    # The official init zeroes the output Linear weight (bias too): a fresh model predicts exactly zero.
    assert torch.count_nonzero(out) == 0
    randomize_(model)
    assert model(x, t, context).abs().sum() > 0


def official_style_rope(x: torch.Tensor, grid, theta: float = 10000.0) -> torch.Tensor:
    """Wan's rope_apply, written independently: complex multiplication of channel pairs, per-axis frequency
    tables of dims d - 4*(d//6), 2*(d//6), 2*(d//6) concatenated. x [L, H, D] -> [L, H, D]."""
    d = x.shape[-1]
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    tables = []
    for axis_dim in dims:
        freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        tables.append(torch.polar(torch.ones(1024, freqs.numel(), dtype=torch.float64),
                                  torch.outer(torch.arange(1024, dtype=torch.float64), freqs)))
    f, h, w = grid
    freqs_i = torch.cat(
        [
            tables[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            tables[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            tables[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    x_c = torch.view_as_complex(x.to(torch.float64).reshape(f * h * w, x.shape[1], -1, 2))
    return torch.view_as_real(x_c * freqs_i).flatten(2)


@pytest.mark.parametrize("head_dim", [128, 32, 24])
def test_wan_rope_tables_match_official_complex_rope(head_dim):
    from facm_ext.models import InterleavedRoPE

    grid = (3, 4, 5)
    tokens = 60
    cos, sin = wan_rope_tables(head_dim, grid)
    assert cos.shape == (tokens, head_dim)
    x = torch.randn(tokens, 2, head_dim, dtype=torch.float64)
    ours = InterleavedRoPE()(x.transpose(0, 1), cos.double(), sin.double()).transpose(0, 1)
    ref = official_style_rope(x, grid)
    # Tables are stored in float32, so agreement is to float32 rounding of cos/sin.
    assert (ours - ref).abs().max() < 1e-6
    # Pair split for head_dim 128 is 22/21/21 (frames/height/width).
    if head_dim == 128:
        _, sin_t = wan_rope_tables(128, (2, 1, 1))
        assert torch.all(sin_t[1, :44] != 0) and torch.all(sin_t[1, 44:] == 0)


def test_wan_rope_tables_padding_is_identity():
    cos, sin = wan_rope_tables(32, (2, 2, 2), seq_len=11)
    assert cos.shape == (11, 32)
    assert torch.all(cos[8:] == 1) and torch.all(sin[8:] == 0)
    with pytest.raises(ValueError, match="seq_len"):
        wan_rope_tables(32, (2, 2, 2), seq_len=7)


def test_wan_block_padded_keys_are_irrelevant():
    model = randomize_(wan_small())
    block = model.blocks[0]
    batch, length, valid = 2, 20, torch.tensor([13, 20])
    x = torch.randn(batch, length, 64)
    e = torch.randn(batch, length, 6, 64)
    context = torch.randn(batch, 8, 64)
    cos, sin = wan_rope_tables(32, (1, 3, 4), seq_len=length)
    out = block(x, e, valid, cos, sin, context)
    x2 = x.clone()
    x2[0, 13:] = torch.randn(7, 64) * 10  # change only sample 0's padded tokens
    out2 = block(x2, e, valid, cos, sin, context)
    assert torch.allclose(out2[0, :13], out[0, :13], rtol=1e-5, atol=1e-5)
    assert torch.equal(out2[1], out[1])
    assert not torch.allclose(out2[0, 13:], out[0, 13:])
    # Without key lengths the padded tokens do leak into the valid ones (the test above can fail).
    leaky = block(x2, e, None, cos, sin, context)
    assert not torch.allclose(leaky[0, :13], block(x, e, None, cos, sin, context)[0, :13], rtol=1e-5, atol=1e-5)


def test_wan_seq_len_padding_matches_unpadded():
    model = randomize_(wan_small())
    x, t, context = wan_inputs(model)  # 3 * 2 * 3 = 18 tokens
    out = model(x, t, context)
    padded = model(x, t, context, seq_len=25)
    assert torch.allclose(padded, out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        model(x, t, context, seq_len=10)


def test_wan_per_token_timesteps():
    model = randomize_(wan_small())
    x, t, context = wan_inputs(model)
    per_token = t[:, None].expand(2, 18).contiguous()
    assert torch.allclose(model(x, per_token, context), model(x, t, context), rtol=1e-6, atol=1e-6)
    # A different time on the first frame's tokens (Wan 2.2 TI2V style) changes the output.
    per_token[:, :6] = 0.0
    assert not torch.allclose(model(x, per_token, context), model(x, t, context))
    with pytest.raises(ValueError, match="t"):
        model(x, torch.rand(2, 5), context)


def test_wan_block_modulation_views_and_fp32_residual():
    model = wan_small()
    _, e, kwargs = model.prepare(*wan_inputs(model))
    assert kwargs["e"].dtype == torch.float32 and tuple(kwargs["e"].shape) == (2, 18, 6, 64)
    chunk = (model.blocks[0].modulation.unsqueeze(0) + kwargs["e"]).chunk(6, dim=2)[1].squeeze(2)
    assert chunk.shape == (2, 18, 64) and chunk.stride(1) == 6 * 64 and not chunk.is_contiguous()
    # bf16 weights run without autocast; the residual stream and the output stay float32.
    model_bf16 = randomize_(wan_small()).to(torch.bfloat16)
    tokens, e, kwargs = model_bf16.prepare(*wan_inputs(model_bf16))
    assert tokens.dtype == torch.float32 and kwargs["e"].dtype == torch.float32
    out = model_bf16.blocks[0](tokens, **kwargs)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_wan_torch_func_jvp_matches_finite_differences():
    model = randomize_(wan_small()).double()
    x, t, context = wan_inputs(model, dtype=torch.float64)
    tx, tt = torch.randn_like(x), torch.ones_like(t)

    def f(x_, t_):
        return model(x_, t_, context, seq_len=21)

    with sdpa_kernel(SDPBackend.MATH):
        _, tangent = torch.func.jvp(f, (x, t), (tx, tt))
    eps = 1e-6
    fd = (f(x + eps * tx, t + eps * tt) - f(x - eps * tx, t - eps * tt)) / (2 * eps)
    assert (fd - tangent).norm() / tangent.norm() < 1e-7


def test_wan_block_and_model_compile_fullgraph():
    model = randomize_(wan_small())
    block = model.blocks[1]
    x = torch.randn(2, 20, 64)
    e = torch.randn(2, 20, 6, 64)
    cos, sin = wan_rope_tables(32, (1, 3, 4), seq_len=20)
    context, lens = torch.randn(2, 8, 64), torch.tensor([12, 20])
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x, e, lens, cos, sin, context), block(x, e, lens, cos, sin, context), atol=1e-6)
    video, t, text = wan_inputs(model)
    compiled_model = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.allclose(compiled_model(video, t, text, seq_len=21), model(video, t, text, seq_len=21), atol=1e-6)


def test_load_wan_checkpoint_official_keys():
    state = official_layout_state_dict(wan_small())
    assert set(state) == official_wan_model_keys(2)
    loaded = load_checkpoint(state, wan_small())
    assert torch.equal(loaded.blocks[1].modulation, state["blocks.1.modulation"])


def test_dit_compiles_fullgraph():
    model = randomize_(tiny_dit())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-6)
