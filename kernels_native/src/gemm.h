// Row-major single-precision GEMM: C = alpha * op(A) op(B) + beta * C.
// op(A) is M x K, op(B) is K x N; lda/ldb/ldc are row strides of the stored matrices.
#pragma once

namespace mfb {

void sgemm(bool transA, bool transB, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc);

// Set the OpenMP thread count; BLAS itself stays single-threaded (see sgemm in gemm.cpp).
void set_threads(int n);
const char* gemm_backend();

}  // namespace mfb
