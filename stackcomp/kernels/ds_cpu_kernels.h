// Kernels (no torch types) of the packed dense-sparse (DSFormer) linear layer on CPU.
//
// y[t, o] = sum_b sum_j v[b, o, j] * z[b, t, idx[b, o, j]] + bias[o],  z[b] = x_b @ D_b^T.
//
// Packed layout (stackcomp/kernels/packed.py): output rows are grouped by 8,
//   dict   (nb, K, B)        float32, or int8 with dscale (nb*K) per-atom scales
//   vals   (nb, OG, S, 8)    float32, or int8 with vscale (OG*8) per-output-row scales
//   idx    (nb, OG, S, 8)    uint8 (K <= 256) or int16
// so one o-group of one block is a small contiguous tile: the many-token loop reads it row by
// row, the few-token loop 8 rows (SIMD lanes) at a time.
//
// Many tokens: tokens are the SIMD lanes. Per chunk of TC tokens and per block b, zT_b (K x TC)
// is made in an L1-sized buffer, then each output row gathers whole contiguous rows of it:
// acc[t..] += v * zT_b[idx, t..]. Threads take whole chunks (nothing is computed twice).
//   fp32: z by an FMA micro-kernel (broadcast atom entry x 16 tokens), gather by FMA.
//   int8: x is quantized per token to int16, z = madd(int8 atom pairs, int16 token pairs) in
//   int32 (exact), rescaled, re-quantized per token to int16 (Q15 range), and the gather is
//   acc16 += mulhrs(v8 << shift, z16) (16 tokens per instruction); shift keeps the int16 sum of
//   each (row, block) from overflowing; each (row, block) sum is widened to fp32 once.
// Few tokens: output rows are the lanes (the loop is bandwidth-bound): z once, then
//   acc[o..o+7] += v[o..o+7] * gather(z_b, idx[o..o+7]).
//
// On CPUs with AVX-512 VBMI + VNNI, int8 layers above the few-token loop run ds_cpu_vnni8.h instead
// (8-bit activations, 2-4x faster); the q15 kernel here stays the fallback (STACKCOMP_INT8_KERNEL=q15).
//
// Portable: GCC vector extensions for the fp32 code (SSE, AVX2 or AVX-512 as compiled), AVX2
// intrinsics only under #if defined(__AVX2__); without AVX2 the int8 layer uses the few-token loop.
#pragma once
// DS_PARALLEL_FOR(begin, end, grain, f) and DS_NUM_THREADS() default to ATen's; a standalone
// harness may define them before including this header.
#ifndef DS_PARALLEL_FOR
#include <ATen/Parallel.h>
#define DS_PARALLEL_FOR at::parallel_for
#define DS_NUM_THREADS at::get_num_threads
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace dskern {

typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f vld(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
inline void vst(float* p, v8f v) { *reinterpret_cast<v8f_u*>(p) = v; }
inline v8f vbc(float s) { return v8f{s, s, s, s, s, s, s, s}; }

// 64-byte aligned scratch that lives for one parallel task
template <typename T>
struct Buf {
  T* p = nullptr;
  explicit Buf(int64_t n) {
    size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64) * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T* data() { return p; }
};

// 8 consecutive entries as floats / int32
inline v8f load8f(const float* p) { return vld(p); }
inline v8f load8f(const int8_t* p) {
#if defined(__AVX2__)
  return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  return v8f{float(p[0]), float(p[1]), float(p[2]), float(p[3]), float(p[4]), float(p[5]), float(p[6]), float(p[7])};
#endif
}
// base[ip[0..7]] (vgatherdps is slower than 8 scalar loads on Zen 3)
template <typename IT>
inline v8f gather8(const float* base, const IT* ip) {
#if defined(__AVX2__)
  __m128 lo, hi;
  if constexpr (sizeof(IT) == 1) {
    uint64_t w;
    std::memcpy(&w, ip, 8);
    lo = _mm_set_ps(base[(w >> 24) & 255], base[(w >> 16) & 255], base[(w >> 8) & 255], base[w & 255]);
    hi = _mm_set_ps(base[(w >> 56) & 255], base[(w >> 48) & 255], base[(w >> 40) & 255], base[(w >> 32) & 255]);
  } else {
    lo = _mm_set_ps(base[ip[3]], base[ip[2]], base[ip[1]], base[ip[0]]);
    hi = _mm_set_ps(base[ip[7]], base[ip[6]], base[ip[5]], base[ip[4]]);
  }
  return (v8f)_mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
#else
  return v8f{base[ip[0]], base[ip[1]], base[ip[2]], base[ip[3]], base[ip[4]], base[ip[5]], base[ip[6]], base[ip[7]]};
#endif
}

inline float hsum(v8f a) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += a[l];
  return s;
}

// dst[j * ld + i] = src[i * ls + j] for an 8x8 tile of 32-bit words (floats or int16 pairs).
inline void transpose8x8(const float* src, int64_t ls, float* dst, int64_t ld) {
#if defined(__AVX2__)
  __m256 r0 = _mm256_loadu_ps(src + 0 * ls), r1 = _mm256_loadu_ps(src + 1 * ls);
  __m256 r2 = _mm256_loadu_ps(src + 2 * ls), r3 = _mm256_loadu_ps(src + 3 * ls);
  __m256 r4 = _mm256_loadu_ps(src + 4 * ls), r5 = _mm256_loadu_ps(src + 5 * ls);
  __m256 r6 = _mm256_loadu_ps(src + 6 * ls), r7 = _mm256_loadu_ps(src + 7 * ls);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(dst + 0 * ld, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld, _mm256_permute2f128_ps(s3, s7, 0x31));
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ld + i] = src[i * ls + j];
#endif
}

