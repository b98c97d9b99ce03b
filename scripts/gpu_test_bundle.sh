#!/usr/bin/env bash
# Packs the gpu twin tests into one folder that runs on a GPU machine without our build
# dependencies: build/tests/moetrain_gpu_tests, every shared library ldd lists outside glibc
# and CUDA (OpenBLAS, Open MPI, HDF5, toml++ and their own dependencies), and run.sh. Libraries
# over 16 MiB travel xz-compressed (OpenBLAS: 36 MB -> 4 MB) and run.sh unpacks them.
#   bash scripts/gpu_test_bundle.sh [build dir] [bundle dir]    (defaults: build, gpu_bundle)
# then on the GPU machine: bash <bundle dir>/run.sh [gtest flags]
set -euo pipefail
BUILD=${1:-build}
OUT=${2:-gpu_bundle}
BIN=$BUILD/tests/moetrain_gpu_tests
[ -x "$BIN" ] || { echo "gpu_test_bundle: $BIN not built (needs the CUDA toolkit)" >&2; exit 1; }
rm -rf "$OUT"
mkdir -p "$OUT/lib"
cp "$BIN" "$OUT/"
ldd "$BIN" | awk '/=> \// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;
    libcuda.so*|libcudart.so*|libcublas*|libnccl*|libcudnn*) ;;
    *) cp -L "$lib" "$OUT/lib/" ;;
  esac
done
for f in "$OUT"/lib/*; do
  if [ "$(stat -c %s "$f")" -gt $((16 << 20)) ]; then xz -9 -T0 "$f"; fi
done
cat > "$OUT/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled gpu tests; extra arguments go to GoogleTest (e.g. --gtest_filter=CudaGemm*).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
for z in "$HERE"/lib/*.xz; do [ -e "$z" ] && [ ! -e "${z%.xz}" ] && xz -dk "$z"; done
export LD_LIBRARY_PATH=$HERE/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
exec "$HERE/moetrain_gpu_tests" --gtest_color=no "$@"
RUN
chmod +x "$OUT/run.sh"
du -sh "$OUT"
