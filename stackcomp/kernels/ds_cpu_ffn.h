// Fused int8 feed-forward block on CPU: y = W2 . act(W1 . x + b1) + b2, one call, no full-size hidden tensor.
//
// Why fused: run as two int8 linears, the (tokens x intermediate) hidden activation goes to memory three
// times (dequantized GEMM output, activation, re-quantized input of the second GEMM) and each linear
// quantizes its input in a pass of its own. Here rows go in blocks of FFN_BLOCK tokens: the block's
// hidden activation lives in a block-sized fp32 buffer (cache-resident) between the two GEMMs.
//
// Numerics (the torch oracle is stackcomp.kernels.ffn.fused_ffn_reference):
//   * x row r -> q = clamp(round(x * (127 / amax_r)), -127, 127), scale sx_r = amax_r / 127 (0 for a zero row);
//   * acc1[r, c] = sum_k q[r, k] W1q[c, k]  (int32, exact);
//   * h[r, c] = act(float(acc1) * (sx_r * ws1_c) + b1_c), act = exact-form GELU (erf) or its tanh form;
//   * h row r -> 8-bit codes the same way (scale sh_r), acc2 = codes . W2q^T, y = float(acc2) * (sh_r * ws2_o) + b2_o.
// Weights: symmetric int8 with one scale per output channel (Int8Linear's layout), packed once per layer.
//
// Operands (made by stackcomp.kernels.ffn.ffn_operands), for a GEMM with N outputs and K inputs:
//   wp   (N16, K4, 16, 4) int8   w[16 n16 + lane, 4 k4 + m] (zero padded)
//   cor  (N16*16) int32          128 * sum_k w[n, k] (the VNNI path adds 128 to the codes: u8 x s8 products)
//   ws   (N16*16) float32        per-channel scale (0 on padding); bias likewise padded with 0
// GEMM1 has K4 = ceil(in / 4), GEMM2 K4 = N16(GEMM1) * 4 (its input is the padded hidden row).
//
// Paths: with AVX-512 BW + VNNI (the avx512vnni build) codes are uint8 (q + 128) and vpdpbusd does
// 4 x 16 multiply-adds per instruction on 4 x 3 register tiles; otherwise (or force_generic) a portable
// loop over int8 codes (compiler-vectorized dot products, std::erf; about 10x slower) gives the same
// integers: the two differ only in the float rounding of the epilogue.
#pragma once
#ifndef DS_PARALLEL_FOR
#include <ATen/Parallel.h>
#define DS_PARALLEL_FOR at::parallel_for
#define DS_NUM_THREADS at::get_num_threads
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "ds_cpu_kernels.h"  // Buf

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define DS_HAVE_FFN_VNNI 1
#include <immintrin.h>
#endif

namespace dskern {

enum FfnAct : int { FFN_GELU_ERF = 0, FFN_GELU_TANH = 1 };

constexpr int64_t FFN_BLOCK = 32;  // tokens per work item: its hidden block is 32 x intermediate floats

struct FfnGeo {
  int64_t T, in, out, hid;  // tokens, x features, y features, intermediate
  int64_t K4a, N16a;        // GEMM1: input quads, output groups of 16 (hidden padded to 16 N16a)
  int64_t K4b, N16b;        // GEMM2: K4b = 4 N16a, output groups
};

struct FfnOps {
  const int8_t *w1, *w2;
  const int32_t *cor1, *cor2;
  const float *ws1, *ws2, *b1, *b2;  // b1, b2 padded to 16 N16a / 16 N16b
  int act;
};

inline float gelu_scalar(float v, int act) {
  if (act == FFN_GELU_TANH) {
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.f + std::tanh(u));
  }
  return 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));
}

// ---------------------------------------------------------------------------- portable path

// codes (int8) and scale of one row of n floats; pads [n, np) with 0
inline float ffn_quantize_row_i8(const float* x, int64_t n, int64_t np, int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  if (!(amax > 0.f)) {
    std::memset(q, 0, static_cast<size_t>(np));
    return 0.f;
  }
  const float inv = 127.f / amax;
  for (int64_t i = 0; i < n; ++i) {
    float r = std::nearbyint(x[i] * inv);
    r = std::min(127.f, std::max(-127.f, r));
    q[i] = static_cast<int8_t>(r);
  }
  for (int64_t i = n; i < np; ++i) q[i] = 0;
  return amax / 127.f;
}

// one 16-channel tile of a packed weight re-laid out as 16 contiguous rows of kp codes, so each output is a
// plain int8 dot product (vectorized by the compiler) over the block's rows
inline void ffn_tile_rows(const int8_t* wp, int64_t K4, int64_t n16, int8_t* wt) {
  const int8_t* w = wp + n16 * K4 * 64;
  for (int64_t k4 = 0; k4 < K4; ++k4)
    for (int l = 0; l < 16; ++l)
      for (int m = 0; m < 4; ++m) wt[l * K4 * 4 + 4 * k4 + m] = w[k4 * 64 + 4 * l + m];
}

