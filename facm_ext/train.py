"""``python -m facm_ext.train`` (console script ``facm-train``): FACM on a dataset that ships with scikit-learn.

With no arguments: load the 8x8 handwritten digits (no download), train a tiny LightningDiT teacher with the
expanded time interval (stage 1), distill it with FACM (stage 2), then report sample quality at NFE = 1 and 2 and
for the multi-step teacher, as a Frechet distance in the feature space of a small classifier trained in the same
run against held-out real digits, and write sample grids as PNG files into ``--output-dir``.

Everything random (batch indices, t, noise, label drops) comes from one CPU generator whose state is checkpointed
with the model, EMA and optimizer, so ``--resume`` continues bit for bit on the CPU.

``torchrun --nproc_per_node N -m facm_ext.train ...`` shards the student with FSDP2 (one unit per block plus the
root); the JVP streams through the units with facm_ext.chain's FSDP2 handler. Each rank draws the same global
batch and keeps its slice, so the global batch (``--batch``) and the objective do not depend on N (the logged
losses are rank 0's share). Evaluation runs on rank 0 with gathered EMA weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from facm_ext import facm
from facm_ext._teardown import exit_without_teardown
from facm_ext.facm import checkpoint as ckpt
from facm_ext.facm import digits
from facm_ext.facm.png import image_grid, write_png

TEACHER_FILE = "teacher.pt"
# Arguments that may differ between a run and its resumption; every other one must match the checkpoint's.
RESUMABLE_CHANGES = {"output_dir", "resume", "log_every", "eval_samples", "eval_seeds", "teacher_steps", "ckpt_every",
                     "keep_checkpoints", "device", "threads", "no_eval", "facm_steps", "eval_batch"}


# ------------------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facm-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="facm_digits_run", help="checkpoints, sample grids, results.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast on CUDA (parameters stay fp32)")
    g = p.add_argument_group("data and model")
    g.add_argument("--image-size", type=int, choices=[8, 16], default=8, help="digits as is (8) or upsampled (16)")
    g.add_argument("--patch-size", type=int, choices=[1, 2], default=2, help="2: 16 tokens for 8x8 digits")
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--mlp-ratio", type=float, default=4.0)
    g = p.add_argument_group("optimization")
    g.add_argument("--batch", type=int, default=64, help="global batch size")
    g.add_argument("--stage1-steps", type=int, default=1500, help="teacher pretraining steps (0: skip)")
    g.add_argument("--facm-steps", type=int, default=500, help="FACM distillation steps")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, stage 1")
    g.add_argument("--facm-lr", type=float, default=3e-4, help="AdamW learning rate, stage 2")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay (warmed up as (1+k)/(10+k))")
    g.add_argument("--label-dropout", type=float, default=0.1, help="stage 1: null-label rate (guidance)")
    g = p.add_argument_group("FACM")
    g.add_argument("--objective", choices=["facm", "meanflow"], default="facm")
    g.add_argument("--fm-weight", type=float, default=1.0, help="weight of the FM anchor (0: no-anchor ablation)")
    g.add_argument("--cfg-scale", type=float, default=1.75, help="guidance of the teacher's target velocity")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=(0.125, 1.0), metavar=("LOW", "HIGH"))
    g.add_argument("--p", type=float, default=0.5, help="alpha = 1 - t^p")
    g.add_argument("--time-mean", type=float, default=-0.8)
    g.add_argument("--time-std", type=float, default=1.6)
    g.add_argument("--jvp", choices=["fused", "graph", "torch"], default="fused",
                   help="fused: facm_ext.jvp; graph: facm_ext.jvp replayed from CUDA graphs (FACM objective; "
                        "one GPU: the whole model's JVP; under torchrun: each FSDP2 block's, "
                        "facm_ext.chain.set_block_graphs); torch: torch.func.jvp with math attention "
                        "(the official path)")
    g.add_argument("--split-backward", action="store_true",
                   help="backward of the FM part before the JVP pass (same gradients, lower peak memory)")
    g.add_argument("--teacher-from", default=None,
                   help="skip stage 1: teacher weights from a teacher.pt of an earlier run or an official "
                        "LightningDiT/FACM checkpoint (needs a matching --hidden-size/--depth/...)")
    g.add_argument("--trust-pickle", action="store_true", help="allow pickled objects in --teacher-from")
    g = p.add_argument_group("checkpoints and evaluation")
    g.add_argument("--resume", default=None, help="a checkpoint file, or 'auto' (newest in OUTPUT_DIR/checkpoints)")
    g.add_argument("--ckpt-every", type=int, default=200)
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--eval-samples", type=int, default=1000)
    g.add_argument("--eval-seeds", type=int, default=1, help="noise draws the FD is averaged over")
    g.add_argument("--eval-batch", type=int, default=250)
    g.add_argument("--teacher-steps", type=int, default=32, help="Euler steps of the multi-step teacher")
    g.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    return p


def validate(args: argparse.Namespace, world_size: int, device: torch.device | None = None) -> None:
    """Raise ValueError naming the flag for configurations that cannot work."""
    if args.jvp == "graph":
        if device is not None and device.type != "cuda":
            raise ValueError(f"--jvp graph: CUDA graphs need a CUDA device, got --device {args.device} ({device})")
        if args.objective != "facm":
            raise ValueError(f"--jvp graph: replays the FACM student's JVP; not for --objective {args.objective}")
        # One process replays the whole JVP pass from one graph captured before the FM forward; under FSDP2 each
        # block is replayed on its own, in whatever order the loss runs the two passes.
        if args.split_backward and world_size == 1:
            raise ValueError("--jvp graph: in one process the JVP pass must run before the FM forward, which "
                             "--split-backward reverses (under torchrun both work)")

    def positive(name, value):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")

    for name in ("hidden_size", "depth", "num_heads", "batch", "ckpt_every", "keep_checkpoints", "log_every",
                 "eval_batch", "teacher_steps", "eval_seeds"):
        positive(name, getattr(args, name))
    for name in ("stage1_steps", "facm_steps", "eval_samples", "threads"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    if args.hidden_size % args.num_heads:
        raise ValueError(f"--num-heads: {args.num_heads} does not divide --hidden-size {args.hidden_size}")
    head_dim = args.hidden_size // args.num_heads
    if head_dim % 4:
        raise ValueError(f"--hidden-size/--num-heads: head dim {head_dim} must be a multiple of 4 (2D RoPE)")
    if args.batch % world_size:
        raise ValueError(f"--batch: {args.batch} is not divisible by the {world_size} processes")
    for name in ("lr", "facm_lr", "max_grad_norm", "time_std"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')}: expected a finite number > 0, got {value}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay: expected a number in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.label_dropout < 1.0:
        raise ValueError(f"--label-dropout: expected a probability in [0, 1), got {args.label_dropout}")
    if not (math.isfinite(args.fm_weight) and args.fm_weight >= 0):
        raise ValueError(f"--fm-weight: expected a finite number >= 0, got {args.fm_weight}")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise ValueError(f"--cfg-scale: expected a finite number >= 0, got {args.cfg_scale}")
    low, high = args.guidance_interval
    if not low <= high:
        raise ValueError(f"--guidance-interval: expected LOW <= HIGH, got {low} {high}")
    if args.p <= 0:
        raise ValueError(f"--p: expected > 0, got {args.p}")
    if args.stage1_steps == 0 and args.teacher_from is None and args.facm_steps > 0:
        raise ValueError("--stage1-steps 0 needs --teacher-from (a teacher to distill)")
    if args.teacher_from is not None and not Path(args.teacher_from).is_file():
        raise ValueError(f"--teacher-from: no file at {args.teacher_from}")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise ValueError(f"--resume: no checkpoint file at {args.resume}")
    if args.objective == "meanflow" and world_size > 1:
        raise ValueError("--objective meanflow: runs in a single process only (not under torchrun)")
    if args.stage1_steps + args.facm_steps == 0 and args.teacher_from is None:
        raise ValueError("--stage1-steps and --facm-steps are both 0: nothing to train or evaluate")


def model_config(args) -> dict:
    return dict(input_size=args.image_size, patch_size=args.patch_size, in_channels=1, hidden_size=args.hidden_size,
                depth=args.depth, num_heads=args.num_heads, mlp_ratio=args.mlp_ratio,
                num_classes=digits.NUM_CLASSES)


def build_model(config: dict, objective: str = "facm"):
    from facm_ext.models import LightningDiT

    model = LightningDiT(**config)
    return facm.TwoTimeModel(model) if objective == "meanflow" else model


# ------------------------------------------------------------------------------------------------ distributed
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend)
    return Dist(rank=torch.distributed.get_rank(), world_size=world, enabled=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device: {name!r} is not a device ({err})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name} requested but CUDA is not available")
        local = int(os.environ.get("LOCAL_RANK", device.index or 0))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device: expected cpu, cuda or auto, got {name!r}")
    return device


def shard_model(model, dist: Dist, device: torch.device):
    """FSDP2: one unit per transformer block, plus the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = model.model.blocks if isinstance(model, facm.TwoTimeModel) else model.blocks
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---------------------------------------------------------------------------------------------------- training
class EMA:
    """Exponential moving average of a model's parameters (works on FSDP2 shards: the EMA tensors have the
    parameters' placement). ``decay_k = min(decay, (1 + k) / (10 + k))`` at the k-th update."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.updates = 0
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.params[name].lerp_(p.detach(), 1 - decay)
        self.updates += 1

    def full_state(self) -> dict:
        """Full (gathered) EMA tensors on the CPU; a collective under FSDP2: every rank calls it."""
        return {n: full_tensor(v).cpu() for n, v in self.params.items()}

    def load_full_state(self, state: dict, updates: int):
        for name, value in self.params.items():
            source = state[name]
            if hasattr(value, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                value.copy_(distribute_tensor(source.to(value.device), value.device_mesh, value.placements))
            else:
                value.copy_(source)
        self.updates = updates

    def module(self, config: dict, objective: str, device, full_state: dict | None = None) -> torch.nn.Module:
        """A plain (unsharded) model holding the EMA weights, for sampling. Without ``full_state`` this gathers
        the shards (a collective under FSDP2)."""
        model = build_model(config, objective).to(device)
        missing, unexpected = model.load_state_dict(full_state or self.full_state(), strict=False)
        parameters = dict(model.named_parameters())
        if unexpected or any(name in parameters for name in missing):
            raise RuntimeError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        return model.eval().requires_grad_(False)


@dataclasses.dataclass
class TrainState:
    step: int
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    teacher: torch.nn.Module | None
    generator: torch.Generator


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    # The reference recipe: AdamW, betas (0.9, 0.999), no weight decay, constant learning rate.
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)


def full_model_state(model, dist: Dist) -> dict:
    if not dist.enabled:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model, state: dict, dist: Dist):
    if not dist.enabled:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model, optimizer, dist: Dist) -> dict:
    if not dist.enabled:
        return copy.deepcopy(optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, optimizer, state: dict, dist: Dist):
    if not dist.enabled:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_training_checkpoint(state: TrainState, args, out: Path, dist: Dist) -> Path | None:
    payload = {
        "format": "facm_ext.train/1",
        "step": state.step,
        "config": {k: v for k, v in vars(args).items()},
        "model": full_model_state(state.model, dist),
        "ema": state.ema.full_state(),
        "ema_updates": state.ema.updates,
        "optimizer": full_optimizer_state(state.model, state.optimizer, dist),
        "teacher": None if state.teacher is None else {k: v.cpu() for k, v in state.teacher.state_dict().items()},
        "rng": {"generator": state.generator.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    path = None
    if dist.main:
        folder = out / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        path = ckpt.save_checkpoint(payload, folder / ckpt.checkpoint_name(state.step))
        ckpt.prune_checkpoints(folder, args.keep_checkpoints)
    dist.barrier()
    return path


def check_resume_config(saved: dict, args, path) -> None:
    current = vars(args)
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current))
             if k not in RESUMABLE_CHANGES and _normalize(saved.get(k)) != _normalize(current.get(k))]
    if diffs:
        raise ValueError(f"--resume {path}: the run's configuration differs from the checkpoint's:\n  "
                         + "\n  ".join(diffs))


def _normalize(value):
    return list(value) if isinstance(value, tuple) else value


def load_teacher(path: str, config: dict, device, trust_pickle: bool) -> torch.nn.Module:
    teacher = build_model(config)
    with open(path, "rb") as f:
        is_ours = f.read(len(ckpt.MAGIC)) == ckpt.MAGIC
    if is_ours:
        saved = ckpt.load_checkpoint(path)
        if saved.get("format") != "facm_ext.teacher/1":
            raise ValueError(f"--teacher-from: {path} is a facm_ext file but not a teacher.pt "
                             f"(format {saved.get('format')!r})")
        if saved["model_config"] != config:
            raise ValueError(f"--teacher-from: {path} was trained with model {saved['model_config']}, "
                             f"this run builds {config}")
        return teacher_from_ema(saved["ema"], config, "facm", device)
    ckpt.load_official_weights(path, teacher, trust_pickle=trust_pickle)
    return teacher.to(device).eval().requires_grad_(False)


def teacher_from_ema(ema_state: dict, config: dict, objective: str, device) -> torch.nn.Module:
    """The frozen stage-1 teacher: a plain model with the EMA weights (for MeanFlow, those of the wrapped model;
    stage 1 trains only the wrapped model)."""
    if objective == "meanflow":
        ema_state = {k[len("model."):]: v for k, v in ema_state.items() if k.startswith("model.")}
    teacher = build_model(config).to(device)
    missing, unexpected = teacher.load_state_dict(ema_state, strict=False)
    parameters = dict(teacher.named_parameters())
    if unexpected or any(name in parameters for name in missing):
        raise RuntimeError(f"EMA state does not match the teacher: missing {missing}, unexpected {unexpected}")
    return teacher.eval().requires_grad_(False)


def start_stage2(state: TrainState, args, config: dict, device, dist: Dist) -> None:
    """Freeze the teacher (stage-1 EMA weights), start the student from them, fresh optimizer and EMA."""
    if state.teacher is None:
        state.teacher = teacher_from_ema(state.ema.full_state(), config, args.objective, device)
    teacher_state = state.teacher.state_dict()
    student_state = full_model_state(state.model, dist)
    if args.objective == "meanflow":
        student_state.update({f"model.{k}": v for k, v in teacher_state.items()})
    else:
        student_state.update(teacher_state)
    load_full_model_state(state.model, student_state, dist)
    state.optimizer = make_optimizer(state.model, args.facm_lr)
    state.ema = EMA(state.model, args.ema_decay)


class Progress:
    """One stderr line per ``every`` steps: stage, step, losses, throughput."""

    def __init__(self, every: int, enabled: bool):
        self.every, self.enabled = every, enabled
        self.t0, self.count, self.sums = time.perf_counter(), 0, {}
        self.stage, self.last = None, (0, 0, 0)

    def begin(self, stage: str):
        """Call before each step: a window never mixes two stages (nor their times)."""
        if stage != self.stage and self.count:
            self.flush()
        if stage != self.stage:
            self.t0 = time.perf_counter()
        self.stage = stage

    def update(self, step: int, total: int, losses: dict, images: int):
        self.last = (step, total, images)
        self.count += 1
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        if self.count >= self.every or step + 1 >= total:
            self.flush()

    def flush(self):
        step, total, images = self.last
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        if self.enabled and self.count:
            text = " ".join(f"{k} {v / self.count:.4f}" for k, v in self.sums.items())
            print(f"[{self.stage}] step {step + 1}/{total} {text} | {self.count / elapsed:.2f} it/s "
                  f"{self.count * images / elapsed:.0f} img/s", file=sys.stderr, flush=True)
        self.t0, self.count, self.sums = time.perf_counter(), 0, {}


def train(args, out: Path, device, dist: Dist) -> TrainState:
    config = model_config(args)
    data = digits.load_digits_data(args.image_size)
    train_x, train_y = data.train_x, data.train_y
    null_class = digits.NUM_CLASSES
    stage1_steps = 0 if args.teacher_from else args.stage1_steps
    total = stage1_steps + args.facm_steps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(config, args.objective)
    model = model.to(device)
    if dist.enabled:
        model = shard_model(model, dist, device)
    generator = torch.Generator().manual_seed(args.seed)
    teacher = load_teacher(args.teacher_from, config, device, args.trust_pickle) if args.teacher_from else None
    state = TrainState(0, model, EMA(model, args.ema_decay), make_optimizer(model, args.lr), teacher, generator)
    if teacher is not None:
        start_stage2(state, args, config, device, dist)

    resume = args.resume
    if resume == "auto":
        found = ckpt.list_checkpoints(out / "checkpoints")
        resume = str(found[-1]) if found else None
        if resume is None and dist.main:
            print(f"--resume auto: no checkpoint in {out / 'checkpoints'}, starting from step 0", file=sys.stderr)
    if resume is not None:
        saved = ckpt.load_checkpoint(resume)
        if saved.get("format") != "facm_ext.train/1":
            raise ckpt.CheckpointError(f"checkpoint {resume}: format {saved.get('format')!r} is not a "
                                       f"facm_ext.train checkpoint")
        check_resume_config(saved["config"], args, resume)
        state.step = saved["step"]
        if saved["teacher"] is not None:
            state.teacher = build_model(config).to(device)
            state.teacher.load_state_dict(saved["teacher"])
            state.teacher.eval().requires_grad_(False)
            state.optimizer = make_optimizer(state.model, args.facm_lr)
        load_full_model_state(state.model, saved["model"], dist)
        load_full_optimizer_state(state.model, state.optimizer, saved["optimizer"], dist)
        state.ema.load_full_state(saved["ema"], saved["ema_updates"])
        state.generator.set_state(saved["rng"]["generator"])
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        if dist.main:
            print(f"resumed from {resume} at step {state.step}", file=sys.stderr)

    # --jvp graph: one process replays the student's whole JVP (GraphedStudentJVP); under FSDP2 facm_ext.jvp runs
    # and the chain replays each block (run() turns block graphs on).
    whole_model_graph = args.jvp == "graph" and not dist.enabled
    if whole_model_graph:
        jvp_fn = None  # a GraphedStudentJVP of the student, made at the first FACM step (stage 2 sets the student)
    elif args.jvp == "torch":
        jvp_fn = facm.torch_func_jvp
    else:
        import facm_ext.jvp as fused

        jvp_fn = fused.jvp
    # Under FSDP2 the primal's gradient needs the chain runtime's handler; without it, take the gradient from a
    # plain forward after a no-grad JVP (correct, one more forward).
    recompute_primal = dist.enabled and not _chain_handler_available()
    # CUDA graphs (--jvp graph) need autocast's weight-cast cache off.
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=args.jvp != "graph")
                if args.precision == "bf16" and device.type == "cuda" else _NullContext())

    progress = Progress(args.log_every, dist.main)
    local = slice(dist.rank * (args.batch // dist.world_size), (dist.rank + 1) * (args.batch // dist.world_size))
    state.model.train()
    while state.step < total:
        in_stage1 = state.step < stage1_steps
        progress.begin("stage1" if in_stage1 else args.objective)
        if not in_stage1 and state.teacher is None:
            start_stage2(state, args, config, device, dist)
            if dist.main:
                teacher_payload = {"format": "facm_ext.teacher/1", "model_config": config,
                                   "ema": {k: v.cpu() for k, v in state.teacher.state_dict().items()}}
                ckpt.save_checkpoint(teacher_payload, out / TEACHER_FILE)
        gen = state.generator
        index = torch.randint(0, train_x.shape[0], (args.batch,), generator=gen)
        x, y = train_x[index], train_y[index]
        if in_stage1:
            y = facm.drop_labels(y, prob=args.label_dropout, null_class=null_class, generator=gen)
            t = torch.rand(args.batch, generator=gen)
            expanded = torch.arange(args.batch) >= args.batch - args.batch // 2  # of the global batch
        elif args.objective == "meanflow":
            t_a = facm.sample_t(args.batch, generator=gen, mean=args.time_mean, std=args.time_std)
            t_b = facm.sample_t(args.batch, generator=gen, mean=args.time_mean, std=args.time_std)
            t, r = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
        else:
            t = facm.sample_t(args.batch, generator=gen, mean=args.time_mean, std=args.time_std)
        noise = torch.randn(x.shape, generator=gen)
        x, y, t, noise = (v[local].to(device) for v in (x, y, t, noise))
        with autocast:
            if in_stage1:
                # MeanFlow: stage 1 trains the wrapped one-time model, which becomes the teacher.
                net = state.model.model if isinstance(state.model, facm.TwoTimeModel) else state.model
                losses = facm.stage1_loss(net, x, y, t=t, noise=noise, expanded=expanded[local])
            elif args.objective == "meanflow":
                losses = facm.meanflow_loss(state.model, x, y, t=t, r=r[local].to(device), noise=noise,
                                            teacher=state.teacher, cfg_scale=args.cfg_scale,
                                            guidance_interval=tuple(args.guidance_interval), null_class=null_class,
                                            jvp_fn=jvp_fn)
            else:
                if whole_model_graph and (jvp_fn is None or jvp_fn.model is not state.model):
                    jvp_fn = facm.GraphedStudentJVP(state.model)
                losses = facm.facm_loss(state.model, x, y, t=t, noise=noise, teacher=state.teacher,
                                        cfg_scale=args.cfg_scale, guidance_interval=tuple(args.guidance_interval),
                                        null_class=null_class, p=args.p, fm_weight=args.fm_weight, jvp_fn=jvp_fn,
                                        recompute_primal=recompute_primal, backward=args.split_backward)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {state.step}: loss is {loss.item()} "
                                     f"({ {k: float(v) for k, v in losses.items()} })")
        if in_stage1 or args.objective != "facm" or not args.split_backward:
            loss.backward()  # with --split-backward, facm_loss ran the backward of each part itself
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), args.max_grad_norm)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.ema.update(state.model)
        state.step += 1
        progress.update(state.step - 1, total, {k: v.detach() for k, v in losses.items()}, args.batch)
        # Drop this step's autograd graph before the next step: its AccumulateGrad nodes were made on the default
        # stream, and a live one turns the next capture of the student's backward (--jvp graph) into a wait on
        # that stream, which CUDA refuses during capture.
        del loss, losses
        if state.step % args.ckpt_every == 0 or state.step == total or state.step == stage1_steps:
            save_training_checkpoint(state, args, out, dist)
    if state.teacher is None and args.facm_steps == 0 and stage1_steps > 0:
        state.teacher = teacher_from_ema(state.ema.full_state(), config, args.objective, device)
        if dist.main:
            ckpt.save_checkpoint({"format": "facm_ext.teacher/1", "model_config": config,
                                  "ema": {k: v.cpu() for k, v in state.teacher.state_dict().items()}},
                                 out / TEACHER_FILE)
    return state


def _chain_handler_available() -> bool:
    try:
        import facm_ext.chain  # noqa: F401  (importing it registers the FSDP2 module-call handler)
    except ImportError:
        return False
    return True


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(state: TrainState, args, out: Path, device, ema_state: dict) -> dict:
    """Sample quality of the multi-step teacher and the FACM student (EMA weights ``ema_state``, gathered) at
    NFE 1 and 2; writes PNG grids, results.json and returns the results."""
    config = model_config(args)
    data = digits.load_digits_data(args.image_size)
    classifier = digits.train_feature_classifier(data, seed=args.seed)
    n = args.eval_samples
    labels = torch.arange(digits.NUM_CLASSES).repeat((n + digits.NUM_CLASSES - 1) // digits.NUM_CLASSES)[:n]
    null_class = digits.NUM_CLASSES
    rows = []

    def measure(name, fn, nfe):
        """fn(noise, labels, generator) -> samples; FD and accuracy averaged over --eval-seeds noise draws."""
        fds, accuracies = [], []
        for k in range(args.eval_seeds):
            noise = torch.randn(n, 1, args.image_size, args.image_size,
                                generator=torch.Generator().manual_seed(args.seed + 12345 + k))
            sample_gen = torch.Generator().manual_seed(args.seed + 777 + k)  # the samplers' fresh noise
            chunks = []
            for start in range(0, n, args.eval_batch):
                sl = slice(start, start + args.eval_batch)
                chunks.append(fn(noise[sl].to(device), labels[sl].to(device), sample_gen).float().cpu())
            samples = torch.cat(chunks)
            quality = digits.sample_quality(classifier, samples, labels, data.test_x)
            fds.append(quality["fd"])
            accuracies.append(quality["accuracy"])
            if k == 0:
                file = "".join(c if c.isalnum() or c in "-_" else "_" for c in name.replace(", ", "_"))
                file = "_".join(part for part in file.split("_") if part) + ".png"
                write_png(out / file, image_grid(samples[:100], nrow=10))
        fd = torch.tensor(fds, dtype=torch.float64)
        rows.append({"model": name.split(",")[0], "sampler": name, "nfe": nfe, "fd": fd.mean().item(),
                     "fd_std": fd.std().item() if len(fds) > 1 else 0.0,
                     "accuracy": sum(accuracies) / len(accuracies), "seeds": len(fds)})

    real = data.train_x[:n]
    rows.append({"model": "real data", "sampler": f"{real.shape[0]} training images vs held-out", "nfe": 0,
                 **digits.sample_quality(classifier, real, data.train_y[:n], data.test_x), "fd_std": 0.0,
                 "seeds": 1})
    write_png(out / "real.png", image_grid(real[:100], nrow=10))
    low, high = args.guidance_interval
    teacher = state.teacher
    if teacher is not None and args.objective == "facm":
        guided_nfe = sum(2 if low <= i / args.teacher_steps <= high and args.cfg_scale != 1 else 1
                         for i in range(args.teacher_steps))
        measure(f"teacher, Euler {args.teacher_steps} steps",
            lambda z, yy, _: facm.sample_flow(teacher, z, yy, args.teacher_steps, cfg_scale=args.cfg_scale,
                                           guidance_interval=(low, high), null_class=null_class), guided_nfe)
        if args.teacher_steps != 2:
            measure("teacher, Euler 2 steps",
                    lambda z, yy, _: facm.sample_flow(teacher, z, yy, 2, cfg_scale=args.cfg_scale,
                                                     guidance_interval=(low, high), null_class=null_class),
                    sum(2 if low <= i / 2 <= high and args.cfg_scale != 1 else 1 for i in range(2)))
    if args.facm_steps > 0:
        student = state.ema.module(config, args.objective, device, ema_state)
        name = "FACM" if args.objective == "facm" else "MeanFlow"
        if args.objective == "facm" and args.fm_weight == 0:
            name += " (fm_weight=0)"
        for steps in (1, 2):
            measure(f"{name}, {steps}-step",
                    lambda z, yy, gen: facm.sample(student, z, yy, steps, generator=gen), steps)
    results = {"rows": rows, "config": {k: v for k, v in vars(args).items()}, "step": state.step}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def format_results(results: dict) -> str:
    lines = ["| model / sampler | NFE | FD to held-out digits (mean +- std over seeds) | class accuracy |",
             "|---|---|---|---|"]
    for r in results["rows"]:
        spread = f" +- {r['fd_std']:.2f}" if r.get("seeds", 1) > 1 else ""
        lines.append(f"| {r['sampler']} | {r['nfe']} | {r['fd']:.2f}{spread} | {100 * r['accuracy']:.1f}% |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main
def run(argv=None) -> dict | None:
    """Train and evaluate as the CLI does; returns the results (rank 0; None elsewhere or with --no-eval).
    Bad configurations raise ValueError naming the flag; unusable checkpoints raise CheckpointError."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    dist = init_distributed(device)
    try:
        validate(args, dist.world_size, device)
        if args.threads:
            torch.set_num_threads(args.threads)
        out = Path(args.output_dir)
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        start = time.perf_counter()
        with _block_graphs(args.jvp == "graph" and dist.enabled) as block_graphs:
            state = train(args, out, device, dist)
        if dist.main:
            print(f"training: {time.perf_counter() - start:.0f} s, {state.step} steps", file=sys.stderr)
            if block_graphs:
                print(f"--jvp graph: FSDP2 blocks replayed from CUDA graphs {block_graphs['captured']}, "
                      f"turned down (ran eagerly) {block_graphs['eager']}", file=sys.stderr)
        results = None
        if not args.no_eval:
            ema_state = state.ema.full_state()  # every rank takes part in the gather
            results = evaluate(state, args, out, device, ema_state) if dist.main else None
            if dist.main:
                print(format_results(results))
                print(f"sample grids and results.json in {out}", file=sys.stderr)
        dist.barrier()
        return results
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _block_graphs(enabled: bool):
    """--jvp graph under FSDP2: facm_ext.chain replays each block's JVP (and its backward) from CUDA graphs while
    training; yields a dict filled on exit: ``captured`` (facm_ext.chain.captured_block_graphs()) and ``eager``
    (the blocks turned down, facm_ext.chain.block_graph_failures()). The graphs' memory pools hold every block's
    saved activations, so they are released afterwards."""
    summary = {}
    if not enabled:
        yield summary
        return
    import facm_ext.chain

    facm_ext.chain.set_block_graphs(True)
    try:
        yield summary
        summary.update(captured=facm_ext.chain.captured_block_graphs(),
                       eager=facm_ext.chain.block_graph_failures())
    finally:
        facm_ext.chain.set_block_graphs(False)
        facm_ext.chain.reset_block_graphs()


def main(argv=None) -> None:
    """Console entry point: like :func:`run`, with configuration and checkpoint errors reported as one line
    (exit status 2) instead of a traceback."""
    try:
        run(argv)
    except (ValueError, ckpt.CheckpointError) as err:
        print(f"facm-train: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
    # `python -m facm_ext.train` / `torchrun -m facm_ext.train`; the `facm-train` console script keeps the normal exit.
    exit_without_teardown(0)