// dst (cols x rows, stride ld) = transpose of src (rows x cols, stride ls), 32-bit words.
inline void transpose_block(const float* src, int64_t ls, float* dst, int64_t ld, int64_t rows, int64_t cols) {
  const int64_t r8 = rows & ~int64_t(7), c8 = cols & ~int64_t(7);
  for (int64_t i = 0; i < r8; i += 8) {
    for (int64_t j = 0; j < c8; j += 8) transpose8x8(src + i * ls + j, ls, dst + j * ld + i, ld);
    for (int64_t j = c8; j < cols; ++j)
      for (int64_t ii = i; ii < i + 8; ++ii) dst[j * ld + ii] = src[ii * ls + j];
  }
  for (int64_t i = r8; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld + i] = src[i * ls + j];
}

struct Geo {
  int64_t T, in, out, nb, K, B, S, OG;
};

// ================================================================ fp32, many tokens

// zT[k, c0 .. c0 + 8*NV) = sum_i D[k, i] * xT[i, same columns]; R atom rows share each x load.
// (NV=2, R=5: 10 accumulators + 5 broadcasts + 1 load fit the 16 AVX2 registers.)
template <int NV, int R>
inline void zgemm_f32(const float* D, int64_t K, int64_t B, const float* xT, int64_t ldx, float* zT, int64_t ldz) {
  int64_t k = 0;
  for (; k + R <= K; k += R) {
    v8f a[R][NV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[r][v] = vbc(0.f);
    const float* d = D + k * B;
    for (int64_t i = 0; i < B; ++i) {
      const float* xr = xT + i * ldx;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        v8f xv = vld(xr + 8 * v);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) a[r][v] += vbc(d[r * B + i]) * xv;
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) vst(zT + (k + r) * ldz + 8 * v, a[r][v]);
  }
  for (; k < K; ++k) {
    v8f a[NV];
    for (int v = 0; v < NV; ++v) a[v] = vbc(0.f);
    const float* d = D + k * B;
    for (int64_t i = 0; i < B; ++i)
      for (int v = 0; v < NV; ++v) a[v] += vbc(d[i]) * vld(xT + i * ldx + 8 * v);
    for (int v = 0; v < NV; ++v) vst(zT + k * ldz + 8 * v, a[v]);
  }
}