inline int32_t ffn_dot_i8(const int8_t* a, const int8_t* b, int64_t n) {
  int32_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
  return s;
}

// rows [0, rn) of a block: both GEMMs, one weight tile re-laid out at a time and used for every row
inline void ffn_block_generic(const FfnGeo& g, const FfnOps& o, const float* x, int64_t rn, float* y, int8_t* xq,
                              float* h, int8_t* hq, int8_t* wt, float* sx, float* sh) {
  const int64_t Kpa = g.K4a * 4, Kpb = g.K4b * 4, Hp = g.N16a * 16;
  for (int64_t r = 0; r < rn; ++r) sx[r] = ffn_quantize_row_i8(x + r * g.in, g.in, Kpa, xq + r * Kpa);
  for (int64_t n16 = 0; n16 < g.N16a; ++n16) {
    ffn_tile_rows(o.w1, g.K4a, n16, wt);
    for (int64_t r = 0; r < rn; ++r)
      for (int l = 0; l < 16; ++l) {
        const int64_t c = n16 * 16 + l;
        const float v = static_cast<float>(ffn_dot_i8(xq + r * Kpa, wt + l * Kpa, Kpa)) * (sx[r] * o.ws1[c]) + o.b1[c];
        h[r * Hp + c] = c < g.hid ? gelu_scalar(v, o.act) : 0.f;
      }
  }
  for (int64_t r = 0; r < rn; ++r) sh[r] = ffn_quantize_row_i8(h + r * Hp, Hp, Kpb, hq + r * Kpb);
  for (int64_t n16 = 0; n16 < g.N16b; ++n16) {
    ffn_tile_rows(o.w2, g.K4b, n16, wt);
    for (int64_t r = 0; r < rn; ++r)
      for (int l = 0; l < 16; ++l) {
        const int64_t c = n16 * 16 + l;
        if (c < g.out)
          y[r * g.out + c] =
              static_cast<float>(ffn_dot_i8(hq + r * Kpb, wt + l * Kpb, Kpb)) * (sh[r] * o.ws2[c]) + o.b2[c];
      }
  }
}

inline void run_ffn_generic(const FfnGeo& g, const FfnOps& o, const float* x, float* y) {
  const int64_t nblocks = (g.T + FFN_BLOCK - 1) / FFN_BLOCK;
  const int64_t Kpa = g.K4a * 4, Kpb = g.K4b * 4;
  DS_PARALLEL_FOR(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    Buf<int8_t> xq(FFN_BLOCK * Kpa);
    Buf<float> h(FFN_BLOCK * g.N16a * 16);
    Buf<int8_t> hq(FFN_BLOCK * Kpb);
    Buf<int8_t> wt(16 * std::max(Kpa, Kpb));
    float sx[FFN_BLOCK], sh[FFN_BLOCK];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * FFN_BLOCK, rn = std::min<int64_t>(FFN_BLOCK, g.T - r0);
      ffn_block_generic(g, o, x + r0 * g.in, rn, y + r0 * g.out, xq.data(), h.data(), hq.data(), wt.data(), sx, sh);
    }
  });
}

#if defined(DS_HAVE_FFN_VNNI)
// ---------------------------------------------------------------------------- AVX-512 VNNI path

constexpr int FFN_RT = 4;  // rows per register tile
constexpr int FFN_CV = 3;  // 16-channel vectors per register tile: 4 x 3 int32 accumulators (GCC 12 spills
                           // larger tiles' accumulators of this loop; 4 x 3 measured fastest of 8 shapes).
                           // A block's row tiles take turns on one 3-vector weight panel (it stays in L1).

// exp(v) for v in about [-87, 88]: 2^n * p(r), r = v - n ln2, degree-6 polynomial (about 1 ulp)
inline __m512 ffn_exp(__m512 v) {
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);  // Cephes expf
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// GELU of 16 floats. erf: Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7 absolute, so GELU's error is
// below 1e-7 |x|, far under the 8-bit step that follows); tanh form: tanh(u) = 1 - 2 / (exp(2u) + 1).
inline __m512 ffn_gelu(__m512 v, int act) {
  const __m512 half_v = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
  const __m512 one = _mm512_set1_ps(1.f);
  if (act == FFN_GELU_TANH) {
    const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                   _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), v3, v));
    const __m512 e = ffn_exp(_mm512_mul_ps(u, _mm512_set1_ps(2.f)));
    const __m512 th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
    return _mm512_fmadd_ps(half_v, th, half_v);
  }
  const __m512 z = _mm512_mul_ps(v, _mm512_set1_ps(0.7071067811865476f));
  const __m512 az = _mm512_abs_ps(z);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), az, one));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = ffn_exp(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), az), az));
  __m512 erf_abs = _mm512_fnmadd_ps(p, e, one);  // 1 - p e
  // erf(z) has the sign of z
  const __m512 sign = _mm512_and_ps(z, _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u))));
  const __m512 erf_z = _mm512_or_ps(erf_abs, sign);
  return _mm512_fmadd_ps(half_v, erf_z, half_v);
}

