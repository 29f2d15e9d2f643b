"""The trainer CLI (python -m facm_ext.train): end-to-end runs of both stages on the CPU, bit-for-bit resume,
checkpoint integrity, official-weight loading, bad configurations, and the PNG / metric helpers."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda
from facm_ext import train
from facm_ext.facm import checkpoint as ckpt
from facm_ext.facm import digits
from facm_ext.facm.png import encode_png, image_grid

TINY = ["--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--batch", "8", "--threads", "1",
        "--eval-samples", "20", "--eval-batch", "20", "--teacher-steps", "3", "--log-every", "100"]


def run(tmp: Path, *extra) -> dict | None:
    return train.run(["--output-dir", str(tmp), *TINY, *extra])


def test_default_run_end_to_end(tmp_path):
    results = run(tmp_path, "--stage1-steps", "3", "--facm-steps", "2", "--ckpt-every", "2", "--eval-seeds", "2")
    samplers = [r["sampler"] for r in results["rows"]]
    assert samplers == ["20 training images vs held-out", "teacher, Euler 3 steps", "teacher, Euler 2 steps",
                        "FACM, 1-step", "FACM, 2-step"]
    assert [r["nfe"] for r in results["rows"]][-2:] == [1, 2]
    assert all(r["fd"] >= 0 and 0 <= r["accuracy"] <= 1 for r in results["rows"])
    assert [r["seeds"] for r in results["rows"]] == [1, 2, 2, 2, 2]
    assert all(r["fd_std"] > 0 for r in results["rows"][1:])  # two different noise draws
    for name in ("real.png", "FACM_1-step.png", "FACM_2-step.png", "results.json", train.TEACHER_FILE):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "real.png").read_bytes().startswith(b"\x89PNG")
    kept = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["ckpt-00000004.pt", "ckpt-00000005.pt"]  # keep 2: steps 2, 3 (end of stage 1) pruned
    final = ckpt.load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000005.pt")
    assert final["step"] == 5 and final["teacher"] is not None


def _final_state(folder: Path, step: int) -> dict:
    return ckpt.load_checkpoint(folder / "checkpoints" / ckpt.checkpoint_name(step))


def _assert_identical(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("resume_step", [2, 4])  # inside stage 1 (crossing the stage switch), inside stage 2
def test_resume_is_bit_for_bit(tmp_path, resume_step):
    common = ["--stage1-steps", "3", "--facm-steps", "3", "--ckpt-every", "2", "--keep-checkpoints", "10",
              "--no-eval"]
    straight = tmp_path / "straight"
    run(straight, *common)
    resumed = tmp_path / "resumed"
    start = straight / "checkpoints" / ckpt.checkpoint_name(resume_step)
    run(resumed, *common, "--resume", str(start))
    a, b = _final_state(straight, 6), _final_state(resumed, 6)
    for key in ("model", "ema", "ema_updates", "optimizer", "teacher", "rng", "step"):
        _assert_identical(a[key], b[key], key)


def test_resume_auto_continues_a_longer_run(tmp_path):
    run(tmp_path / "a", "--stage1-steps", "2", "--facm-steps", "2", "--ckpt-every", "1", "--no-eval")
    run(tmp_path / "b", "--stage1-steps", "2", "--facm-steps", "1", "--ckpt-every", "1", "--no-eval")
    run(tmp_path / "b", "--stage1-steps", "2", "--facm-steps", "2", "--ckpt-every", "1", "--no-eval",
        "--resume", "auto")
    _assert_identical(_final_state(tmp_path / "a", 4)["model"], _final_state(tmp_path / "b", 4)["model"])


def test_resume_rejects_a_different_configuration(tmp_path):
    run(tmp_path, "--stage1-steps", "2", "--facm-steps", "0", "--ckpt-every", "1", "--no-eval")
    with pytest.raises(ValueError, match="--lr"):
        run(tmp_path, "--stage1-steps", "2", "--facm-steps", "0", "--no-eval", "--lr", "0.01", "--resume", "auto")


def test_checkpoint_corruption_is_detected_and_previous_kept(tmp_path):
    run(tmp_path, "--stage1-steps", "2", "--facm-steps", "0", "--ckpt-every", "1", "--no-eval")
    folder = tmp_path / "checkpoints"
    first, second = ckpt.list_checkpoints(folder)
    good_bytes = first.read_bytes()
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_checkpoint(second)
    with pytest.raises(ckpt.CheckpointError, match=str(second.name)):
        run(tmp_path, "--stage1-steps", "2", "--facm-steps", "0", "--no-eval", "--resume", "auto")
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    second.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.load_checkpoint(second)
    second.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not a facm_ext"):
        ckpt.load_checkpoint(second)
    assert first.read_bytes() == good_bytes
    assert ckpt.load_checkpoint(first)["step"] == 1


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt-00000001.pt"
    ckpt.save_checkpoint({"step": 1, "w": torch.arange(4)}, path)
    before = path.read_bytes()

    def failing_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", failing_write)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2, "w": torch.arange(8)}, path)
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["step"] == 1


def _official_like_state(config: dict, seed: int) -> dict:
    from facm_ext.models import LightningDiT

    torch.manual_seed(seed)
    model = LightningDiT(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_official_lightningdit_and_facm_layouts(tmp_path):
    from facm_ext.models import LightningDiT

    config = train.model_config(train.build_parser().parse_args(TINY))
    weights = _official_like_state(config, seed=3)
    other = _official_like_state(config, seed=4)
    # LightningDiT train.py layout with a DDP prefix, saved to a local file
    path = tmp_path / "lightningdit.pt"
    torch.save({"model": {f"module.{k}": v for k, v in other.items()},
                "ema": {f"module.{k}": v for k, v in weights.items()}}, path)
    model = ckpt.load_official_weights(str(path), LightningDiT(**config))
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    # FACM train.py layout: PostHocEMA state, ema_models.1 is the one FACM uses
    facm_layout = {"model": other, "emas": {**{f"ema_models.0.ema_model.{k}": v for k, v in other.items()},
                                            **{f"ema_models.1.ema_model.{k}": v for k, v in weights.items()}}}
    model = ckpt.load_official_weights(facm_layout, LightningDiT(**config))
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    # wrong shapes: a clear error listing the keys
    bad = dict(weights)
    bad["final_layer.linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="final_layer.linear.weight"):
        ckpt.load_official_weights({"ema": bad}, LightningDiT(**config))


def test_distill_from_an_official_checkpoint(tmp_path):
    config = train.model_config(train.build_parser().parse_args(TINY))
    path = tmp_path / "official.pt"
    torch.save({"ema": _official_like_state(config, seed=5)}, path)
    results = run(tmp_path / "out", "--teacher-from", str(path), "--stage1-steps", "0", "--facm-steps", "2",
                  "--fm-weight", "0", "--jvp", "torch", "--split-backward")
    assert results["rows"][-1]["sampler"] == "FACM (fm_weight=0), 2-step"
    saved = ckpt.load_checkpoint(tmp_path / "out" / "checkpoints" / ckpt.checkpoint_name(2))
    for k, v in _official_like_state(config, seed=5).items():
        assert torch.equal(saved["teacher"][k], v), k


def test_meanflow_objective_runs(tmp_path):
    results = run(tmp_path, "--stage1-steps", "2", "--facm-steps", "2", "--objective", "meanflow",
                  "--cfg-scale", "1.0")
    assert [r["sampler"] for r in results["rows"]][-2:] == ["MeanFlow, 1-step", "MeanFlow, 2-step"]


@pytest.mark.parametrize("flags, match", [
    (["--num-heads", "3"], "--num-heads"),
    (["--hidden-size", "24", "--num-heads", "4"], "head dim"),
    (["--batch", "0"], "--batch"),
    (["--fm-weight", "-1"], "--fm-weight"),
    (["--ema-decay", "1.0"], "--ema-decay"),
    (["--lr", "0"], "--lr"),
    (["--guidance-interval", "0.9", "0.1"], "--guidance-interval"),
    (["--stage1-steps", "0"], "--teacher-from"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume"),
    (["--teacher-from", "/nonexistent/teacher.pt"], "--teacher-from"),
    (["--device", "tpu"], "--device"),
    (["--jvp", "graph", "--device", "cpu"], "--jvp graph: CUDA graphs need a CUDA device"),
])
def test_bad_configurations_are_rejected(tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, *flags)


def test_unknown_flag_exits_with_usage(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--no-such-flag")
    assert "usage" in capsys.readouterr().err


def test_console_entry_point_reports_errors_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--output-dir", str(tmp_path), "--num-heads", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("facm-train: error: --num-heads") and "Traceback" not in err


def test_png_encoding_round_trip():
    image = torch.arange(12 * 7, dtype=torch.uint8).reshape(12, 7)
    data = encode_png(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, color) == (7, 12, 8, 0)
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41:41 + idat_len])
    rows = [raw[i * 8 + 1:(i + 1) * 8] for i in range(12)]
    assert b"".join(rows) == bytes(image.flatten().tolist())
    grid = image_grid(torch.zeros(3, 1, 2, 2), nrow=2, scale=2, padding=1)
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1)
    with pytest.raises(ValueError, match="image"):
        encode_png(torch.zeros(3, 3))


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 5, generator=g, dtype=torch.float64)
    assert digits.frechet_distance(a, a) < 1e-8
    shift = torch.tensor([1.0, 0, 0, 2.0, 0], dtype=torch.float64)
    assert abs(digits.frechet_distance(a, a + shift) - 5.0) < 1e-6
    # scaled covariance: tr(S + 4S - 2 * 2S) = tr(S)
    value = digits.frechet_distance(a, 2 * a)
    mu = a.mean(0)
    expected = mu.square().sum().item() + torch.cov(a.T).trace().item()
    assert abs(value - expected) < 1e-6


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *flags) -> str:
    """``torchrun --nproc_per_node 2 -m facm_ext.train`` with TINY and ``flags``; returns its stderr."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "facm_ext.train", "--output-dir", str(out), *TINY, *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def test_torchrun_fsdp2_matches_single_process(tmp_path):
    """2 ranks (gloo, FSDP2 per block + root, JVP through facm_ext.chain's handler) train the same global batch as
    one process: parameters agree to float32 rounding after stage 1 and after FACM steps, and every parameter
    moved during the FACM steps (no gradient lost at FSDP unit boundaries)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    common = ["--stage1-steps", "3", "--facm-steps", "2", "--ckpt-every", "1", "--keep-checkpoints", "10",
              "--no-eval"]
    _torchrun(tmp_path / "dist", *common)
    run(tmp_path / "single", *common)
    for step in (3, 5):
        a = _final_state(tmp_path / "dist", step)["model"]
        b = _final_state(tmp_path / "single", step)["model"]
        assert set(a) == set(b)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"step {step}: {k}")
    before, after = _final_state(tmp_path / "dist", 3)["model"], _final_state(tmp_path / "dist", 5)["model"]
    frozen = [k for k in after if k not in ("pos_embed",) and not k.startswith("feat_rope.")
              and torch.equal(before[k], after[k])]
    assert not frozen, f"parameters that did not move in the FACM steps: {frozen}"


@requires_cuda
def test_gpu_run_bf16(tmp_path):
    results = run(tmp_path, "--device", "cuda", "--precision", "bf16", "--stage1-steps", "3", "--facm-steps", "2")
    assert [r["nfe"] for r in results["rows"]][-2:] == [1, 2]
    assert all(math.isfinite(r["fd"]) for r in results["rows"])


@requires_cuda
def test_gpu_run_graph_jvp(tmp_path):
    """--jvp graph: the FACM steps replay the student's JVP from a CUDA graph (captured at the first FACM step)."""
    results = run(tmp_path, "--device", "cuda", "--precision", "bf16", "--jvp", "graph", "--stage1-steps", "3",
                  "--facm-steps", "3")
    assert all(math.isfinite(r["fd"]) for r in results["rows"])


