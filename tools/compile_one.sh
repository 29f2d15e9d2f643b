#!/usr/bin/env bash
# Syntax/compile check of one extension source on a machine without a GPU, without building the whole extension:
#   bash tools/compile_one.sh csrc/norms/norm_jvp.cu
# .cu files compile for sm_90; .cpp files with the host compiler. Output object goes to /tmp.
set -euo pipefail
src="$1"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
inc=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths('cuda')))" 2>/dev/null)
pyinc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
obj="/tmp/$(basename "$src").o"
case "$src" in
  *.cu) nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -DFACM_EXT_WITH_CUDA \
          -gencode=arch=compute_90,code=sm_90 -Xptxas -v $inc -I"$pyinc" -Icsrc -c "$src" -o "$obj" ;;
  *.cpp) g++ -std=c++20 -O2 -fPIC -D_GLIBCXX_USE_CXX11_ABI=1 -DFACM_EXT_WITH_CUDA $inc -I"$pyinc" -I"$CUDA_HOME/include" \
           -Icsrc -c "$src" -o "$obj" ;;
  *) echo "unknown source type: $src" >&2; exit 2 ;;
esac
echo "compiled $src -> $obj"