// rows of n floats -> uint8 codes (q + 128, stride ld, padded with 128 up to ld) and scales
inline void ffn_quantize_rows_u8(const float* x, int64_t ldx, int64_t rows, int64_t n, uint8_t* q, int64_t ld,
                                 float* sc) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i off = _mm512_set1_epi32(128), lo = _mm512_set1_epi32(1), hi = _mm512_set1_epi32(255);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint8_t* qr = q + r * ld;
    __m512 m = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_and_ps(_mm512_loadu_ps(xr + i), absmask));
    if (i < n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
      m = _mm512_max_ps(m, _mm512_and_ps(_mm512_maskz_loadu_ps(k, xr + i), absmask));
    }
    const float amax = _mm512_reduce_max_ps(m);
    if (!(amax > 0.f)) {
      std::memset(qr, 128, static_cast<size_t>(ld));
      sc[r] = 0.f;
      continue;
    }
    sc[r] = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(127.f / amax);
    for (i = 0; i < n; i += 16) {
      const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
      __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, xr + i), inv)), off);
      v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
      _mm512_mask_cvtepi32_storeu_epi8(qr + i, k, v);
    }
    if (n < ld) std::memset(qr + n, 128, static_cast<size_t>(ld - n));
  }
}

// acc[r][v] = sum_k4 codes[r, 4 k4 .. 4 k4 + 3] . w[n16 + v, k4, lanes, :]; a macro, not a function, so
// the accumulators stay in registers in the function that also runs the epilogue (GCC spills an array
// passed by reference)
#define FFN_TILE_LOOP(RT, CV, acc, q, ldq, wp, K4, n16)                                      \
  {                                                                                           \
    _Pragma("GCC unroll 8") for (int r_ = 0; r_ < RT; ++r_) {                                 \
      _Pragma("GCC unroll 4") for (int v_ = 0; v_ < CV; ++v_) acc[r_][v_] = _mm512_setzero_si512(); \
    }                                                                                         \
    const int8_t* w_ = (wp) + (n16) * (K4) * 64;                                              \
    for (int64_t k4 = 0; k4 < (K4); ++k4) {                                                   \
      __m512i wv[CV];                                                                         \
      _Pragma("GCC unroll 4") for (int v_ = 0; v_ < CV; ++v_)                                  \
        wv[v_] = _mm512_loadu_si512(w_ + (v_ * (K4) + k4) * 64);                              \
      _Pragma("GCC unroll 8") for (int r_ = 0; r_ < RT; ++r_) {                                \
        int32_t quad;                                                                         \
        std::memcpy(&quad, (q) + r_ * (ldq) + 4 * k4, 4);                                     \
        const __m512i xb = _mm512_set1_epi32(quad);                                           \
        _Pragma("GCC unroll 4") for (int v_ = 0; v_ < CV; ++v_)                                \
          acc[r_][v_] = _mm512_dpbusd_epi32(acc[r_][v_], xb, wv[v_]);                         \
      }                                                                                       \
    }                                                                                         \
  }

// GEMM1 + epilogue for rows [0, RT) of a tile, channel vectors n16 .. n16 + CV: h and its |h| maxima
template <int RT, int CV>
inline void ffn_tile1(const FfnGeo& g, const FfnOps& o, const uint8_t* xq, int64_t ldq, const float* sx,
                      int64_t n16, float* h, int64_t ldh, float* hmax) {
  __m512i acc[RT][CV];
  FFN_TILE_LOOP(RT, CV, acc, xq, ldq, o.w1, g.K4a, n16)
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 mx[RT];
#pragma GCC unroll 8
  for (int r = 0; r < RT; ++r) mx[r] = _mm512_load_ps(hmax + 16 * r);
#pragma GCC unroll 4
  for (int v = 0; v < CV; ++v) {
    const int64_t c = (n16 + v) * 16;
    const __m512i cor = _mm512_loadu_si512(o.cor1 + c);
    const __m512 ws = _mm512_loadu_ps(o.ws1 + c), b = _mm512_loadu_ps(o.b1 + c);
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) {
      const __m512 f = _mm512_mul_ps(_mm512_set1_ps(sx[r]), ws);
      const __m512 pre = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], cor)), f, b);
      const __m512 act = ffn_gelu(pre, o.act);
      _mm512_storeu_ps(h + r * ldh + c, act);
      mx[r] = _mm512_max_ps(mx[r], _mm512_and_ps(act, absmask));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RT; ++r) _mm512_store_ps(hmax + 16 * r, mx[r]);
}

