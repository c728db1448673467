// Attention over packed variable-length sequences (no padding): out = softmax(scale Q K^T) V per
// sequence and head, for a batch whose tokens are stored back to back (cu_seqlens marks the starts).
//
// Why: a padded batch of 32 SST-2 sentences is half padding (its longest sentence sets the width),
// and padded attention costs the square of the width: 70% of the attention's work went to pad
// positions that a mask then threw away. With the batch's real tokens packed into one (tokens, features)
// matrix every linear runs on real tokens only, and this kernel does each sequence's attention at its
// own length. Numerics: fp32 throughout, one pass per query row (scores, max, exp, sum, then P V);
// the torch oracle (stackcomp.kernels.attention.varlen_attention_reference, scaled_dot_product_attention
// per sequence) agrees to float rounding. exp is a degree-6 polynomial within about 1 ulp (ffn_exp).
//
// Layout: q, k, v are (tokens, heads, head_dim) views with any token stride and head stride (the
// slices of one fused QKV output), the head dim contiguous; out is (tokens, heads, head_dim) contiguous.
// Work items are (sequence, head) pairs, split over threads.
#pragma once
#ifndef DS_PARALLEL_FOR
#include <ATen/Parallel.h>
#define DS_PARALLEL_FOR at::parallel_for
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "ds_cpu_ffn.h"      // ffn_exp (AVX-512)
#include "ds_cpu_kernels.h"  // Buf

