#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr int64_t BQ = 32;  // query rows per block

// Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C through column-major BLAS (C^T = B^T A^T).
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
        int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const int m = (int)N, n = (int)M, k = (int)K, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
  const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  sgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

inline void axpy(float w, const float* x, float* y, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) y[d] += w * x[d];
}

// exp(x) for x <= 0 (Cody-Waite reduction + degree-6 polynomial, ~1 ulp), written to vectorize.
#pragma omp declare simd
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

struct Geo {
  int64_t B, H, Hkv, T, D, l, ll, t0, nblk, W;
  bool local, strided;
  float scale;
  Geo(const at::Tensor& q, const at::Tensor& k, int64_t l_, bool local_, bool strided_, double scale_) {
    B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
    l = l_, local = local_, strided = strided_, scale = (float)scale_;
    ll = std::min(l, T), t0 = local ? 1 : 0;
    nblk = (T + BQ - 1) / BQ, W = local ? ll + BQ - 1 : 1;
  }
  // last residue shift of row i (t0 - 1: none)
  int64_t last(int64_t i) const { return strided ? i / l : t0 - 1; }
  // band keys of the block at s with m rows: [j0, j0 + w)
  void window(int64_t s, int64_t m, int64_t& j0, int64_t& w) const {
    j0 = local ? std::max<int64_t>(0, s - ll + 1) : 0;
    w = local ? s + m - j0 : 0;
  }
};

struct View {  // a (B, H, T, D) tensor with a contiguous last dim
  const float* p;
  int64_t sb, sh, st;
  explicit View(const at::Tensor& t) : p(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), st(t.stride(2)) {}
  const float* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// One softmax row over the band columns [lo, hi] of S and the residue scores R[t0..nt]: S and R become
// probabilities (0 outside the band), the return value is the row's log-sum-exp.
float softmax_row(float* S, int64_t w, int64_t lo, int64_t hi, float* R, int64_t t0, int64_t nt) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t c = lo; c <= hi; ++c) mx = std::max(mx, S[c]);
  for (int64_t t = t0; t <= nt; ++t) mx = std::max(mx, R[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = lo; c <= hi; ++c) {
    const float e = exp_neg(S[c] - mx);
    S[c] = e;
    sum += e;
  }
  for (int64_t t = t0; t <= nt; ++t) {
    R[t] = exp_neg(R[t] - mx);
    sum += R[t];
  }
  const float inv = 1.f / sum;
  for (int64_t c = 0; c < lo; ++c) S[c] = 0.f;
#pragma omp simd
  for (int64_t c = lo; c <= hi; ++c) S[c] *= inv;
  for (int64_t c = hi + 1; c < w; ++c) S[c] = 0.f;
  for (int64_t t = t0; t <= nt; ++t) R[t] *= inv;
  return mx + std::log(sum);
}