// yT (OG*8 x TC) += sum_j v * zT[idx]; RR output rows at once = RR*NV independent FMA chains.
template <int NV, typename VT, typename IT>
inline void gather_f32(const float* zT, const VT* vals, const IT* idx, int64_t OG, int64_t S, float* yT) {
  constexpr int TC = NV * 8;
  constexpr int RR = NV >= 8 ? 1 : NV >= 4 ? 2 : 8 / NV;
  for (int64_t og = 0; og < OG; ++og) {
    const VT* vg = vals + og * S * 8;
    const IT* ig = idx + og * S * 8;
    for (int r = 0; r < 8; r += RR) {
      v8f a[RR][NV];
#pragma GCC unroll 8
      for (int q = 0; q < RR; ++q)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) a[q][v] = vld(yT + (og * 8 + r + q) * TC + 8 * v);
      for (int64_t j = 0; j < S; ++j) {
#pragma GCC unroll 8
        for (int q = 0; q < RR; ++q) {
          const float* z = zT + static_cast<int64_t>(ig[j * 8 + r + q]) * TC;
          const v8f w = vbc(static_cast<float>(vg[j * 8 + r + q]));
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) a[q][v] += w * vld(z + 8 * v);
        }
      }
#pragma GCC unroll 8
      for (int q = 0; q < RR; ++q)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) vst(yT + (og * 8 + r + q) * TC + 8 * v, a[q][v]);
    }
  }
}

// y rows t0 .. t0+tn from yT (OUTP x TC): row scale and bias, then transpose.
inline void store_output(const Geo& g, float* yT, int64_t TC, const float* bias, float* y, int64_t t0, int64_t tn,
                         const float* rowscale = nullptr) {
  if (bias != nullptr || rowscale != nullptr)
    for (int64_t o = 0; o < g.out; ++o) {
      float* yr = yT + o * TC;
      const v8f bo = vbc(bias != nullptr ? bias[o] : 0.f), so = vbc(rowscale != nullptr ? rowscale[o] : 1.f);
      for (int64_t v = 0; v < TC; v += 8) vst(yr + v, vld(yr + v) * so + bo);
    }
  transpose_block(yT, TC, y + t0 * g.out, g.out, g.out, tn);
}

template <int NV, typename IT>
void forward_chunks_f32(const Geo& g, const float* x, const float* dict, const float* vals, const IT* idx,
                        const float* bias, float* y) {
  constexpr int TC = NV * 8;
  const int64_t nchunks = (g.T + TC - 1) / TC;
  const int64_t OUTP = g.OG * 8;
  DS_PARALLEL_FOR(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    Buf<float> xT(g.in * TC), zT(g.K * TC), yT(OUTP * TC);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * TC, tn = std::min<int64_t>(TC, g.T - t0);
      if (tn < TC) std::fill(xT.data(), xT.data() + g.in * TC, 0.f);
      transpose_block(x + t0 * g.in, g.in, xT.data(), TC, tn, g.in);
      std::fill(yT.data(), yT.data() + OUTP * TC, 0.f);
      for (int64_t b = 0; b < g.nb; ++b) {
        const float* D = dict + b * g.K * g.B;
        const float* xb = xT.data() + b * g.B * TC;
        if constexpr (NV >= 2) {
          for (int v = 0; v < NV; v += 2) zgemm_f32<2, 5>(D, g.K, g.B, xb + 8 * v, TC, zT.data() + 8 * v, TC);
        } else {
          zgemm_f32<1, 6>(D, g.K, g.B, xb, TC, zT.data(), TC);
        }
        gather_f32<NV, float, IT>(zT.data(), vals + b * g.OG * g.S * 8, idx + b * g.OG * g.S * 8, g.OG, g.S,
                                  yT.data());
      }
      store_output(g, yT.data(), TC, bias, y, t0, tn);
    }
  });
}

