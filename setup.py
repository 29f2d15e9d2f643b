"""Build facm_ext and its compiled extension facm_ext._C.

Build switches (environment variables):
  FACM_EXT_SKIP_CUDA_BUILD=1  build the CPU-only extension (op schemas, no CUDA kernels)
  TORCH_CUDA_ARCH_LIST        CUDA targets, default "8.0;9.0+PTX" (sm_80, sm_90 and sm_90 PTX)
  MAX_JOBS                    parallel compile jobs (honoured by torch's ninja builder)
  CUDA_HOME                   the CUDA toolkit holding lib64/libcudart.so

The sources come from csrc/sources.txt, the one list that CMakeLists.txt reads too.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def read_sources(section_names):
    """Return the sources of the named sections of csrc/sources.txt, in file order."""
    sections, current = {}, None
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
        elif current is None:
            raise RuntimeError(f"csrc/sources.txt: source {line!r} before any [section]")
        else:
            sections[current].append(line)
    return [src for name in section_names for src in sections.get(name, [])]


def want_cuda_build():
    """(build CUDA kernels?, reason) from the environment and the installed torch."""
    if os.environ.get("FACM_EXT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return False, "FACM_EXT_SKIP_CUDA_BUILD is set"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, toolkit {CUDA_HOME}"


def extension_modules():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda, reason = want_cuda_build()
    print(f"facm_ext: CUDA kernels {'ON' if with_cuda else 'OFF'} ({reason})")
    cxx_flags = ["-O3"]  # torch adds the C++ standard its headers need (C++20 on torch >= 2.13)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        defines = ["-DFACM_EXT_WITH_CUDA", f'-DFACM_EXT_CUDA_ARCHS="{arch_list}"']
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo",
                      "--expt-relaxed-constexpr"] + defines
        return [CUDAExtension(
            "facm_ext._C",
            read_sources(["cpp", "cuda"]),
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
        )]
    return [CppExtension("facm_ext._C", read_sources(["cpp"]), include_dirs=[str(ROOT / "csrc")],
                         extra_compile_args={"cxx": cxx_flags})]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="facm_ext",
    version="0.1.0",
    description="Fused forward-mode JVP kernels and a streamed Chain-JVP runtime for consistency-model training",
    packages=find_packages(include=["facm_ext", "facm_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scikit-learn"]},
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()},
    entry_points={"console_scripts": ["facm-train=facm_ext.train:main", "facm-ext-info=facm_ext.info:main"]},
    zip_safe=False,
)