std::tuple<at::Tensor, at::Tensor> hsa_forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                               int64_t l, bool local, bool strided, double scale) {
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  const Geo g(q, k, l, local, strided, scale);
  auto out = at::empty({g.B, g.H, g.T, g.D}, q.options());
  auto lse = at::empty({g.B, g.H, g.T}, q.options());
  const View Q(q), K(k), V(v);
  float* O0 = out.data_ptr<float>();
  float* L0 = lse.data_ptr<float>();
  const int64_t NR = g.T / g.l + 1, D = g.D, group = g.H / g.Hkv;
  at::parallel_for(0, g.B * g.H * g.nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(BQ * g.W), R(BQ * NR);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / g.nblk, blk = task % g.nblk, b = bh / g.H, h = bh % g.H, hk = h / group;
      const float *q0 = Q.at(b, h), *k0 = K.at(b, hk), *v0 = V.at(b, hk);
      float* O = O0 + bh * g.T * D;
      const int64_t s = blk * BQ, m = std::min(BQ, g.T - s);
      int64_t j0, w;
      g.window(s, m, j0, w);
      mm(false, true, m, w, D, g.scale, q0 + s * Q.st, Q.st, k0 + j0 * K.st, K.st, 0.f, S.data(), g.W);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = s + r, nt = g.last(i);
        float* Rr = R.data() + r * NR;
        for (int64_t t = g.t0; t <= nt; ++t) Rr[t] = g.scale * dot(q0 + i * Q.st, k0 + (i - t * g.l) * K.st, D);
        const int64_t lo = g.local ? std::max<int64_t>(0, i - g.ll + 1) - j0 : 0, hi = g.local ? i - j0 : -1;
        L0[bh * g.T + i] = softmax_row(S.data() + r * g.W, w, lo, hi, Rr, g.t0, nt);
      }
      if (w > 0) {
        mm(false, false, m, D, w, 1.f, S.data(), g.W, v0 + j0 * V.st, V.st, 0.f, O + s * D, D);
      } else {
        std::fill(O + s * D, O + (s + m) * D, 0.f);
      }
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = s + r;
        const float* Rr = R.data() + r * NR;
        for (int64_t t = g.t0; t <= g.last(i); ++t) axpy(Rr[t], v0 + (i - t * g.l) * V.st, O + i * D, D);
      }
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hsa_backward(const at::Tensor& go_, const at::Tensor& q_,
                                                            const at::Tensor& k_, const at::Tensor& v_,
                                                            const at::Tensor& out, const at::Tensor& lse, int64_t l,
                                                            bool local, bool strided, double scale) {
  const at::Tensor go = last_dim_contiguous(go_), q = last_dim_contiguous(q_), k = last_dim_contiguous(k_),
                   v = last_dim_contiguous(v_);
  const Geo g(q, k, l, local, strided, scale);
  auto dq = at::empty({g.B, g.H, g.T, g.D}, q.options());
  auto dk = at::zeros({g.B, g.Hkv, g.T, g.D}, q.options());
  auto dv = at::zeros({g.B, g.Hkv, g.T, g.D}, q.options());
  const View Q(q), K(k), V(v), G(go), O(out);
  const float* L0 = lse.data_ptr<float>();
  float *dQ0 = dq.data_ptr<float>(), *dK0 = dk.data_ptr<float>(), *dV0 = dv.data_ptr<float>();
  const int64_t NR = g.T / g.l + 1, D = g.D, group = g.H / g.Hkv;
  // one task per key/value head: it owns that head's dK/dV rows, so the accumulation needs no atomics
  at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(BQ * g.W), dS(BQ * g.W), R(BQ * NR), dR(BQ * NR);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.Hkv, hk = task % g.Hkv;
      const float *k0 = K.at(b, hk), *v0 = V.at(b, hk);
      float *dK = dK0 + task * g.T * D, *dV = dV0 + task * g.T * D;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const float *q0 = Q.at(b, h), *g0 = G.at(b, h), *o0 = O.at(b, h);
        const float* L = L0 + (b * g.H + h) * g.T;
        float* dQ = dQ0 + (b * g.H + h) * g.T * D;
        for (int64_t blk = 0; blk < g.nblk; ++blk) {
          const int64_t s = blk * BQ, m = std::min(BQ, g.T - s);
          int64_t j0, w;
          g.window(s, m, j0, w);
          mm(false, true, m, w, D, g.scale, q0 + s * Q.st, Q.st, k0 + j0 * K.st, K.st, 0.f, P.data(), g.W);
          mm(false, true, m, w, D, 1.f, g0 + s * G.st, G.st, v0 + j0 * V.st, V.st, 0.f, dS.data(), g.W);
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = s + r, nt = g.last(i);
            const float *qi = q0 + i * Q.st, *gi = g0 + i * G.st;
            const float Li = L[i], delta = dot(gi, o0 + i * O.st, D);
            float *Pr = P.data() + r * g.W, *dSr = dS.data() + r * g.W;
            const int64_t lo = g.local ? std::max<int64_t>(0, i - g.ll + 1) - j0 : 0, hi = g.local ? i - j0 : -1;
            for (int64_t c = 0; c < lo; ++c) Pr[c] = dSr[c] = 0.f;
#pragma omp simd
            for (int64_t c = lo; c <= hi; ++c) {
              const float p = exp_neg(Pr[c] - Li);
              Pr[c] = p;
              dSr[c] = p * (dSr[c] - delta);
            }
            for (int64_t c = hi + 1; c < w; ++c) Pr[c] = dSr[c] = 0.f;
            float *Rr = R.data() + r * NR, *dRr = dR.data() + r * NR;
            for (int64_t t = g.t0; t <= nt; ++t) {
              const int64_t j = i - t * g.l;
              const float p = exp_neg(g.scale * dot(qi, k0 + j * K.st, D) - Li);
              Rr[t] = p;
              dRr[t] = p * (dot(gi, v0 + j * V.st, D) - delta);
            }
          }
          if (w > 0) {
            mm(false, false, m, D, w, g.scale, dS.data(), g.W, k0 + j0 * K.st, K.st, 0.f, dQ + s * D, D);
            mm(true, false, w, D, m, g.scale, dS.data(), g.W, q0 + s * Q.st, Q.st, 1.f, dK + j0 * D, D);
            mm(true, false, w, D, m, 1.f, P.data(), g.W, g0 + s * G.st, G.st, 1.f, dV + j0 * D, D);
          } else {
            std::fill(dQ + s * D, dQ + (s + m) * D, 0.f);
          }
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = s + r;
            const float *Rr = R.data() + r * NR, *dRr = dR.data() + r * NR;
            for (int64_t t = g.t0; t <= g.last(i); ++t) {
              const int64_t j = i - t * g.l;
              axpy(g.scale * dRr[t], k0 + j * K.st, dQ + i * D, D);
              axpy(g.scale * dRr[t], q0 + i * Q.st, dK + j * D, D);
              axpy(Rr[t], g0 + i * G.st, dV + j * D, D);
            }
          }
        }
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(mst_hsa, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, int l, bool local, bool strided, float scale) -> (Tensor, Tensor)");
  m.def("backward(Tensor go, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int l, bool local, bool strided,"
        " float scale)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mst_hsa, CPU, m) {
  m.impl("forward", &hsa_forward);
  m.impl("backward", &hsa_backward);
}
