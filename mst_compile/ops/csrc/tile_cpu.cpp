// Blocked CPU kernels for tile-structured sparse weights (fp32): one BLAS call per active tile, reading the
// tile where it lies in the dense weight (no gather, no copy of the activations).
//
//   mm(x, w, ptr, idx, b)        y (N, O) = x (N, K) · wᵀ over the active tiles of w (O, K): row r of the tile
//                                grid holds the tiles of columns idx[ptr[r] : ptr[r+1]]. w may be a transposed
//                                view (either stride 1), so the same op gives dx = dy · W with wᵀ and the
//                                column order of the tiles.
//   sddmm(gy, x, rows, cols, b)  g (O, K) = gyᵀ (O, N) · x (N, K) on the listed tiles, zero elsewhere (the
//                                weight gradient sampled on the active tiles).
//
// Edge tiles (a dimension that b does not divide) are clipped. mm is parallel over rows of tiles (each thread
// owns whole output columns, so no two threads write the same element) and walks the tokens in blocks of TB
// rows so a block of y stays in cache while every tile of its row adds to it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cstdint>

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr int64_t TB = 256;  // tokens per block of mm (measured: 256 beat 64 and 1024 at b = 16 and 32)

// Row-major C[M,N] = op(A)[M,K] · op(B)[K,N] + beta · C through column-major BLAS (Cᵀ = Bᵀ Aᵀ).
// ta: A is stored (K, M) row-major; tb: B is stored (N, K) row-major.
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
        float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const int m = (int)N, n = (int)M, k = (int)K, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
  const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  const float alpha = 1.f;
  sgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

void check(const at::Tensor& t, const char* what, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim, "mst_tile: ", what,
              " must be a ", dim, "-D float32 CPU tensor");
}

at::Tensor tile_mm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& ptr_in, const at::Tensor& idx_in,
                   int64_t b) {
  check(x_in, "x", 2);
  check(w, "w", 2);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ptr = ptr_in.to(at::kInt).contiguous(), idx = idx_in.to(at::kInt).contiguous();
  const int64_t N = x.size(0), K = x.size(1), O = w.size(0);
  TORCH_CHECK(w.size(1) == K, "mst_tile.mm: x has ", K, " features, w expects ", w.size(1));
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  const bool row_major = s1 == 1 || w.size(1) == 1;  // else column-major (s0 == 1): a transposed view
  TORCH_CHECK(row_major || s0 == 1 || w.size(0) == 1, "mst_tile.mm: w needs a unit stride");
  const int64_t n_rows = (O + b - 1) / b;
  TORCH_CHECK(ptr.numel() == n_rows + 1, "mst_tile.mm: ptr has ", ptr.numel(), " entries, expected ", n_rows + 1);
  at::Tensor y = at::empty({N, O}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int32_t *P = ptr.data_ptr<int32_t>(), *I = idx.data_ptr<int32_t>();
  at::parallel_for(0, n_rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = std::min(b, O - r * b);
      float* yr = yp + r * b;
      if (P[r] == P[r + 1]) {  // an empty row of tiles: its outputs are zero
        for (int64_t t = 0; t < N; ++t) std::fill(yr + t * O, yr + t * O + n, 0.f);
        continue;
      }
      for (int64_t t0 = 0; t0 < N; t0 += TB) {
        const int64_t m = std::min(TB, N - t0);
        for (int32_t p = P[r]; p < P[r + 1]; ++p) {
          const int64_t c = I[p], k = std::min(b, K - c * b);
          const float* wt = wp + r * b * s0 + c * b * s1;  // tile (r, c) of w: n x k
          // y[t0.., r-tile] (+)= x[t0.., c-tile] · tileᵀ; tileᵀ is (k, n): stored transposed when w is row-major
          mm(false, row_major, m, n, k, xp + t0 * K + c * b, K, wt, row_major ? s0 : s1, p == P[r] ? 0.f : 1.f,
             yr + t0 * O, O);
        }
      }
    }
  });
  return y;
}

at::Tensor tile_sddmm(const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& rows_in,
                      const at::Tensor& cols_in, int64_t b) {
  check(gy_in, "gy", 2);
  check(x_in, "x", 2);
  const at::Tensor gy = gy_in.contiguous(), x = x_in.contiguous();
  const at::Tensor rows = rows_in.to(at::kInt).contiguous(), cols = cols_in.to(at::kInt).contiguous();
  const int64_t N = gy.size(0), O = gy.size(1), K = x.size(1);
  TORCH_CHECK(x.size(0) == N, "mst_tile.sddmm: gy has ", N, " rows, x has ", x.size(0));
  at::Tensor g = at::zeros({O, K}, gy.options());
  const float *gp = gy.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* out = g.data_ptr<float>();
  const int32_t *R = rows.data_ptr<int32_t>(), *C = cols.data_ptr<int32_t>();
  at::parallel_for(0, rows.numel(), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r = R[p], c = C[p], n = std::min(b, O - r * b), k = std::min(b, K - c * b);
      // g[r-tile, c-tile] = gy[:, r-tile]ᵀ · x[:, c-tile]
      mm(true, false, n, k, N, gp + r * b, O, xp + c * b, K, 0.f, out + r * b * K + c * b, K);
    }
  });
  return g;
}

}  // namespace

TORCH_LIBRARY(mst_tile, m) {
  m.def("mm(Tensor x, Tensor w, Tensor ptr, Tensor idx, int tile) -> Tensor");
  m.def("sddmm(Tensor gy, Tensor x, Tensor rows, Tensor cols, int tile) -> Tensor");
}

TORCH_LIBRARY_IMPL(mst_tile, CPU, m) {
  m.impl("mm", &tile_mm);
  m.impl("sddmm", &tile_sddmm);
}
