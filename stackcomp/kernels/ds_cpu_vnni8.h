// The int8 DS layer with 8-bit activations on AVX-512 VBMI + VNNI CPUs (Ice Lake, Zen 4 and later).
//
// y[t, o] = sum_b sum_j v[b, o, j] * z[b, t, idx[b, o, j]] + bias[o],  z[b] = x_b @ D_b^T.
//
// Why a second int8 kernel: in ds_cpu_kernels.h the gather costs one multiply-add instruction
// per nonzero and 16 tokens, about a sixth of what a dense int8 GEMM gets per instruction, so
// the DS layer is no faster than torch's int8 dense layer. Here the gather runs at GEMM speed:
//
//   * x is quantized per token to uint8 (x / xs + 128); z[b] = x_b @ D_b^T by vpdpbusd
//     (4 x 16 MACs per instruction), minus 128 * rowsum(D) for the offset;
//   * z is quantized per token, over all blocks at once, to uint8 (z / zs + 128), so the integer
//     sums of different blocks share one scale; z[t, b, :] (K <= 256 bytes) is a table of 1, 2 or 4
//     registers;
//   * one vpermb / vpermi2b picks 64 table entries (16 output rows x 4 nonzeros each) and one
//     vpdpbusd multiplies them with the 64 int8 values and adds each row's 4 products into its
//     int32 lane: 64 gathered MACs in two instructions, no horizontal sums (a row's lane stays the
//     same over its nonzeros and the blocks);
//   * y[t, o] = (acc - 128 * sum(v[o])) * vscale[o] * zs[t] + bias[o].
//
// Operands (made once per layer by ds_cpu.py, vnni8_operands):
//   dpk   (nb, KV, B4, 16, 4) int8   dictionary, atom k = 16 kv + lane, entry i = 4 i4 + m (zero padded)
//   dcor  (nb, KV*16) int32          128 * sum_i D[b, k, i]
//   dsc   (nb, KV*16) float32        per-atom scale (0 on pad atoms)
//   vidx  (nb, L, OV, 16, 4) uint8   index of nonzero 4 q + m of row 16 ov + lane (pad: 0)
//   vval  (nb, L, OV, 16, 4) int8    its value (pad: 0)
//   vcor  (OV*16) int32              128 * sum_{b, j} v[b, o, j]
//   vsc   (OV*16) float32            per-row value scale
// Accuracy: like a dense int8 layer with per-token activation scales, quantizing twice (x and z).
#pragma once
#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define DS_HAVE_VNNI8 1
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dskern {

struct GeoV {
  int64_t T, in, out, nb, K, B, KV, B4, L, OV;
};

constexpr int V8_TT = 4;        // tokens per register tile (both phases)
constexpr int V8_CHUNK = 32;    // tokens per gather work item
constexpr int V8_SUPER = 256;   // tokens whose z tables are made before they are gathered

inline float hmax16(__m512 v) { return _mm512_reduce_max_ps(v); }

template <int R, int C>
inline void v8_zero(__m512i (&acc)[R][C]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
}

// rows t0 .. t0+tn of x -> xq (V8_TT x nb*B4*4 bytes, block-padded, 128 = zero), xs per token
inline void v8_quantize_x(const GeoV& g, const float* x, int64_t tn, uint8_t* xq, float* xs) {
  const int64_t row = g.nb * g.B4 * 4;
  std::memset(xq, 128, static_cast<size_t>(V8_TT * row));
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i off = _mm512_set1_epi32(128);
  for (int64_t t = 0; t < V8_TT; ++t) {
    xs[t] = 0.f;
    if (t >= tn) continue;
    const float* xr = x + t * g.in;
    __m512 m = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= g.in; i += 16) m = _mm512_max_ps(m, _mm512_and_ps(_mm512_loadu_ps(xr + i), absmask));
    if (i < g.in) {
      const __mmask16 k = static_cast<__mmask16>((1u << (g.in - i)) - 1);
      m = _mm512_max_ps(m, _mm512_and_ps(_mm512_maskz_loadu_ps(k, xr + i), absmask));
    }
    const float amax = hmax16(m);
    if (!(amax > 0.f)) continue;  // all zero: the row stays 128 (zero) and xs 0
    const float sc = amax / 127.f;
    xs[t] = sc;
    const __m512 inv = _mm512_set1_ps(127.f / amax);
    uint8_t* q = xq + t * row;
    for (int64_t b = 0; b < g.nb; ++b) {
      const float* xb = xr + b * g.B;
      uint8_t* qb = q + b * g.B4 * 4;
      for (int64_t k = 0; k < g.B; k += 16) {
        const __mmask16 msk = g.B - k >= 16 ? static_cast<__mmask16>(0xffff)
                                            : static_cast<__mmask16>((1u << (g.B - k)) - 1);
        __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(msk, xb + k), inv)), off);
        v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(1)), _mm512_set1_epi32(255));
        _mm512_mask_cvtepi32_storeu_epi8(qb + k, msk, v);
      }
    }
  }
}