template <int RT, int CV>
inline void ffn_tile2(const FfnGeo& g, const FfnOps& o, const uint8_t* hq, int64_t ldq, const float* sh,
                      int64_t n16, float* y) {
  __m512i acc[RT][CV];
  FFN_TILE_LOOP(RT, CV, acc, hq, ldq, o.w2, g.K4b, n16)
#pragma GCC unroll 4
  for (int v = 0; v < CV; ++v) {
    const int64_t c = (n16 + v) * 16, left = g.out - c;
    const __mmask16 k = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    const __m512i cor = _mm512_loadu_si512(o.cor2 + c);
    const __m512 ws = _mm512_loadu_ps(o.ws2 + c), b = _mm512_loadu_ps(o.b2 + c);
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) {
      const __m512 f = _mm512_mul_ps(_mm512_set1_ps(sh[r]), ws);
      const __m512 out = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], cor)), f, b);
      _mm512_mask_storeu_ps(y + r * g.out + c, k, out);
    }
  }
}

// one row tile (rn <= FFN_RT rows) x all channel vectors, dispatching the compile-time shapes
template <int RT>
inline void ffn_rows1(const FfnGeo& g, const FfnOps& o, const uint8_t* xq, int64_t ldq, const float* sx,
                      int64_t n0, int64_t n1, float* h, int64_t ldh, float* hmax) {
  int64_t n = n0;
  for (; n + FFN_CV <= n1; n += FFN_CV) ffn_tile1<RT, FFN_CV>(g, o, xq, ldq, sx, n, h, ldh, hmax);
  for (; n < n1; ++n) ffn_tile1<RT, 1>(g, o, xq, ldq, sx, n, h, ldh, hmax);
}

template <int RT>
inline void ffn_rows2(const FfnGeo& g, const FfnOps& o, const uint8_t* hq, int64_t ldq, const float* sh,
                      int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
  for (; n + FFN_CV <= n1; n += FFN_CV) ffn_tile2<RT, FFN_CV>(g, o, hq, ldq, sh, n, y);
  for (; n < n1; ++n) ffn_tile2<RT, 1>(g, o, hq, ldq, sh, n, y);
}

#define FFN_RT_SWITCH(rn, F, ...)      \
  switch (rn) {                        \
    case 4: F<4>(__VA_ARGS__); break;  \
    case 3: F<3>(__VA_ARGS__); break;  \
    case 2: F<2>(__VA_ARGS__); break;  \
    default: F<1>(__VA_ARGS__); break; \
  }

// GEMM1 of rows [0, rn) (channel vectors n0 .. n1) into h, running |h| maxima into hmax (16 lanes per row)
inline void ffn_gemm1(const FfnGeo& g, const FfnOps& o, const uint8_t* xq, const float* sx, int64_t rn, int64_t n0,
                      int64_t n1, float* h, float* hmax) {
  const int64_t ldq = g.K4a * 4, ldh = g.N16a * 16;
  for (int64_t nc = n0; nc < n1; nc += FFN_CV) {  // one weight panel at a time, over every row tile
    const int64_t nce = std::min<int64_t>(n1, nc + FFN_CV);
    for (int64_t r = 0; r < rn; r += FFN_RT) {
      const int64_t m = std::min<int64_t>(FFN_RT, rn - r);
      FFN_RT_SWITCH(m, ffn_rows1, g, o, xq + r * ldq, ldq, sx + r, nc, nce, h + r * ldh, ldh, hmax + 16 * r)
    }
  }
}

inline void ffn_gemm2(const FfnGeo& g, const FfnOps& o, const uint8_t* hq, const float* sh, int64_t rn, int64_t n0,
                      int64_t n1, float* y) {
  const int64_t ldq = g.K4b * 4;
  for (int64_t nc = n0; nc < n1; nc += FFN_CV) {
    const int64_t nce = std::min<int64_t>(n1, nc + FFN_CV);
    for (int64_t r = 0; r < rn; r += FFN_RT) {
      const int64_t m = std::min<int64_t>(FFN_RT, rn - r);
      FFN_RT_SWITCH(m, ffn_rows2, g, o, hq + r * ldq, ldq, sh + r, nc, nce, y + r * g.out)
    }
  }
}