// ================================================================ int8, many tokens (AVX2)
#if defined(__AVX2__)

// largest int16 activation so that sum_i |d_i x_i| < 2^31 for |d| <= 128 over Bp entries
inline float x_qmax(int64_t Bp) {
  return static_cast<float>(std::min<int64_t>(32767, INT64_C(2147483647) / (128 * std::max<int64_t>(Bp, 1))));
}

// x rows (tn x in) -> per-token int16 (TC x nb*Bp, blocks padded to even width), scales xs[TC]
inline void quantize_x(const Geo& g, int64_t Bp, const float* xc, int64_t tn, int64_t TC, int16_t* xq,
                       float* xs) {
  const int64_t row = g.nb * Bp;
  const float qmax = x_qmax(Bp);
  std::memset(xq, 0, sizeof(int16_t) * TC * row);
  for (int64_t t = 0; t < TC; ++t) xs[t] = 0.f;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t t = 0; t < tn; ++t) {
    const float* xr = xc + t * g.in;
    __m256 m = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= g.in; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xr + i), absmask));
    float amax = 0.f;
    for (int l = 0; l < 8; ++l) amax = std::max(amax, ((v8f)m)[l]);
    for (; i < g.in; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float sc = amax > 0.f ? amax / qmax : 1.f;
    xs[t] = sc;
    const __m256 inv = _mm256_set1_ps(1.f / sc);
    int16_t* q = xq + t * row;
    for (int64_t b = 0; b < g.nb; ++b) {
      const float* xb = xr + b * g.B;
      int16_t* qb = q + b * Bp;
      int64_t k = 0;
      for (; k + 16 <= g.B; k += 16) {
        __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k), inv));
        __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 8), inv));
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + k), p);
      }
      const float invs = 1.f / sc;
      for (; k < g.B; ++k) qb[k] = static_cast<int16_t>(std::nearbyint(xb[k] * invs));
    }
  }
}

// acc + madd(w, x): int32 sums of int16 pairs, accumulated (one VNNI instruction where the CPU has it;
// both forms wrap identically, so results are bit-identical)
inline __m256i madd_acc(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
#endif
}

// entries 2*i2, 2*i2+1 of an int8 row, sign-extended to two int16 and broadcast: the madd operand
inline __m256i pair_bcast(const int8_t* d, int64_t i2) {
  int16_t p;
  std::memcpy(&p, d + 2 * i2, 2);
  return _mm256_cvtepi8_epi16(_mm_set1_epi16(p));
}
// the last entry of an odd-width row, paired with 0
inline __m256i tail_bcast(const int8_t* d, int64_t B) {
  return _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(d[B - 1]))));
}