// zf[t, k0 .. k0 + 16 KVN) of one block for V8_TT tokens, and their running |z| maxima
template <int KVN>
inline void v8_zgemm(const GeoV& g, const int8_t* dpk_b, const int32_t* dcor_b, const float* dsc_b, int64_t kv0,
                     const uint8_t* xq_b, int64_t ldx, const float* xs, float* zf, int64_t ldz, __m512* amax) {
  __m512i acc[V8_TT][KVN];
  v8_zero(acc);
  for (int64_t i4 = 0; i4 < g.B4; ++i4) {
    __m512i w[KVN];
#pragma GCC unroll 8
    for (int v = 0; v < KVN; ++v) w[v] = _mm512_loadu_si512(dpk_b + ((kv0 + v) * g.B4 + i4) * 64);
#pragma GCC unroll 8
    for (int t = 0; t < V8_TT; ++t) {
      int32_t quad;
      std::memcpy(&quad, xq_b + t * ldx + 4 * i4, 4);
      const __m512i xb = _mm512_set1_epi32(quad);
#pragma GCC unroll 8
      for (int v = 0; v < KVN; ++v) acc[t][v] = _mm512_dpbusd_epi32(acc[t][v], xb, w[v]);
    }
  }
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
#pragma GCC unroll 8
  for (int v = 0; v < KVN; ++v) {
    const int64_t k = (kv0 + v) * 16;
    const __m512i cor = _mm512_loadu_si512(dcor_b + k);
    const __m512 sc = _mm512_loadu_ps(dsc_b + k);
#pragma GCC unroll 8
    for (int t = 0; t < V8_TT; ++t) {
      const __m512 z = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t][v], cor)),
                                     _mm512_mul_ps(sc, _mm512_set1_ps(xs[t])));
      _mm512_storeu_ps(zf + t * ldz + k, z);
      amax[t] = _mm512_max_ps(amax[t], _mm512_and_ps(z, absmask));
    }
  }
}

