#!/usr/bin/env bash
# Build the native runner: ONNX Runtime's C API headers fetched (download only, see fetch_onnxruntime_headers.sh),
# then CMake against the llama.cpp and ONNX Runtime that the Python environment's llama-cpp-python and onnxruntime
# wheels installed. Usage: native/build.sh [BUILD_DIR [CMAKE_ARGS...]]   (default build/native; idempotent)
#   PYTHON=path/to/python  the environment to take the libraries from (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/native}
shift || true
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
native/fetch_onnxruntime_headers.sh build/onnxruntime-headers
cmake -S . -B "$build" -DFACELLAVA_SITE_PACKAGES="$site" \
    -DONNXRUNTIME_INCLUDE_DIR="$PWD/build/onnxruntime-headers/usr/include/onnxruntime" "$@" >/dev/null
cmake --build "$build" -j"$(nproc)" >/dev/null
