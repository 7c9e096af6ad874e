# Cross-build for static linux-arm64 with Debian's g++-aarch64-linux-gnu:
#   cmake -S kernels_native -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=kernels_native/cmake/aarch64-linux-gnu.cmake \
#         -DMFB_STATIC=ON -DMFB_BLAS=OFF
#   qemu-aarch64 build-arm64/mfbench-train --help
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
# header-only dependencies (nlohmann-json) come from the host's /usr/include
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