// zf[k, c0 .. c0+8*NV) = (sum over pairs madd(D pair, x pair)) * dscale[k] * xs[t]; amax[t] = max_k |zf|
template <int NV, int R>
inline void zgemm_i16(const int8_t* D, int64_t K, int64_t B, const int32_t* xP, int64_t ldx, const float* dscale,
                      const float* xs, float* zf, int64_t ldz, float* amax) {
  const int64_t B2 = B / 2;  // full pairs; an odd B adds one tail step
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx[NV];
  __m256 xsv[NV];
  for (int v = 0; v < NV; ++v) {
    mx[v] = _mm256_loadu_ps(amax + 8 * v);
    xsv[v] = _mm256_loadu_ps(xs + 8 * v);
  }
  auto finish = [&](int64_t k, __m256i acc, int v) {
    __m256 z = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(dscale[k])), xsv[v]);
    _mm256_storeu_ps(zf + k * ldz + 8 * v, z);
    mx[v] = _mm256_max_ps(mx[v], _mm256_and_ps(z, absmask));
  };
  int64_t k = 0;
  for (; k + R <= K; k += R) {
    __m256i a[R][NV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_setzero_si256();
    const int8_t* d = D + k * B;
    auto step = [&](const __m256i* w, const int32_t* xr) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 8 * v));
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) a[r][v] = madd_acc(a[r][v], w[r], xv);
      }
    };
    for (int64_t i2 = 0; i2 < B2; ++i2) {
      __m256i w[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) w[r] = pair_bcast(d + r * B, i2);
      step(w, xP + i2 * ldx);
    }
    if (B & 1) {
      __m256i w[R];
      for (int r = 0; r < R; ++r) w[r] = tail_bcast(d + r * B, B);
      step(w, xP + B2 * ldx);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) finish(k + r, a[r][v], v);
  }
  for (; k < K; ++k) {
    __m256i a[NV];
    for (int v = 0; v < NV; ++v) a[v] = _mm256_setzero_si256();
    const int8_t* d = D + k * B;
    for (int64_t i2 = 0; i2 < (B + 1) / 2; ++i2) {
      const __m256i w = (2 * i2 + 1 < B) ? pair_bcast(d, i2) : tail_bcast(d, B);
      for (int v = 0; v < NV; ++v)
        a[v] = madd_acc(a[v], w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xP + i2 * ldx + 8 * v)));
    }
    for (int v = 0; v < NV; ++v) finish(k, a[v], v);
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(amax + 8 * v, mx[v]);
}

// zf (K x TC) float -> zq int16 with |zq| <= 32767 per token; zs[t] = amax[t] / 32767
inline void quantize_z(const float* zf, int64_t K, int64_t TC, const float* amax, int16_t* zq, float* zs) {
  alignas(64) float inv[64];
  for (int64_t t = 0; t < TC; ++t) {
    zs[t] = amax[t] > 0.f ? amax[t] / 32767.f : 0.f;
    inv[t] = amax[t] > 0.f ? 32767.f / amax[t] : 0.f;
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t t = 0; t < TC; t += 16) {
      __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(zf + k * TC + t), _mm256_load_ps(inv + t)));
      __m256i hi =
          _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(zf + k * TC + t + 8), _mm256_load_ps(inv + t + 8)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(zq + k * TC + t),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
    }
}

// yT (OG*8 x TC) += per (row o, block b): fp32(sum_j mulhrs(w, zq[idx])) * flush[o] * zs[t].
// w = v8 << shift[o, b] (int16, made by the packer) with sum_j |w| <= 32767 - S, so the int16
// sum of one (row, block) cannot overflow; flush[o] = vscale[o] * 2^(15 - shift[o, b]).
template <int NQ, typename IT>
inline void gather_q15(const int16_t* zq, const float* zs, const int16_t* w16, const float* flush, const IT* idx,
                       int64_t OG, int64_t S, float* yT) {
  constexpr int TC = NQ * 16;
  constexpr int RR = NQ >= 4 ? 2 : 4;
  for (int64_t og = 0; og < OG; ++og) {
    const int16_t* vg = w16 + og * S * 8;
    const IT* ig = idx + og * S * 8;
    for (int r = 0; r < 8; r += RR) {
      __m256i a[RR][NQ];
#pragma GCC unroll 8
      for (int q = 0; q < RR; ++q)
#pragma GCC unroll 8
        for (int v = 0; v < NQ; ++v) a[q][v] = _mm256_setzero_si256();
      for (int64_t j = 0; j < S; ++j) {
#pragma GCC unroll 8
        for (int q = 0; q < RR; ++q) {
          const int16_t* z = zq + static_cast<int64_t>(ig[j * 8 + r + q]) * TC;
          const __m256i w = _mm256_set1_epi16(vg[j * 8 + r + q]);
#pragma GCC unroll 8
          for (int v = 0; v < NQ; ++v)
            a[q][v] = _mm256_add_epi16(
                a[q][v], _mm256_mulhrs_epi16(w, _mm256_load_si256(reinterpret_cast<const __m256i*>(z + 16 * v))));
        }
      }
#pragma GCC unroll 8
      for (int q = 0; q < RR; ++q) {
        float* yr = yT + (og * 8 + r + q) * TC;
        const __m256 fq = _mm256_set1_ps(flush[og * 8 + r + q]);
#pragma GCC unroll 8
        for (int v = 0; v < NQ; ++v) {
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a[q][v])));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(a[q][v], 1)));
          float* yv = yr + 16 * v;
          _mm256_store_ps(yv, _mm256_fmadd_ps(lo, _mm256_mul_ps(fq, _mm256_load_ps(zs + 16 * v)), _mm256_load_ps(yv)));
          const __m256 f8 = _mm256_mul_ps(fq, _mm256_load_ps(zs + 16 * v + 8));
          _mm256_store_ps(yv + 8, _mm256_fmadd_ps(hi, f8, _mm256_load_ps(yv + 8)));
        }
      }
    }
  }
}