// hidden rows -> codes: the |h| maxima are known, so this is one pass of multiply + convert
inline void ffn_requantize(const FfnGeo& g, const float* h, int64_t rn, const float* hmax, uint8_t* hq, float* sh) {
  const int64_t ldh = g.N16a * 16, ldq = g.K4b * 4;  // equal: both 16 N16a
  const __m512i off = _mm512_set1_epi32(128), lo = _mm512_set1_epi32(1), hi = _mm512_set1_epi32(255);
  for (int64_t r = 0; r < rn; ++r) {
    const float amax = _mm512_reduce_max_ps(_mm512_load_ps(hmax + 16 * r));
    uint8_t* qr = hq + r * ldq;
    if (!(amax > 0.f)) {
      std::memset(qr, 128, static_cast<size_t>(ldq));
      sh[r] = 0.f;
      continue;
    }
    sh[r] = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(127.f / amax);
    const float* hr = h + r * ldh;
    for (int64_t i = 0; i < ldh; i += 16) {
      __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(hr + i), inv)), off);
      v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i), _mm512_cvtepi32_epi8(v));
    }
  }
}

inline void run_ffn_vnni(const FfnGeo& g, const FfnOps& o, const float* x, float* y) {
  const int64_t ldx = g.K4a * 4, ldh = g.N16a * 16;
  const int64_t nblocks = (g.T + FFN_BLOCK - 1) / FFN_BLOCK;
  const int64_t nthreads = DS_NUM_THREADS();
  if (nblocks >= nthreads || g.T > FFN_BLOCK) {
    // many tokens: blocks of rows in parallel, both GEMMs per block (the hidden block stays in cache)
    DS_PARALLEL_FOR(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      Buf<uint8_t> xq(FFN_BLOCK * ldx);
      Buf<float> h(FFN_BLOCK * ldh);
      Buf<uint8_t> hq(FFN_BLOCK * ldh);
      Buf<float> hmax(16 * FFN_BLOCK);
      float sx[FFN_BLOCK], sh[FFN_BLOCK];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * FFN_BLOCK, rn = std::min<int64_t>(FFN_BLOCK, g.T - r0);
        ffn_quantize_rows_u8(x + r0 * g.in, g.in, rn, g.in, xq.data(), ldx, sx);
        std::fill(hmax.data(), hmax.data() + 16 * rn, 0.f);
        ffn_gemm1(g, o, xq.data(), sx, rn, 0, g.N16a, h.data(), hmax.data());
        ffn_requantize(g, h.data(), rn, hmax.data(), hq.data(), sh);
        ffn_gemm2(g, o, hq.data(), sh, rn, 0, g.N16b, y + r0 * g.out);
      }
    });
    return;
  }
  // few tokens (one block, several threads): each GEMM split over output channels, a join between them
  const int64_t rn = g.T;
  Buf<uint8_t> xq(FFN_BLOCK * ldx);
  Buf<float> h(FFN_BLOCK * ldh);
  Buf<uint8_t> hq(FFN_BLOCK * ldh);
  float sx[FFN_BLOCK], sh[FFN_BLOCK];
  ffn_quantize_rows_u8(x, g.in, rn, g.in, xq.data(), ldx, sx);
  const int64_t step1 = FFN_CV * 4;  // channel vectors per work item
  const int64_t items1 = (g.N16a + step1 - 1) / step1;
  Buf<float> part(items1 * 16 * FFN_BLOCK);  // |h| maxima (16 lanes) per work item and row
  DS_PARALLEL_FOR(0, items1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* hm = part.data() + i * 16 * FFN_BLOCK;
      std::fill(hm, hm + 16 * rn, 0.f);
      ffn_gemm1(g, o, xq.data(), sx, rn, i * step1, std::min<int64_t>(g.N16a, (i + 1) * step1), h.data(), hm);
    }
  });
  Buf<float> hmax(16 * FFN_BLOCK);
  for (int64_t r = 0; r < rn; ++r) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t i = 0; i < items1; ++i) m = _mm512_max_ps(m, _mm512_load_ps(part.data() + (i * FFN_BLOCK + r) * 16));
    _mm512_store_ps(hmax.data() + 16 * r, m);
  }
  ffn_requantize(g, h.data(), rn, hmax.data(), hq.data(), sh);
  const int64_t step2 = FFN_CV;
  const int64_t items2 = (g.N16b + step2 - 1) / step2;
  DS_PARALLEL_FOR(0, items2, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      ffn_gemm2(g, o, hq.data(), sh, rn, i * step2, std::min<int64_t>(g.N16b, (i + 1) * step2), y);
  });
}
#endif

