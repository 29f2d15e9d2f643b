"""Loading official checkpoints into the reference models.

The official training scripts save different layouts: a bare state dict, ``{"model": ..., "ema": ..., "opt": ...}``
(DiT / LightningDiT ``train.py``; inference uses ``"ema"``), ``{"state_dict": ...}``, and keys prefixed with
``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``). :func:`load_checkpoint` unwraps all of these and loads
strictly, raising a ``ValueError`` that lists every missing key, unexpected key and shape mismatch.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence

import torch
from torch import nn

# Checked in this order; DiT/LightningDiT inference uses the EMA weights.
DEFAULT_STATE_DICT_KEYS = ("ema", "model", "state_dict", "module", "model_state_dict")
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.")


def _read(path_or_state_dict, trust_pickle: bool) -> Mapping:
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict
    if not isinstance(path_or_state_dict, (str, os.PathLike)):
        raise ValueError(
            "path_or_state_dict: expected a file path or a state dict (Mapping), "
            f"got {type(path_or_state_dict).__name__}"
        )
    path = os.fspath(path_or_state_dict)
    if not os.path.isfile(path):
        raise ValueError(f"path_or_state_dict: no checkpoint file at {path!r}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        # weights_only refuses arbitrary objects (e.g. an argparse.Namespace saved next to the weights).
        raise ValueError(
            f"path_or_state_dict: {path!r} holds objects other than tensors and containers; if you trust the file, "
            f"pass trust_pickle=True (original error: {err})"
        ) from err
    if not isinstance(loaded, Mapping):
        raise ValueError(f"path_or_state_dict: {path!r} holds a {type(loaded).__name__}, expected a dict")
    return loaded


def extract_state_dict(checkpoint: Mapping, keys: Sequence[str] = DEFAULT_STATE_DICT_KEYS) -> dict[str, torch.Tensor]:
    """The model state dict inside an official checkpoint: the first of ``keys`` present whose value is a dict
    (else the checkpoint itself), with ``module.`` / ``_orig_mod.`` / ``model.`` prefixes removed when every
    tensor key carries them."""
    state = checkpoint
    for key in keys:
        candidate = checkpoint.get(key)
        if isinstance(candidate, Mapping):
            state = candidate
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"checkpoint: no tensors found (top-level keys: {sorted(map(str, checkpoint))[:20]}); "
            f"expected a state dict or a dict with one of {list(keys)}"
        )
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                stripped = True
    return tensors


def load_checkpoint(
    path_or_state_dict,
    model: nn.Module,
    *,
    keys: Sequence[str] = DEFAULT_STATE_DICT_KEYS,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load an official checkpoint (file path or already-loaded dict) into ``model`` strictly.

    Raises ValueError naming every missing key, unexpected key and shape mismatch. Tensors are cast to the
    model's dtypes by ``load_state_dict``. Returns ``model``.
    """
    state = extract_state_dict(_read(path_or_state_dict, trust_pickle), keys)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {mismatched}")
        lines.append("  (check the model configuration: use_qknorm, use_rope, learn_sigma, input_size, in_channels)")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return model


def load_lightningdit_checkpoint(path_or_state_dict, model: nn.Module, *, trust_pickle: bool = False) -> nn.Module:
    """Load an official hustvl/LightningDiT checkpoint (e.g. ``lightningdit-xl-imagenet256-800ep.pt``: a dict
    with ``"ema"``/``"model"``, possibly ``module.``-prefixed) into a :class:`~facm_ext.models.LightningDiT`.

    The released XL/1 checkpoint was trained with ``use_qknorm=False`` (its config); build the model to match,
    or the error lists the ``q_norm``/``k_norm`` keys as missing. Returns ``model``.
    """
    return load_checkpoint(path_or_state_dict, model, trust_pickle=trust_pickle)


def load_dit_checkpoint(path_or_state_dict, model: nn.Module, *, trust_pickle: bool = False) -> nn.Module:
    """Load an official facebookresearch/DiT checkpoint (``DiT-XL-2-256x256.pt`` is a bare state dict trained
    with ``learn_sigma=True``; ``train.py`` checkpoints hold ``"model"``/``"ema"``). Returns ``model``."""
    return load_checkpoint(path_or_state_dict, model, trust_pickle=trust_pickle)