template <int NQ, typename IT>
void forward_chunks_i8(const Geo& g, const float* x, const int8_t* dict, const float* dscale, const int8_t* vals,
                       const float* vscale, const int16_t* w16, const float* flush, const IT* idx, const float* bias,
                       float* y) {
  constexpr int TC = NQ * 16;
  const int64_t nchunks = (g.T + TC - 1) / TC;
  const int64_t OUTP = g.OG * 8;
  const int64_t Bp = g.B + (g.B & 1);
  const int64_t B2 = Bp / 2;
  DS_PARALLEL_FOR(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    Buf<int16_t> xq(TC * g.nb * Bp), zq(g.K * TC);
    Buf<int32_t> xP(g.nb * B2 * TC);
    Buf<float> xs(TC), zf(g.K * TC), zs(TC), amax(TC), yT(OUTP * TC);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * TC, tn = std::min<int64_t>(TC, g.T - t0);
      quantize_x(g, Bp, x + t0 * g.in, tn, TC, xq.data(), xs.data());
      // (TC x nb*B2 words) -> (nb*B2 x TC words): token pairs of each atom-entry pair
      transpose_block(reinterpret_cast<const float*>(xq.data()), g.nb * B2, reinterpret_cast<float*>(xP.data()), TC,
                      TC, g.nb * B2);
      std::fill(yT.data(), yT.data() + OUTP * TC, 0.f);
      for (int64_t b = 0; b < g.nb; ++b) {
        const int8_t* D = dict + b * g.K * g.B;
        const int32_t* xb = xP.data() + b * B2 * TC;
        std::fill(amax.data(), amax.data() + TC, 0.f);
        if constexpr (NQ >= 2) {  // 32 tokens (4 vectors x 2 atoms) per micro-kernel call
          for (int v = 0; v < NQ * 2; v += 4)
            zgemm_i16<4, 2>(D, g.K, g.B, xb + 8 * v, TC, dscale + b * g.K, xs.data() + 8 * v, zf.data() + 8 * v, TC,
                            amax.data() + 8 * v);
        } else {
          zgemm_i16<2, 4>(D, g.K, g.B, xb, TC, dscale + b * g.K, xs.data(), zf.data(), TC, amax.data());
        }
        if (w16 != nullptr) {
          quantize_z(zf.data(), g.K, TC, amax.data(), zq.data(), zs.data());
          gather_q15<NQ, IT>(zq.data(), zs.data(), w16 + b * g.OG * g.S * 8, flush + b * g.OG * 8,
                             idx + b * g.OG * g.S * 8, g.OG, g.S, yT.data());
        } else {  // many nonzeros per row: fp32 gather of the int8 values (exact, slower)
          gather_f32<2 * NQ, int8_t, IT>(zf.data(), vals + b * g.OG * g.S * 8, idx + b * g.OG * g.S * 8, g.OG, g.S,
                                         yT.data());
        }
      }
      store_output(g, yT.data(), TC, bias, y, t0, tn, w16 != nullptr ? nullptr : vscale);
    }
  });
}
#endif  // __AVX2__

