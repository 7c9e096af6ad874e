# Cross-build for static linux-arm64 with Debian's g++-aarch64-linux-gnu (what
# `mfbench.device.native.build("arm64")` runs):
#   cmake -S kernels_native -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=kernels_native/cmake/aarch64-linux-gnu.cmake -DMFB_STATIC=ON
#   qemu-aarch64 build-arm64/mfbench-train --help
# GEMM: Debian's arm64 OpenBLAS, linked statically, when installed through multiarch
# (dpkg --add-architecture arm64 && apt-get update && apt-get install libopenblas-dev:arm64);
# else the portable GEMM, with a warning.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# the cross toolchain's root, then / for Debian's multiarch arm64 packages (/usr/lib/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu /)
set(CMAKE_LIBRARY_PATH /usr/lib/aarch64-linux-gnu/openblas-pthread)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
# header-only dependencies (nlohmann-json) come from the host's /usr/include
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