// Phase A for tokens t0 .. t0+tn (tn <= V8_TT): z tables zt (V8_TT x nb x KT bytes) and scales zs.
template <int KT>
inline void v8_tables(const GeoV& g, const float* x, int64_t tn, const int8_t* dpk, const int32_t* dcor,
                      const float* dsc, uint8_t* xq, float* zf, uint8_t* zt, float* zs) {
  alignas(64) float xs[V8_TT];
  v8_quantize_x(g, x, tn, xq, xs);
  const int64_t ldx = g.nb * g.B4 * 4, Kp = g.KV * 16, ldz = g.nb * Kp;
  __m512 amax[V8_TT];
  for (int t = 0; t < V8_TT; ++t) amax[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < g.nb; ++b) {
    const int8_t* dpk_b = dpk + b * g.KV * g.B4 * 64;
    int64_t kv = 0;
    for (; kv + 4 <= g.KV; kv += 4)
      v8_zgemm<4>(g, dpk_b, dcor + b * Kp, dsc + b * Kp, kv, xq + b * g.B4 * 4, ldx, xs, zf + b * Kp, ldz, amax);
    for (; kv < g.KV; ++kv)
      v8_zgemm<1>(g, dpk_b, dcor + b * Kp, dsc + b * Kp, kv, xq + b * g.B4 * 4, ldx, xs, zf + b * Kp, ldz, amax);
  }
  const __m512i off = _mm512_set1_epi32(128);
  for (int64_t t = 0; t < V8_TT; ++t) {
    uint8_t* zr = zt + t * g.nb * KT;
    const float m = hmax16(amax[t]);
    if (t >= tn || !(m > 0.f)) {
      std::memset(zr, 128, static_cast<size_t>(g.nb * KT));
      zs[t] = 0.f;
      continue;
    }
    zs[t] = m / 127.f;
    const __m512 inv = _mm512_set1_ps(127.f / m);
    for (int64_t b = 0; b < g.nb; ++b) {
      uint8_t* zb = zr + b * KT;
      const float* f = zf + t * ldz + b * Kp;
      for (int64_t k = 0; k < Kp; k += 16) {
        __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(f + k), inv)), off);
        q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(255));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(zb + k), _mm512_cvtepi32_epi8(q));
      }
      if (Kp < KT) std::memset(zb + Kp, 128, static_cast<size_t>(KT - Kp));
    }
  }
}

// Phase B: y rows t0 .. t0+tn (tn <= V8_TT), output vectors ov0 .. ov0+VN, from the tables zt.
template <int KT, int VN>
inline void v8_gather(const GeoV& g, const uint8_t* zt, const float* zs, int64_t tn, const uint8_t* vidx,
                      const int8_t* vval, const int32_t* vcor, const float* vsc, const float* bias, int64_t ov0,
                      float* y) {
  constexpr int NT = KT / 64;
  __m512i acc[V8_TT][VN];
  v8_zero(acc);
  for (int64_t b = 0; b < g.nb; ++b) {
    __m512i tab[V8_TT][NT];
#pragma GCC unroll 8
    for (int t = 0; t < V8_TT; ++t)
#pragma GCC unroll 4
      for (int n = 0; n < NT; ++n) tab[t][n] = _mm512_loadu_si512(zt + (t * g.nb + b) * KT + 64 * n);
    for (int64_t q = 0; q < g.L; ++q) {
      const int64_t base = ((b * g.L + q) * g.OV + ov0) * 64;
      __m512i iv[VN], wv[VN];
      __mmask64 hi[VN];
#pragma GCC unroll 8
      for (int v = 0; v < VN; ++v) {
        iv[v] = _mm512_loadu_si512(vidx + base + 64 * v);
        wv[v] = _mm512_loadu_si512(vval + base + 64 * v);
        hi[v] = KT == 256 ? _mm512_movepi8_mask(iv[v]) : 0;
      }
#pragma GCC unroll 8
      for (int t = 0; t < V8_TT; ++t)
#pragma GCC unroll 8
        for (int v = 0; v < VN; ++v) {
          __m512i z;
          if constexpr (NT == 1) {
            z = _mm512_permutexvar_epi8(iv[v], tab[t][0]);
          } else if constexpr (NT == 2) {
            z = _mm512_permutex2var_epi8(tab[t][0], iv[v], tab[t][1]);
          } else {
            const __m512i lo = _mm512_permutex2var_epi8(tab[t][0], iv[v], tab[t][1]);
            const __m512i up = _mm512_permutex2var_epi8(tab[t][2], iv[v], tab[t][3]);
            z = _mm512_mask_blend_epi8(hi[v], lo, up);
          }
          acc[t][v] = _mm512_dpbusd_epi32(acc[t][v], z, wv[v]);
        }
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < VN; ++v) {
    const int64_t o = (ov0 + v) * 16;
    const int64_t left = g.out - o;
    if (left <= 0) continue;
    const __mmask16 k = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    const __m512i cor = _mm512_loadu_si512(vcor + o);
    const __m512 sc = _mm512_loadu_ps(vsc + o);
    const __m512 bo = bias != nullptr ? _mm512_maskz_loadu_ps(k, bias + o) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int t = 0; t < V8_TT; ++t) {  // compile-time t keeps acc in registers
      if (t >= tn) break;
      const __m512 f = _mm512_mul_ps(sc, _mm512_set1_ps(zs[t]));
      const __m512 r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t][v], cor)), f, bo);
      _mm512_mask_storeu_ps(y + t * g.out + o, k, r);
    }
  }
}