// ================================================================ few tokens (bandwidth-bound)

// z[t, r] for rows r of the stacked (nb*K, B) dictionary; 4 rows per pass share each x load.
template <typename DT>
inline void small_z(const Geo& g, const float* x, const DT* dict, const float* dscale, float* z, int64_t r0,
                    int64_t r1) {
  constexpr bool Q = std::is_same<DT, int8_t>::value;
  const int64_t nbK = g.nb * g.K, B8 = g.B & ~int64_t(7);
  for (int64_t t = 0; t < g.T; ++t) {
    int64_t r = r0;
    while (r < r1) {
      // rows of one block share x_b
      const int64_t b = r / g.K;
      const float* xr = x + t * g.in + b * g.B;
      const int64_t rend = std::min(r1, (b + 1) * g.K);
      for (; r + 4 <= rend; r += 4) {
        const DT* d = dict + r * g.B;
        v8f a0 = vbc(0.f), a1 = vbc(0.f), a2 = vbc(0.f), a3 = vbc(0.f);
        for (int64_t i = 0; i < B8; i += 8) {
          const v8f xv = vld(xr + i);
          a0 += load8f(d + i) * xv;
          a1 += load8f(d + g.B + i) * xv;
          a2 += load8f(d + 2 * g.B + i) * xv;
          a3 += load8f(d + 3 * g.B + i) * xv;
        }
        float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
        for (int q = 0; q < 4; ++q) {
          for (int64_t i = B8; i < g.B; ++i) s[q] += static_cast<float>(d[q * g.B + i]) * xr[i];
          z[t * nbK + r + q] = Q ? s[q] * dscale[r + q] : s[q];
        }
      }
      for (; r < rend; ++r) {
        const DT* d = dict + r * g.B;
        v8f a0 = vbc(0.f);
        for (int64_t i = 0; i < B8; i += 8) a0 += load8f(d + i) * vld(xr + i);
        float s = hsum(a0);
        for (int64_t i = B8; i < g.B; ++i) s += static_cast<float>(d[i]) * xr[i];
        z[t * nbK + r] = Q ? s * dscale[r] : s;
      }
    }
  }
}

template <typename DT, typename VT, typename IT>
void forward_small(const Geo& g, const float* x, const DT* dict, const float* dscale, const VT* vals,
                   const float* vscale, const IT* idx, const float* bias, float* y) {
  constexpr bool Q = std::is_same<DT, int8_t>::value;
  constexpr int TM = 4;  // tokens per pass of the gather
  const int64_t nbK = g.nb * g.K;
  Buf<float> z(g.T * nbK);
  // Threads only pay off above ~100 us of work: below, waking them costs more than it saves, and
  // on a shared machine a descheduled helper thread can stall the call for a whole time slice.
  const int64_t work = g.T * (g.in * g.K + 4 * g.out * g.nb * g.S);  // gathers cost ~4x a MAC
  const bool serial = work < (INT64_C(1) << 20);
  const int64_t zgrain = serial ? nbK : std::max<int64_t>(16, 65536 / std::max<int64_t>(1, g.B * g.T));
  DS_PARALLEL_FOR(0, nbK, zgrain, [&](int64_t r0, int64_t r1) { small_z<DT>(g, x, dict, dscale, z.data(), r0, r1); });
  const int64_t ggrain = serial ? g.OG : std::max<int64_t>(1, 8192 / std::max<int64_t>(1, 8 * g.nb * g.S * g.T));
  DS_PARALLEL_FOR(0, g.OG, ggrain, [&](int64_t o0, int64_t o1) {
    for (int64_t og = o0; og < o1; ++og) {
      for (int64_t tb = 0; tb < g.T; tb += TM) {
        const int64_t tm = std::min<int64_t>(TM, g.T - tb);
        v8f acc[TM];
        for (int t = 0; t < TM; ++t) acc[t] = vbc(0.f);
        for (int64_t b = 0; b < g.nb; ++b) {
          const VT* vg = vals + (b * g.OG + og) * g.S * 8;
          const IT* ig = idx + (b * g.OG + og) * g.S * 8;
          const float* zb = z.data() + tb * nbK + b * g.K;
          if (tm == 1) {
            v8f a1 = vbc(0.f);
            int64_t j = 0;
            for (; j + 2 <= g.S; j += 2) {
              acc[0] += load8f(vg + j * 8) * gather8(zb, ig + j * 8);
              a1 += load8f(vg + j * 8 + 8) * gather8(zb, ig + j * 8 + 8);
            }
            for (; j < g.S; ++j) acc[0] += load8f(vg + j * 8) * gather8(zb, ig + j * 8);
            acc[0] += a1;
          } else {
            for (int64_t j = 0; j < g.S; ++j) {
              const v8f vv = load8f(vg + j * 8);
              for (int64_t t = 0; t < tm; ++t) acc[t] += vv * gather8(zb + t * nbK, ig + j * 8);
            }
          }
        }
        const int64_t ol = std::min<int64_t>(8, g.out - og * 8);
        for (int64_t t = 0; t < tm; ++t) {
          float* yr = y + (tb + t) * g.out + og * 8;
          for (int64_t l = 0; l < ol; ++l)
            yr[l] = acc[t][l] * (Q ? vscale[og * 8 + l] : 1.f) + (bias ? bias[og * 8 + l] : 0.f);
        }
      }
    }
  });
}

