"""Training checkpoints: written atomically, verified on load.

File layout: ``MAGIC`` (10 bytes) + payload length (8 bytes, little endian) + SHA-256 of the payload (32 bytes) +
payload (``torch.save`` of a dict of tensors and plain containers). A save writes ``<name>.tmp`` in the target's
folder, flushes and fsyncs it, then renames it over the target (``os.replace`` is atomic on POSIX), so a crash
during a save leaves the previous checkpoint untouched. A truncated or corrupted file fails the length or hash
check and raises :class:`CheckpointError` naming the file; it is never half-loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
from pathlib import Path

import torch

MAGIC = b"FACMCKPT1\n"
_HEADER = struct.Struct("<Q32s")
CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, truncated, corrupted, or of another format."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename). Returns the path."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(_HEADER.pack(len(payload), hashlib.sha256(payload).digest()))
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path  # platforms without directory fds: the rename is still atomic
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`; tensors are loaded on the CPU.

    Raises CheckpointError (naming the file and the problem) for a missing, truncated, corrupted or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    data = path.read_bytes()
    head = len(MAGIC) + _HEADER.size
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path}: not a facm_ext training checkpoint or truncated in its header "
                              f"({len(data)} bytes)")
    length, digest = _HEADER.unpack_from(data, len(MAGIC))
    payload = data[head:]
    if len(payload) != length:
        raise CheckpointError(f"checkpoint {path}: truncated or padded: payload has {len(payload)} bytes, the "
                              f"header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: corrupted (SHA-256 of the payload does not match the header)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # the hash matched, so this is a format problem worth reporting with the file name
        raise CheckpointError(f"checkpoint {path}: payload could not be read: {err}") from err


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoints ``ckpt-<step>.pt`` in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of ``folder`` (keep >= 1)."""
    for old in list_checkpoints(folder)[:-max(keep, 1)]:
        old.unlink()


# ------------------------------------------------------------------------------------------ official checkpoints
POSTHOC_EMA_PREFIX = "ema_models.{index}.ema_model."


def load_official_weights(path_or_state, model, *, ema_index: int = 1, trust_pickle: bool = False):
    """Load official LightningDiT or FACM weights (their key names) into a :class:`facm_ext.models.LightningDiT`.

    Accepted layouts: everything :func:`facm_ext.models.checkpoints.load_lightningdit_checkpoint` accepts (bare
    state dict; ``{"ema": ...}`` / ``{"model": ...}``; ``module.`` / ``_orig_mod.`` prefixes), plus FACM training
    checkpoints whose ``"emas"`` entry is the PostHocEMA state (keys ``ema_models.<i>.ema_model.<name>``; FACM
    uses ``ema_index`` 1, sigma_rel 0.2, as its ``utils/extract_ema.py`` does). Loads strictly; mismatches raise
    ValueError listing the keys. Returns ``model``.
    """
    from facm_ext.models.checkpoints import _read, load_lightningdit_checkpoint

    state = _read(path_or_state, trust_pickle)
    emas = state.get("emas") if hasattr(state, "get") else None
    if isinstance(emas, dict) and "ema" not in state:
        prefix = POSTHOC_EMA_PREFIX.format(index=ema_index)
        weights = {k[len(prefix):]: v for k, v in emas.items() if isinstance(k, str) and k.startswith(prefix)}
        if not weights:
            found = sorted({k.split(".ema_model.")[0] for k in emas if isinstance(k, str) and ".ema_model." in k})
            raise ValueError(f"checkpoint: 'emas' has no keys starting with {prefix!r}; EMA models present: "
                             f"{found or 'none'} (choose one with ema_index)")
        state = {"ema": weights}
    return load_lightningdit_checkpoint(state, model)
