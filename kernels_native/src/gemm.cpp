#include "gemm.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#ifdef MFB_HAVE_CBLAS
#include <cblas.h>
// OpenBLAS-specific; weak so that other BLAS libraries still link.
extern "C" void openblas_set_num_threads(int) __attribute__((weak));
#endif

namespace mfb {

static int g_threads = 1;

const char* gemm_backend() { return MFB_GEMM_BACKEND; }

// BLAS itself always runs single-threaded: sgemm() below splits large products over the
// OpenMP team instead, so only one thread pool ever exists (two pools that spin-wait for
// work starve each other on a small core count).
void set_threads(int n) {
    g_threads = std::max(1, n);
    omp_set_num_threads(g_threads);
#ifdef MFB_HAVE_CBLAS
    if (openblas_set_num_threads) openblas_set_num_threads(1);
#endif
}

#ifndef MFB_HAVE_CBLAS
// Portable fallback: pack a K x N panel of op(B), then a cache-blocked loop that the compiler
// vectorises over N. Serial: sgemm() below spreads it over threads like the BLAS path.
static void sgemm_portable(bool tA, bool tB, int M, int N, int K, float alpha, const float* A,
                           int lda, const float* B, int ldb, float beta, float* C, int ldc) {
    const int KB = 256, NB = 512;
    auto a_at = [&](int i, int k) { return tA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k]; };
    for (int i = 0; i < M; i++) {
        float* c = C + (size_t)i * ldc;
        if (beta == 0.f) std::fill(c, c + N, 0.f);
        else if (beta != 1.f) for (int j = 0; j < N; j++) c[j] *= beta;
    }
    std::vector<float> Bp((size_t)KB * NB);
    for (int n0 = 0; n0 < N; n0 += NB) {
        int nb = std::min(NB, N - n0);
        for (int k0 = 0; k0 < K; k0 += KB) {
            int kb = std::min(KB, K - k0);
            for (int k = 0; k < kb; k++)
                for (int j = 0; j < nb; j++)
                    Bp[(size_t)k * nb + j] = tB ? B[(size_t)(n0 + j) * ldb + k0 + k]
                                                : B[(size_t)(k0 + k) * ldb + n0 + j];
            for (int i = 0; i < M; i++) {
                float* c = C + (size_t)i * ldc + n0;
                for (int k = 0; k < kb; k++) {
                    float a = alpha * a_at(i, k0 + k);
                    const float* b = &Bp[(size_t)k * nb];
                    for (int j = 0; j < nb; j++) c[j] += a * b[j];
                }
            }
        }
    }
}
#endif

static void sgemm_serial(bool transA, bool transB, int M, int N, int K, float alpha, const float* A, int lda,
                         const float* B, int ldb, float beta, float* C, int ldc) {
    if (K <= 0) {
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(size_t)i * ldc + j] *= beta;
        return;
    }
#ifdef MFB_HAVE_CBLAS
    cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
    sgemm_portable(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

void sgemm(bool transA, bool transB, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc) {
    if (M <= 0 || N <= 0) return;
    const int nt = g_threads;
    if (nt == 1 || omp_in_parallel() || (double)M * N * std::max(K, 1) < 2e6) {
        sgemm_serial(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    // split C into nt blocks of rows (or of columns when it is wider than tall), 16-aligned
    const bool by_rows = M >= N;
    const int extent = by_rows ? M : N;
    const int per = ((extent + nt - 1) / nt + 15) / 16 * 16;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; t++) {
        int s0 = t * per, s1 = std::min(extent, s0 + per);
        if (s0 >= s1) continue;
        if (by_rows)
            sgemm_serial(transA, transB, s1 - s0, N, K, alpha, transA ? A + s0 : A + (size_t)s0 * lda, lda, B, ldb,
                         beta, C + (size_t)s0 * ldc, ldc);
        else
            sgemm_serial(transA, transB, M, s1 - s0, K, alpha, A, lda, transB ? B + (size_t)s0 * ldb : B + s0, ldb,
                         beta, C + s0, ldc);
    }
}

}  // namespace mfb