// ================================================================ entry

// K*TC*(bytes per z entry) should stay well inside a 32 KB L1
template <typename IT>
void run_f32(const Geo& g, const float* x, const float* dict, const float* vals, const IT* idx, const float* bias,
             float* y, int64_t small_max) {
  if (g.T <= small_max) {
    forward_small<float, float, IT>(g, x, dict, nullptr, vals, nullptr, idx, bias, y);
    return;
  }
  const int64_t nt = std::max<int64_t>(1, DS_NUM_THREADS());
  const int64_t per = (g.T + nt - 1) / nt;
  // measured on Zen 3: 32 tokens beat 16 even when zT (K x 32 floats) is the whole 32 KB L1
  const int64_t cap = g.K <= 256 ? 32 : g.K <= 512 ? 16 : 8;
  const int64_t tc = std::min<int64_t>(cap, per <= 8 ? 8 : per <= 16 ? 16 : 32);
  if (tc == 8)
    forward_chunks_f32<1, IT>(g, x, dict, vals, idx, bias, y);
  else if (tc == 16)
    forward_chunks_f32<2, IT>(g, x, dict, vals, idx, bias, y);
  else
    forward_chunks_f32<4, IT>(g, x, dict, vals, idx, bias, y);
}

template <typename IT>
void run_i8(const Geo& g, const float* x, const int8_t* dict, const float* dscale, const int8_t* vals,
            const float* vscale, const int16_t* w16, const float* flush, const IT* idx, const float* bias, float* y,
            int64_t small_max) {
#if defined(__AVX2__)
  if (g.T > small_max) {
    const int64_t nt = std::max<int64_t>(1, DS_NUM_THREADS());
    const int64_t per = (g.T + nt - 1) / nt;
    // 32 tokens per chunk measured as fast as 64 (faster for out <= 768) and balances threads better
    const int64_t cap = g.K <= 512 ? 32 : 16;
    const int64_t tc = std::min<int64_t>(cap, per <= 16 ? 16 : 32);
    if (tc == 16)
      forward_chunks_i8<1, IT>(g, x, dict, dscale, vals, vscale, w16, flush, idx, bias, y);
    else
      forward_chunks_i8<2, IT>(g, x, dict, dscale, vals, vscale, w16, flush, idx, bias, y);
    return;
  }
#endif
  forward_small<int8_t, int8_t, IT>(g, x, dict, dscale, vals, vscale, idx, bias, y);
}

}  // namespace dskern