template <int KT>
void v8_forward(const GeoV& g, const float* x, const int8_t* dpk, const int32_t* dcor, const float* dsc,
                const uint8_t* vidx, const int8_t* vval, const int32_t* vcor, const float* vsc, const float* bias,
                float* y) {
  constexpr int VN = KT == 256 ? 2 : KT == 128 ? 3 : 4;  // keeps acc + tables + operands in 32 registers
  const int64_t tiles_per_chunk = V8_CHUNK / V8_TT;
  for (int64_t s0 = 0; s0 < g.T; s0 += V8_SUPER) {
    const int64_t sn = std::min<int64_t>(V8_SUPER, g.T - s0);
    const int64_t ntiles = (sn + V8_TT - 1) / V8_TT;
    Buf<uint8_t> zt(ntiles * V8_TT * g.nb * KT);
    Buf<float> zs(ntiles * V8_TT);
    // phase A: tables, one token tile per work item
    DS_PARALLEL_FOR(0, ntiles, 1, [&](int64_t a0, int64_t a1) {
      Buf<uint8_t> xq(V8_TT * g.nb * g.B4 * 4);
      Buf<float> zf(V8_TT * g.nb * g.KV * 16);
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t t0 = s0 + a * V8_TT;
        v8_tables<KT>(g, x + t0 * g.in, std::min<int64_t>(V8_TT, g.T - t0), dpk, dcor, dsc, xq.data(), zf.data(),
                      zt.data() + a * V8_TT * g.nb * KT, zs.data() + a * V8_TT);
      }
    });
    // phase B: (output-vector group, token chunk) work items; a group's operands stay in L1 over its tokens
    const int64_t ngroups = (g.OV + VN - 1) / VN;
    const int64_t nchunks = (ntiles + tiles_per_chunk - 1) / tiles_per_chunk;
    DS_PARALLEL_FOR(0, ngroups * nchunks, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t grp = w / nchunks, ch = w % nchunks;
        const int64_t ov0 = grp * VN;
        const int64_t a_end = std::min<int64_t>(ntiles, (ch + 1) * tiles_per_chunk);
        for (int64_t a = ch * tiles_per_chunk; a < a_end; ++a) {
          const int64_t t0 = s0 + a * V8_TT, tn = std::min<int64_t>(V8_TT, g.T - t0);
          const uint8_t* ztile = zt.data() + a * V8_TT * g.nb * KT;
          const float* zst = zs.data() + a * V8_TT;
          float* yt = y + t0 * g.out;
          if (ov0 + VN <= g.OV)
            v8_gather<KT, VN>(g, ztile, zst, tn, vidx, vval, vcor, vsc, bias, ov0, yt);
          else
            for (int64_t ov = ov0; ov < g.OV; ++ov)
              v8_gather<KT, 1>(g, ztile, zst, tn, vidx, vval, vcor, vsc, bias, ov, yt);
        }
      }
    });
  }
}

inline void run_vnni8(const GeoV& g, const float* x, const int8_t* dpk, const int32_t* dcor, const float* dsc,
                      const uint8_t* vidx, const int8_t* vval, const int32_t* vcor, const float* vsc,
                      const float* bias, float* y) {
  if (g.K <= 64)
    v8_forward<64>(g, x, dpk, dcor, dsc, vidx, vval, vcor, vsc, bias, y);
  else if (g.K <= 128)
    v8_forward<128>(g, x, dpk, dcor, dsc, vidx, vval, vcor, vsc, bias, y);
  else
    v8_forward<256>(g, x, dpk, dcor, dsc, vidx, vval, vcor, vsc, bias, y);
}

}  // namespace dskern
#endif