// GCC 11+ only: the tile code relies on `#pragma GCC target` reaching the lambdas inside the functions, which
// clang does not honour (a clang build keeps the VNNI path)
#if defined(DS_HAVE_FFN_VNNI) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define DS_HAVE_FFN_AMX 1
}  // namespace dskern
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
namespace dskern {
// ---------------------------------------------------------------------------- AMX path (Sapphire Rapids and later)
//
// The same two GEMMs on the AMX tile unit: tdpbusd multiplies a 16 x 64 tile of uint8 codes by a 16 x 64 tile of
// int8 weights (16 outputs x 16 k-quads, exactly one (n16, 16 k4) slab of the packed layout) into 16 x 16 int32,
// about 8x the multiply-adds per cycle of AVX-512 VNNI. The integers are the VNNI path's; the epilogue (scale,
// bias, GELU, requantization) is the same AVX-512 code on the stored int32 tiles. Rows go in blocks of 32 (two
// A tiles); a short block is padded with code 128 (zero) rows whose outputs are dropped. Needs every K a
// multiple of 64 (ffn_operands(multiple=64)): the caller checks ffn_amx_fits.

// Whether this process may run AMX tile instructions: the CPU has AMX-TILE and AMX-INT8 (CPUID 7.0 EDX bits 24,
// 25), and Linux granted the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, needed once per process).
inline bool ffn_amx_ready() {
  static const bool ready = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1u) || !((d >> 25) & 1u)) return false;
    constexpr long ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return false;
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bitmask) != 0) return false;
    return ((bitmask >> XFEATURE_XTILEDATA) & 1ul) != 0;
  }();
  return ready;
}

inline bool ffn_amx_fits(const FfnGeo& g) { return g.K4a % 16 == 0 && g.K4b % 16 == 0; }

constexpr int64_t FFN_AMX_ROWS = 32;  // rows per block: two A tiles of 16

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8")

// every tile 16 rows x 64 bytes: tmm0-3 int32 accumulators (2 row tiles x 2 channel groups), tmm4-5 A, tmm6-7 B
struct alignas(64) FfnTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  FfnTileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};

// acc (32 rows x 32 int32, row stride 32) = codes[32 rows, K] . w[n16, n16 + 1]^T (one group if single)
__attribute__((target("amx-tile,amx-int8"))) inline void ffn_amx_pair(const uint8_t* q, int64_t ldq, const int8_t* wp,
                                                                       int64_t K4, int64_t n16, bool single, int32_t* acc) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int8_t* w0 = wp + n16 * K4 * 64;
  const int8_t* w1 = single ? w0 : w0 + K4 * 64;
  for (int64_t kc = 0; kc < K4 / 16; ++kc) {
    _tile_loadd(4, q + kc * 64, ldq);
    _tile_loadd(5, q + 16 * ldq + kc * 64, ldq);
    _tile_loadd(6, w0 + kc * 1024, 64);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(2, 5, 6);
    if (!single) {
      _tile_loadd(7, w1 + kc * 1024, 64);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, acc, 128);
  _tile_stored(2, acc + 16 * 32, 128);
  if (!single) {
    _tile_stored(1, acc + 16, 128);
    _tile_stored(3, acc + 16 * 32 + 16, 128);
  }
}

// GEMM2 (o.w2: g.K4b x g.N16b, g.out outputs) of a 32-row block of codes q (row scales s) and its epilogue
// y = acc * (s_r * ws_c) + b_c for the block's rn real rows; acc is a 32 x 32 int32 scratch
__attribute__((target("amx-tile,amx-int8"))) inline void ffn_amx_gemm2(const FfnGeo& g, const FfnOps& o,
                                                                        const uint8_t* q, int64_t ldq, const float* s,
                                                                        int64_t rn, int32_t* acc, float* y) {
  for (int64_t n = 0; n < g.N16b; n += 2) {
    const bool single = n + 1 == g.N16b;
    ffn_amx_pair(q, ldq, o.w2, g.K4b, n, single, acc);
    for (int v = 0; v < (single ? 1 : 2); ++v) {
      const int64_t c = (n + v) * 16, left = g.out - c;
      if (left <= 0) break;
      const __mmask16 k = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
      const __m512i cor = _mm512_loadu_si512(o.cor2 + c);
      const __m512 ws = _mm512_loadu_ps(o.ws2 + c), bias = _mm512_loadu_ps(o.b2 + c);
      for (int64_t r = 0; r < rn; ++r) {
        const __m512i a = _mm512_loadu_si512(acc + r * 32 + v * 16);
        const __m512 f = _mm512_mul_ps(_mm512_set1_ps(s[r]), ws);
        _mm512_mask_storeu_ps(y + r * g.out + c, k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, cor)), f, bias));
      }
    }
  }
}