@pytest.mark.parametrize("flags, world_sizes, match", [
    (["--objective", "meanflow"], (1, 2), "--objective meanflow"),
    (["--split-backward"], (1,), "--split-backward"),  # under torchrun each block is replayed on its own
])
def test_graph_jvp_flag_rejects_what_it_cannot_replay(flags, world_sizes, match):
    from facm_ext import train

    args = train.build_parser().parse_args(["--jvp", "graph", *flags])
    for world_size in (1, 2):
        if world_size in world_sizes:
            with pytest.raises(ValueError, match=match):
                train.validate(args, world_size, torch.device("cuda"))
        else:
            train.validate(args, world_size, torch.device("cuda"))


@requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("split_backward", [False, True], ids=["one_backward", "split_backward"])
def test_torchrun_graph_jvp_replays_fsdp2_blocks(tmp_path, split_backward):
    """--jvp graph under torchrun (2 GPUs, NCCL, FSDP2): the FACM steps replay each block's JVP and backward from
    CUDA graphs (facm_ext.chain.set_block_graphs). Every block is captured, none turned down, and the FACM
    steps move the parameters as the eager chain's do (--jvp fused), up to bf16 replay noise amplified by AdamW:
    a lost or stale gradient of a block would be off by about its whole update."""
    # 30 teacher steps: from adaLN-zero's initialization the FACM gradients would be almost nothing but bf16 noise.
    stage1, facm_steps = 30, 4
    common = ["--device", "cuda", "--precision", "bf16", "--stage1-steps", str(stage1), "--facm-steps",
              str(facm_steps), "--ckpt-every", "2", "--keep-checkpoints", "4", "--no-eval",
              *(["--split-backward"] if split_backward else [])]
    log = _torchrun(tmp_path / "graph", "--jvp", "graph", *common)
    _torchrun(tmp_path / "eager", "--jvp", "fused", *common)
    depth = TINY[TINY.index("--depth") + 1]
    assert f"replayed from CUDA graphs {{'tangent': 0, 'grad': {depth}}}, turned down (ran eagerly) {{}}" in log, log
    # Each run's FACM updates from its own stage-1 state (the same up to the GPU's nondeterministic reductions).
    end = stage1 + facm_steps
    delta = {}
    for name in ("graph", "eager"):
        start, final = (_final_state(tmp_path / name, step)["model"] for step in (stage1, end))
        delta[name] = {k: (final[k] - start[k]).double() for k in start}
    moved = [k for k, d in delta["eager"].items() if d.norm() > 0]
    assert moved
    graph_delta = torch.cat([delta["graph"][k].flatten() for k in moved])
    eager_delta = torch.cat([delta["eager"][k].flatten() for k in moved])
    assert (graph_delta - eager_delta).norm() <= 0.1 * eager_delta.norm()
    for k in moved:  # no block's update lost
        assert delta["graph"][k].norm() >= 0.5 * delta["eager"][k].norm(), k
