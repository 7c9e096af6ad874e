// One sgemm of a step-program shape (512x768x256, one thread) through the trainer's own
// mfb::sgemm, and which OpenBLAS kernel set was picked: OpenBLAS against the portable GEMM,
// on this host and under qemu-aarch64 (docs/native.md, "Speed of the arm64 build").
//   S=kernels_native/src
//   g++ -O3 -march=native -fopenmp -I$S -DMFB_GEMM_BACKEND='"portable"' benchmarks/sgemm_one_shape.cpp $S/gemm.cpp -lopenblas -o portable
//   g++ -O3 -march=native -fopenmp -I$S -I/usr/include/x86_64-linux-gnu/openblas-pthread -DMFB_HAVE_CBLAS=1 \
//       -DMFB_GEMM_BACKEND='"openblas"' benchmarks/sgemm_one_shape.cpp $S/gemm.cpp -lopenblas -o openblas
//   arm64: aarch64-linux-gnu-g++ -O3 -fopenmp -static ... with -I/usr/include/aarch64-linux-gnu/openblas-pthread
//          and /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.a; run with qemu-aarch64 [-cpu neoverse-n1]
#include <chrono>
#include <cstdio>
#include <vector>

#include "gemm.h"

extern "C" char* openblas_get_corename();  // linked in both: the portable build links OpenBLAS only for this name

int main() {
    const int M = 512, N = 768, K = 256, reps = 3;
    std::vector<float> A(M * K, 0.5f), B(K * N, 0.25f), C(M * N);
    mfb::set_threads(1);
    mfb::sgemm(false, false, M, N, K, 1.f, A.data(), K, B.data(), N, 0.f, C.data(), N);  // warm-up
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; r++) mfb::sgemm(false, false, M, N, K, 1.f, A.data(), K, B.data(), N, 0.f, C.data(), N);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
    std::printf("%s (OpenBLAS core %s) %dx%dx%d: %.4f s, %.2f GFLOP/s\n", mfb::gemm_backend(), openblas_get_corename(),
                M, N, K, s, 2.0 * M * N * K / s / 1e9);
}