__attribute__((target("amx-tile,amx-int8"))) inline void run_ffn_amx(const FfnGeo& g, const FfnOps& o, const float* x,
                                                                      float* y) {
  const int64_t ldx = g.K4a * 4, ldh = g.N16a * 16;  // ldh == 4 K4b: the hidden codes are GEMM2's A
  const int64_t nblocks = (g.T + FFN_AMX_ROWS - 1) / FFN_AMX_ROWS;
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  DS_PARALLEL_FOR(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    FfnTileConfig cfg;
    _tile_loadconfig(&cfg);
    Buf<uint8_t> xq(FFN_AMX_ROWS * ldx);
    Buf<float> h(FFN_AMX_ROWS * ldh);
    Buf<uint8_t> hq(FFN_AMX_ROWS * ldh);
    Buf<float> hmax(16 * FFN_AMX_ROWS);
    Buf<int32_t> acc(FFN_AMX_ROWS * 32);
    float sx[FFN_AMX_ROWS], sh[FFN_AMX_ROWS];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * FFN_AMX_ROWS, rn = std::min<int64_t>(FFN_AMX_ROWS, g.T - r0);
      ffn_quantize_rows_u8(x + r0 * g.in, g.in, rn, g.in, xq.data(), ldx, sx);
      if (rn < FFN_AMX_ROWS) {
        std::memset(xq.data() + rn * ldx, 128, static_cast<size_t>((FFN_AMX_ROWS - rn) * ldx));
        std::memset(hq.data() + rn * ldh, 128, static_cast<size_t>((FFN_AMX_ROWS - rn) * ldh));
      }
      std::fill(hmax.data(), hmax.data() + 16 * rn, 0.f);
      for (int64_t n = 0; n < g.N16a; n += 2) {  // GEMM1 + scale, bias, GELU; |h| maxima per row
        const bool single = n + 1 == g.N16a;
        ffn_amx_pair(xq.data(), ldx, o.w1, g.K4a, n, single, acc.data());
        for (int v = 0; v < (single ? 1 : 2); ++v) {
          const int64_t c = (n + v) * 16;
          const __m512i cor = _mm512_loadu_si512(o.cor1 + c);
          const __m512 ws = _mm512_loadu_ps(o.ws1 + c), bias = _mm512_loadu_ps(o.b1 + c);
          for (int64_t r = 0; r < rn; ++r) {
            const __m512i a = _mm512_loadu_si512(acc.data() + r * 32 + v * 16);
            const __m512 f = _mm512_mul_ps(_mm512_set1_ps(sx[r]), ws);
            const __m512 act = ffn_gelu(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, cor)), f, bias), o.act);
            _mm512_storeu_ps(h.data() + r * ldh + c, act);
            _mm512_store_ps(hmax.data() + 16 * r,
                            _mm512_max_ps(_mm512_load_ps(hmax.data() + 16 * r), _mm512_and_ps(act, absmask)));
          }
        }
      }
      ffn_requantize(g, h.data(), rn, hmax.data(), hq.data(), sh);
      ffn_amx_gemm2(g, o, hq.data(), ldh, sh, rn, acc.data(), y + r0 * g.out);  // GEMM2 + scale, bias
    }
    _tile_release();
  });
}

// One int8 linear (the FFN's second GEMM alone: g.K4b, g.N16b, g.out; o.w2, o.cor2, o.ws2, o.b2) on AMX
__attribute__((target("amx-tile,amx-int8"))) inline void run_linear_amx(const FfnGeo& g, const FfnOps& o,
                                                                         const float* x, float* y) {
  const int64_t ldx = g.K4b * 4;
  const int64_t nblocks = (g.T + FFN_AMX_ROWS - 1) / FFN_AMX_ROWS;
  DS_PARALLEL_FOR(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    FfnTileConfig cfg;
    _tile_loadconfig(&cfg);
    Buf<uint8_t> xq(FFN_AMX_ROWS * ldx);
    Buf<int32_t> acc(FFN_AMX_ROWS * 32);
    float sx[FFN_AMX_ROWS];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * FFN_AMX_ROWS, rn = std::min<int64_t>(FFN_AMX_ROWS, g.T - r0);
      ffn_quantize_rows_u8(x + r0 * g.in, g.in, rn, g.in, xq.data(), ldx, sx);
      if (rn < FFN_AMX_ROWS)
        std::memset(xq.data() + rn * ldx, 128, static_cast<size_t>((FFN_AMX_ROWS - rn) * ldx));
      ffn_amx_gemm2(g, o, xq.data(), ldx, sx, rn, acc.data(), y + r0 * g.out);
    }
    _tile_release();
  });
}
#pragma GCC pop_options
#endif

//: whether ffn_forward can take its AMX path in this process (compiled in, CPU has it, Linux allows it)
inline bool ffn_has_amx() {
#if defined(DS_HAVE_FFN_AMX)
  return ffn_amx_ready();
#else
  return false;
#endif
}

inline bool ffn_has_vnni() {
#if defined(DS_HAVE_FFN_VNNI)
  return true;
#else
  return false;
#endif
}