namespace dskern {

struct AttnView {
  const float* p;
  int64_t token_stride, head_stride;  // in floats
  const float* at(int64_t t, int64_t h) const { return p + t * token_stride + h * head_stride; }
};

#if defined(DS_HAVE_FFN_VNNI)
constexpr int ATTN_RQ = 4;  // query rows per register tile (their scores and outputs share each K / V load)
constexpr int ATTN_NB = 4;  // 16-key blocks per register tile of scores: 4 x 4 accumulators

// scores of RQ query rows against key blocks [jb, jb + 16 NB): s_r[j] = scale * sum_c q_r[c] K^T[c, j]
template <int RQ, int NB>
inline void attn_scores(const float* const* qr, const float* kt, int64_t Lp, int64_t jb, int64_t d, float scale,
                        float* const* sr) {
  __m512 acc[RQ][NB];
  for (int r = 0; r < RQ; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    __m512 kv[NB];
    for (int b = 0; b < NB; ++b) kv[b] = _mm512_load_ps(kt + c * Lp + jb + 16 * b);
    for (int r = 0; r < RQ; ++r) {
      const __m512 qv = _mm512_set1_ps(qr[r][c]);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(qv, kv[b], acc[r][b]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < RQ; ++r)
    for (int b = 0; b < NB; ++b) _mm512_store_ps(sr[r] + jb + 16 * b, _mm512_mul_ps(acc[r][b], sc));
}

template <int RQ>
inline void attn_scores_rows(const float* const* qr, const float* kt, int64_t Lp, int64_t d, float scale,
                             float* const* sr) {
  int64_t jb = 0;
  for (; jb + 16 * ATTN_NB <= Lp; jb += 16 * ATTN_NB) attn_scores<RQ, ATTN_NB>(qr, kt, Lp, jb, d, scale, sr);
  switch ((Lp - jb) / 16) {
    case 3: attn_scores<RQ, 3>(qr, kt, Lp, jb, d, scale, sr); break;
    case 2: attn_scores<RQ, 2>(qr, kt, Lp, jb, d, scale, sr); break;
    case 1: attn_scores<RQ, 1>(qr, kt, Lp, jb, d, scale, sr); break;
    default: break;
  }
}

// softmax of one row of scores in place (lanes past L become 0); returns 1 / sum
inline float attn_softmax_row(float* s, int64_t L, int64_t Lp) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __mmask16 tail = static_cast<__mmask16>(L % 16 == 0 ? 0xFFFF : (1u << (L % 16)) - 1);
  __m512 vmax = neg_inf;
  for (int64_t jb = 0; jb < Lp; jb += 16) {
    const __mmask16 mk = jb + 16 >= Lp ? tail : static_cast<__mmask16>(0xFFFF);
    vmax = _mm512_mask_max_ps(vmax, mk, vmax, _mm512_load_ps(s + jb));
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t jb = 0; jb < Lp; jb += 16) {
    const __mmask16 mk = jb + 16 >= Lp ? tail : static_cast<__mmask16>(0xFFFF);
    const __m512 e = _mm512_maskz_mov_ps(mk, ffn_exp(_mm512_sub_ps(_mm512_load_ps(s + jb), m)));
    _mm512_store_ps(s + jb, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  return 1.f / _mm512_reduce_add_ps(vsum);
}

// out rows of RQ queries: o_r = inv_r * sum_j p_r[j] V[j], head dim in 16-float blocks (masked tail)
template <int RQ>
inline void attn_pv_rows(const float* const* pr, const float* inv, const AttnView& v, int64_t t0, int64_t L,
                         int64_t h, int64_t d, float* const* orow) {
  const int64_t nd = (d + 15) / 16;
  const __mmask16 dtail = static_cast<__mmask16>(d % 16 == 0 ? 0xFFFF : (1u << (d % 16)) - 1);
  for (int64_t cb = 0; cb < nd; cb += 2) {
    const bool two = cb + 1 < nd;
    const __mmask16 m0 = cb == nd - 1 ? dtail : static_cast<__mmask16>(0xFFFF);
    const __mmask16 m1 = cb + 1 == nd - 1 ? dtail : static_cast<__mmask16>(0xFFFF);
    __m512 a0[RQ], a1[RQ];
    for (int r = 0; r < RQ; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      const float* vj = v.at(t0 + j, h) + 16 * cb;
      const __m512 v0 = _mm512_maskz_loadu_ps(m0, vj);
      const __m512 v1 = two ? _mm512_maskz_loadu_ps(m1, vj + 16) : _mm512_setzero_ps();
      for (int r = 0; r < RQ; ++r) {
        const __m512 p = _mm512_set1_ps(pr[r][j]);
        a0[r] = _mm512_fmadd_ps(p, v0, a0[r]);
        a1[r] = _mm512_fmadd_ps(p, v1, a1[r]);
      }
    }
    for (int r = 0; r < RQ; ++r) {
      const __m512 s = _mm512_set1_ps(inv[r]);
      _mm512_mask_storeu_ps(orow[r] + 16 * cb, m0, _mm512_mul_ps(a0[r], s));
      if (two) _mm512_mask_storeu_ps(orow[r] + 16 * cb + 16, m1, _mm512_mul_ps(a1[r], s));
    }
  }
}

template <int RQ>
inline void attn_rows_avx512(const AttnView& q, const AttnView& v, float* out, int64_t out_stride, int64_t t0,
                             int64_t i, int64_t L, int64_t Lp, int64_t h, int64_t d, float scale, const float* kt,
                             float* s) {
  const float* qr[RQ];
  float* sr[RQ];
  float* orow[RQ];
  float inv[RQ];
  for (int r = 0; r < RQ; ++r) {
    qr[r] = q.at(t0 + i + r, h);
    sr[r] = s + r * Lp;
    orow[r] = out + (t0 + i + r) * out_stride + h * d;
  }
  attn_scores_rows<RQ>(qr, kt, Lp, d, scale, sr);
  for (int r = 0; r < RQ; ++r) inv[r] = attn_softmax_row(sr[r], L, Lp);
  attn_pv_rows<RQ>(sr, inv, v, t0, L, h, d, orow);
}

// one (sequence, head) of length L: kt is a (d, Lp) scratch (K transposed, zero columns past L), s (RQ Lp)
inline void attn_head_avx512(const AttnView& q, const AttnView& k, const AttnView& v, float* out, int64_t out_stride,
                             int64_t t0, int64_t L, int64_t h, int64_t d, float scale, float* kt, float* s) {
  const int64_t Lp = (L + 15) / 16 * 16;
  for (int64_t c = 0; c < d; ++c) {
    float* row = kt + c * Lp;
    for (int64_t j = 0; j < L; ++j) row[j] = k.at(t0 + j, h)[c];
    for (int64_t j = L; j < Lp; ++j) row[j] = 0.f;
  }
  int64_t i = 0;
  for (; i + ATTN_RQ <= L; i += ATTN_RQ) attn_rows_avx512<ATTN_RQ>(q, v, out, out_stride, t0, i, L, Lp, h, d, scale, kt, s);
  for (; i < L; ++i) attn_rows_avx512<1>(q, v, out, out_stride, t0, i, L, Lp, h, d, scale, kt, s);
}
#endif

// the portable path: the same passes in plain loops (std::exp)
inline void attn_head_generic(const AttnView& q, const AttnView& k, const AttnView& v, float* out, int64_t out_stride,
                              int64_t t0, int64_t L, int64_t h, int64_t d, float scale, float* s) {
  for (int64_t i = 0; i < L; ++i) {
    const float* qi = q.at(t0 + i, h);
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < L; ++j) {
      const float* kj = k.at(t0 + j, h);
      float acc = 0.f;
      for (int64_t c = 0; c < d; ++c) acc += qi[c] * kj[c];
      s[j] = acc * scale;
      m = std::max(m, s[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      s[j] = std::exp(s[j] - m);
      sum += s[j];
    }
    const float inv = 1.f / sum;
    float* o = out + (t0 + i) * out_stride + h * d;
    for (int64_t c = 0; c < d; ++c) o[c] = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      const float* vj = v.at(t0 + j, h);
      const float p = s[j] * inv;
      for (int64_t c = 0; c < d; ++c) o[c] += p * vj[c];
    }
  }
}

// out (T, H, d) contiguous; cu (B + 1) sequence starts, cu[0] = 0, cu[B] = T, nondecreasing
inline void varlen_attention_run(const AttnView& q, const AttnView& k, const AttnView& v, const int64_t* cu,
                                 int64_t B, int64_t H, int64_t d, float scale, float* out, bool generic) {
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max(max_len, cu[b + 1] - cu[b]);
  const int64_t Lp = (max_len + 15) / 16 * 16;
  DS_PARALLEL_FOR(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    Buf<float> kt(d * Lp), s(4 * Lp);  // scores of up to ATTN_RQ rows
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / H, h = w % H, t0 = cu[b], L = cu[b + 1] - cu[b];
      if (L == 0) continue;
#if defined(DS_HAVE_FFN_VNNI)
      if (!generic) {
        attn_head_avx512(q, k, v, out, H * d, t0, L, h, d, scale, kt.data(), s.data());
        continue;
      }
#endif
      attn_head_generic(q, k, v, out, H * d, t0, L, h, d, scale, s.data());
    }
  });
}

}  // namespace dskern
