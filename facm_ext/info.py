"""``python -m facm_ext.info``: versions, how the extension was built, and which backend each op can use."""

from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    from facm_ext import __version__, _extension
    from facm_ext.ops import _common
    import facm_ext.ops

    facm_ext.ops.load_all()

    build = _extension.build_info()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not importable ({exc})"
    cuda_devices = []
    if torch.cuda.is_available():
        cuda_devices = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                        for i in range(torch.cuda.device_count())]
    ops = {}
    for name, info in sorted(_common.OP_REGISTRY.items()):
        available = {}
        for backend, when in info.backends.items():
            if backend == "cuda":
                ok = info.kernel is not None and _extension.has_kernel(info.kernel)
                why = "built" if ok else ("extension not loaded" if not build["extension"] else
                                          "extension built without CUDA kernels")
            elif backend == "triton":
                ok = _common.triton_available()
                why = "triton importable" if ok else "triton not importable"
            else:
                ok, why = True, "always"
            available[backend] = {"available": ok, "why": why, "when": when}
        ops[name] = {"backends": available, "notes": info.notes}
    from facm_ext.jvp import _blocks

    native_block = _extension.has_kernel(_blocks._NATIVE_BLOCK_KERNEL)
    mode = _blocks.native_block_mode()
    transform = {
        "adaLN blocks (DiT, LightningDiT)": {
            "available": native_block and mode != "0",
            "why": ("built" if native_block else "no CUDA kernels in this build") + (
                "; FACM_EXT_NATIVE_BLOCKS=0" if mode == "0" else ""),
            "when": "one C++ op per block (adaln_block_jvp_cuda; with grad, the primal from the block's own forward), "
                    "on CUDA under fp16/bf16 autocast, "
                    "head_dim 72 (the CUDA attention kernel's default), "
                    + (f"up to {_blocks.NATIVE_BLOCK_MAX_ROWS} rows B x L (FACM_EXT_NATIVE_BLOCKS=auto)"
                       if mode == "auto" else "any number of rows (FACM_EXT_NATIVE_BLOCKS=1)")
                    + "; else the per-op path",
        },
    }
    return {
        "facm_ext": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_devices": cuda_devices,
        "extension": build,
        "ops": ops,
        "transform": transform,
    }


def format_report(report: dict) -> str:
    ext = report["extension"]
    lines = [
        f"facm_ext {report['facm_ext']}  python {report['python']}  torch {report['torch']} "
        f"(CUDA {report['torch_cuda']})  triton {report['triton']}",
        f"platform: {report['platform']}",
        f"CUDA devices: {', '.join(report['cuda_devices']) or 'none'}",
    ]
    if ext["extension"]:
        kernels = f"CUDA kernels built for {';'.join(ext['archs'])}" if ext["cuda"] else "no CUDA kernels (CPU build)"
        lines.append(f"compiled extension facm_ext._C: loaded, {kernels}")
    else:
        lines.append(f"compiled extension facm_ext._C: NOT loaded ({ext['error']}); ops use Triton or PyTorch paths")
    lines.append("")
    width = max([len(n) for n in report["ops"]] + [4])
    lines.append(f"{'op':<{width}}  backend     available  used when")
    for name, op in report["ops"].items():
        for i, (backend, b) in enumerate(op["backends"].items()):
            mark = "yes" if b["available"] else f"no: {b['why']}"
            lines.append(f"{name if i == 0 else '':<{width}}  {backend:<10}  {mark:<9}  {b['when']}")
        if op["notes"]:
            lines.append(f"{'':<{width}}  note: {op['notes']}")
    lines.append("")
    lines.append("facm_ext.jvp paths")
    for name, path in report.get("transform", {}).items():
        mark = "yes" if path["available"] else f"no: {path['why']}"
        lines.append(f"  {name}: native {mark}; {path['when']}")
    return "\n".join(lines)


def main() -> None:
    print(format_report(collect()))


if __name__ == "__main__":
    main()