// path: FFN_PATH_BEST (AMX where ffn_has_amx and the operands fit it, else VNNI where compiled, else portable),
// FFN_PATH_VNNI (never AMX), FFN_PATH_GENERIC (the portable loop)
enum FfnPath : int { FFN_PATH_BEST = 0, FFN_PATH_VNNI = 1, FFN_PATH_GENERIC = 2 };

inline void run_ffn(const FfnGeo& g, const FfnOps& o, const float* x, float* y, int path) {
#if defined(DS_HAVE_FFN_AMX)
  if (path == FFN_PATH_BEST && ffn_amx_fits(g) && ffn_amx_ready()) {
    run_ffn_amx(g, o, x, y);
    return;
  }
#endif
#if defined(DS_HAVE_FFN_VNNI)
  if (path != FFN_PATH_GENERIC) {
    run_ffn_vnni(g, o, x, y);
    return;
  }
#endif
  (void)path;
  run_ffn_generic(g, o, x, y);
}

// ---------------------------------------------------------------------------- one int8 linear
//
// y = x W^T + b with x's rows quantized as the FFN's are (per row, 8 bits) and W in the packed layout: the
// FFN's second GEMM alone, on the same three paths. The geometry and operands are the FFN's "b" half:
// g.T tokens, g.in = g's input features, g.K4b/g.N16b the packed weight, g.out outputs; o.w2/cor2/ws2/b2.

inline void run_linear_generic(const FfnGeo& g, const FfnOps& o, const float* x, float* y) {
  const int64_t Kp = g.K4b * 4;
  const int64_t nblocks = (g.T + FFN_BLOCK - 1) / FFN_BLOCK;
  DS_PARALLEL_FOR(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    Buf<int8_t> xq(FFN_BLOCK * Kp);
    Buf<int8_t> wt(16 * Kp);
    float sx[FFN_BLOCK];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * FFN_BLOCK, rn = std::min<int64_t>(FFN_BLOCK, g.T - r0);
      for (int64_t r = 0; r < rn; ++r) sx[r] = ffn_quantize_row_i8(x + (r0 + r) * g.in, g.in, Kp, xq.data() + r * Kp);
      for (int64_t n16 = 0; n16 < g.N16b; ++n16) {
        ffn_tile_rows(o.w2, g.K4b, n16, wt.data());
        for (int64_t r = 0; r < rn; ++r)
          for (int l = 0; l < 16; ++l) {
            const int64_t c = n16 * 16 + l;
            if (c < g.out)
              y[(r0 + r) * g.out + c] =
                  static_cast<float>(ffn_dot_i8(xq.data() + r * Kp, wt.data() + l * Kp, Kp)) * (sx[r] * o.ws2[c]) +
                  o.b2[c];
          }
      }
    }
  });
}

#if defined(DS_HAVE_FFN_VNNI)
inline void run_linear_vnni(const FfnGeo& g, const FfnOps& o, const float* x, float* y) {
  const int64_t ldx = g.K4b * 4;
  const int64_t nblocks = (g.T + FFN_BLOCK - 1) / FFN_BLOCK;
  if (nblocks >= DS_NUM_THREADS() || g.T > FFN_BLOCK) {  // blocks of rows in parallel
    DS_PARALLEL_FOR(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      Buf<uint8_t> xq(FFN_BLOCK * ldx);
      float sx[FFN_BLOCK];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * FFN_BLOCK, rn = std::min<int64_t>(FFN_BLOCK, g.T - r0);
        ffn_quantize_rows_u8(x + r0 * g.in, g.in, rn, g.in, xq.data(), ldx, sx);
        ffn_gemm2(g, o, xq.data(), sx, rn, 0, g.N16b, y + r0 * g.out);
      }
    });
    return;
  }
  // few tokens on several threads: the output channels split between them
  Buf<uint8_t> xq(FFN_BLOCK * ldx);
  float sx[FFN_BLOCK];
  ffn_quantize_rows_u8(x, g.in, g.T, g.in, xq.data(), ldx, sx);
  const int64_t items = (g.N16b + FFN_CV - 1) / FFN_CV;
  DS_PARALLEL_FOR(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      ffn_gemm2(g, o, xq.data(), sx, g.T, i * FFN_CV, std::min<int64_t>(g.N16b, (i + 1) * FFN_CV), y);
  });
}
#endif

inline void run_linear(const FfnGeo& g, const FfnOps& o, const float* x, float* y, int path) {
#if defined(DS_HAVE_FFN_AMX)
  if (path == FFN_PATH_BEST && g.K4b % 16 == 0 && ffn_amx_ready()) {
    run_linear_amx(g, o, x, y);
    return;
  }
#endif
#if defined(DS_HAVE_FFN_VNNI)
  if (path != FFN_PATH_GENERIC) {
    run_linear_vnni(g, o, x, y);
    return;
  }
#endif
  (void)path;
  run_linear_generic(g, o, x, y);
}

}  // namespace dskern
