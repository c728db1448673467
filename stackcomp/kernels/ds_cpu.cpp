// Torch binding of the packed DS CPU kernels (ds_cpu_kernels.h); built by ds_cpu.py.
#include <torch/extension.h>

#include "ds_cpu_kernels.h"
#include "ds_cpu_vnni8.h"
#include "ds_cpu_ffn.h"
#include "ds_cpu_norm.h"
#include "ds_cpu_attention.h"
#include "ds_cpu_embedding.h"

using namespace dskern;

// the optional bias as a contiguous float32 (out) tensor, or an undefined tensor
static torch::Tensor checked_bias(const c10::optional<torch::Tensor>& bias, int64_t out) {
  if (!bias.has_value() || !bias->defined()) return torch::Tensor();
  torch::Tensor bt = bias->contiguous();
  TORCH_CHECK(bt.scalar_type() == at::kFloat && bt.numel() == out, "bias: float32 (out)");
  return bt;
}


// int8 layers also take w16 (nb, OG, S, 8) int16 and flush (nb, OG*8) float32 (see gather_q15;
// made once per layer by ds_cpu.py); empty tensors mean: gather in fp32 (exact, slower).
torch::Tensor ds_forward(torch::Tensor x, torch::Tensor dict, torch::Tensor dscale, torch::Tensor vals,
                         torch::Tensor vscale, torch::Tensor w16, torch::Tensor flush, torch::Tensor idx,
                         c10::optional<torch::Tensor> bias, int64_t out, int64_t small_max) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (T, in)");
  for (const auto* t : {&x, &dict, &dscale, &vals, &vscale, &w16, &flush, &idx})
    TORCH_CHECK(!t->defined() || t->device().is_cpu(), "the DS CPU kernel takes CPU tensors");
  TORCH_CHECK(dict.dim() == 3 && dict.is_contiguous(), "dict: contiguous (nb, K, B)");
  TORCH_CHECK(vals.dim() == 4 && vals.size(3) == 8 && vals.is_contiguous(), "vals: contiguous (nb, OG, S, 8)");
  TORCH_CHECK(idx.sizes() == vals.sizes() && idx.is_contiguous(), "idx: same shape as vals");
  Geo g;
  g.T = x.size(0);
  g.in = x.size(1);
  g.nb = dict.size(0);
  g.K = dict.size(1);
  g.B = dict.size(2);
  g.OG = vals.size(1);
  g.S = vals.size(2);
  g.out = out;
  TORCH_CHECK(g.nb * g.B == g.in, "x has ", g.in, " features, the layer ", g.nb * g.B);
  TORCH_CHECK(vals.size(0) == g.nb && g.OG * 8 >= out && (g.OG - 1) * 8 < out, "vals shape does not match out");
  const bool q = dict.scalar_type() == at::kChar;
  TORCH_CHECK(q ? vals.scalar_type() == at::kChar
                : (dict.scalar_type() == at::kFloat && vals.scalar_type() == at::kFloat),
              "dict and vals: both float32 or both int8");
  if (q) {
    TORCH_CHECK(dscale.scalar_type() == at::kFloat && dscale.numel() == g.nb * g.K && dscale.is_contiguous(),
                "dscale: float32 (nb*K)");
    TORCH_CHECK(vscale.scalar_type() == at::kFloat && vscale.numel() == g.OG * 8 && vscale.is_contiguous(),
                "vscale: float32 (OG*8)");
    if (w16.numel() > 0) {
      TORCH_CHECK(w16.scalar_type() == at::kShort && w16.sizes() == vals.sizes() && w16.is_contiguous(),
                  "w16: int16, same shape as vals");
      TORCH_CHECK(flush.scalar_type() == at::kFloat && flush.numel() == g.nb * g.OG * 8 && flush.is_contiguous(),
                  "flush: float32 (nb*OG*8)");
    }
  }
  const torch::Tensor bt = checked_bias(bias, out);
  const float* bp = bt.defined() ? bt.data_ptr<float>() : nullptr;
  auto y = torch::empty({g.T, out}, x.options());
  if (g.T == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* dsp = q ? dscale.data_ptr<float>() : nullptr;
  const float* vsp = q ? vscale.data_ptr<float>() : nullptr;
  auto go = [&](auto* ip) {
    using IT = std::remove_const_t<std::remove_pointer_t<decltype(ip)>>;
    if (q)
      run_i8<IT>(g, xp, dict.data_ptr<int8_t>(), dsp, vals.data_ptr<int8_t>(), vsp,
                 w16.numel() > 0 ? w16.data_ptr<int16_t>() : nullptr,
                 w16.numel() > 0 ? flush.data_ptr<float>() : nullptr, ip, bp, yp, small_max);
    else
      run_f32<IT>(g, xp, dict.data_ptr<float>(), vals.data_ptr<float>(), ip, bp, yp, small_max);
  };
  if (idx.scalar_type() == at::kByte)
    go(idx.data_ptr<uint8_t>());
  else if (idx.scalar_type() == at::kShort)
    go(idx.data_ptr<int16_t>());
  else
    TORCH_CHECK(false, "idx: uint8 or int16");
  return y;
}

// The 8-bit-activation int8 kernel (ds_cpu_vnni8.h); operands from ds_cpu.vnni8_operands.
torch::Tensor ds_forward_vnni8(torch::Tensor x, torch::Tensor dpk, torch::Tensor dcor, torch::Tensor dsc,
                               torch::Tensor vidx, torch::Tensor vval, torch::Tensor vcor, torch::Tensor vsc,
                               c10::optional<torch::Tensor> bias, int64_t out, int64_t K, int64_t B) {
#if defined(DS_HAVE_VNNI8)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (T, in)");
  TORCH_CHECK(dpk.dim() == 5 && dpk.scalar_type() == at::kChar && dpk.is_contiguous() && dpk.size(3) == 16 &&
                  dpk.size(4) == 4, "dpk: contiguous int8 (nb, KV, B4, 16, 4)");
  TORCH_CHECK(vidx.dim() == 5 && vidx.scalar_type() == at::kByte && vidx.is_contiguous() && vidx.size(3) == 16 &&
                  vidx.size(4) == 4, "vidx: contiguous uint8 (nb, L, OV, 16, 4)");
  TORCH_CHECK(vval.sizes() == vidx.sizes() && vval.scalar_type() == at::kChar && vval.is_contiguous(),
              "vval: int8, same shape as vidx");
  GeoV g;
  g.T = x.size(0);
  g.in = x.size(1);
  g.out = out;
  g.nb = dpk.size(0);
  g.KV = dpk.size(1);
  g.B4 = dpk.size(2);
  g.K = K;
  g.B = B;
  g.L = vidx.size(1);
  g.OV = vidx.size(2);
  TORCH_CHECK(g.nb * g.B == g.in, "x has ", g.in, " features, the layer ", g.nb * g.B);
  TORCH_CHECK(K >= 1 && K <= 256 && g.KV * 16 >= K && g.B4 * 4 >= B && vidx.size(0) == g.nb &&
                  g.OV * 16 >= out, "vnni8 operands do not match the layer");
  TORCH_CHECK(dcor.scalar_type() == at::kInt && dcor.numel() == g.nb * g.KV * 16 && dsc.scalar_type() == at::kFloat &&
                  dsc.numel() == g.nb * g.KV * 16, "dcor/dsc: int32/float32 (nb, KV*16)");
  TORCH_CHECK(vcor.scalar_type() == at::kInt && vcor.numel() == g.OV * 16 && vsc.scalar_type() == at::kFloat &&
                  vsc.numel() == g.OV * 16, "vcor/vsc: int32/float32 (OV*16)");
  const torch::Tensor bt = checked_bias(bias, out);
  const float* bp = bt.defined() ? bt.data_ptr<float>() : nullptr;
  auto y = torch::empty({g.T, out}, x.options());
  if (g.T == 0) return y;
  run_vnni8(g, x.data_ptr<float>(), dpk.data_ptr<int8_t>(), dcor.data_ptr<int32_t>(), dsc.data_ptr<float>(),
            vidx.data_ptr<uint8_t>(), vval.data_ptr<int8_t>(), vcor.data_ptr<int32_t>(), vsc.data_ptr<float>(), bp,
            y.data_ptr<float>());
  return y;
#else
  TORCH_CHECK(false, "this build has no vnni8 kernel (needs AVX-512 VBMI and VNNI)");
#endif
}

// The fused int8 FFN y = W2 act(W1 x + b1) + b2 (ds_cpu_ffn.h); operands from ds_cpu.ffn_operands.
torch::Tensor ffn_forward(torch::Tensor x, torch::Tensor w1p, torch::Tensor cor1, torch::Tensor ws1, torch::Tensor b1,
                          torch::Tensor w2p, torch::Tensor cor2, torch::Tensor ws2, torch::Tensor b2, int64_t hidden,
                          int64_t out, int64_t act, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: contiguous float32 CPU (T, in)");
  for (const auto* w : {&w1p, &w2p})
    TORCH_CHECK(w->dim() == 4 && w->scalar_type() == at::kChar && w->is_contiguous() && w->size(2) == 16 &&
                    w->size(3) == 4 && w->device().is_cpu(), "w1p/w2p: contiguous int8 (N16, K4, 16, 4)");
  FfnGeo g;
  g.T = x.size(0);
  g.in = x.size(1);
  g.hid = hidden;
  g.out = out;
  g.N16a = w1p.size(0);
  g.K4a = w1p.size(1);
  g.N16b = w2p.size(0);
  g.K4b = w2p.size(1);
  // K may be zero padded up to a multiple of 64 (ffn_operands(multiple=64), the AMX path's layout)
  TORCH_CHECK(g.K4a * 4 >= g.in && g.K4a * 4 - g.in < 64, "x has ", g.in, " features, w1p takes ", g.K4a * 4);
  TORCH_CHECK(hidden >= 1 && g.N16a * 16 >= hidden && g.N16a * 16 - hidden < 64 && g.K4b == 4 * g.N16a,
              "w1p/w2p do not match the intermediate size ", hidden);
  TORCH_CHECK(out >= 1 && g.N16b * 16 >= out && (g.N16b - 1) * 16 < out, "w2p does not match out ", out);
  TORCH_CHECK(act == FFN_GELU_ERF || act == FFN_GELU_TANH, "act: 0 (gelu erf) or 1 (gelu tanh)");
  TORCH_CHECK(path == FFN_PATH_BEST || path == FFN_PATH_VNNI || path == FFN_PATH_GENERIC,
              "path: 0 (best), 1 (VNNI, no AMX) or 2 (portable)");
  const int64_t na = g.N16a * 16, nb = g.N16b * 16;
  TORCH_CHECK(cor1.scalar_type() == at::kInt && cor1.numel() == na && cor1.is_contiguous() &&
                  cor2.scalar_type() == at::kInt && cor2.numel() == nb && cor2.is_contiguous(),
              "cor1/cor2: int32 (N16*16)");
  for (const auto* t : {&ws1, &b1})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == na && t->is_contiguous(), "ws1/b1: float32 (N16a*16)");
  for (const auto* t : {&ws2, &b2})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == nb && t->is_contiguous(), "ws2/b2: float32 (N16b*16)");
  auto y = torch::empty({g.T, out}, x.options());
  if (g.T == 0) return y;
  FfnOps o{w1p.data_ptr<int8_t>(), w2p.data_ptr<int8_t>(), cor1.data_ptr<int32_t>(), cor2.data_ptr<int32_t>(),
           ws1.data_ptr<float>(), ws2.data_ptr<float>(), b1.data_ptr<float>(), b2.data_ptr<float>(),
           static_cast<int>(act)};
  run_ffn(g, o, x.data_ptr<float>(), y.data_ptr<float>(), static_cast<int>(path));
  return y;
}

// One int8 linear y = x W^T + b, x quantized per row to 8 bits (the fused FFN's second GEMM alone,
// ds_cpu_ffn.h run_linear); operands from stackcomp.kernels.ffn.linear_operands.
torch::Tensor linear_forward(torch::Tensor x, torch::Tensor wp, torch::Tensor cor, torch::Tensor ws, torch::Tensor b,
                             int64_t out, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: contiguous float32 CPU (T, in)");
  TORCH_CHECK(wp.dim() == 4 && wp.scalar_type() == at::kChar && wp.is_contiguous() && wp.size(2) == 16 &&
                  wp.size(3) == 4 && wp.device().is_cpu(), "wp: contiguous int8 (N16, K4, 16, 4)");
  FfnGeo g{};
  g.T = x.size(0);
  g.in = x.size(1);
  g.out = out;
  g.K4b = wp.size(1);
  g.N16b = wp.size(0);
  TORCH_CHECK(g.K4b * 4 >= g.in && g.K4b * 4 - g.in < 64, "x has ", g.in, " features, wp takes ", g.K4b * 4);
  TORCH_CHECK(out >= 1 && g.N16b * 16 >= out && (g.N16b - 1) * 16 < out, "wp does not match out ", out);
  TORCH_CHECK(path == FFN_PATH_BEST || path == FFN_PATH_VNNI || path == FFN_PATH_GENERIC,
              "path: 0 (best), 1 (VNNI, no AMX) or 2 (portable)");
  const int64_t nb = g.N16b * 16;
  TORCH_CHECK(cor.scalar_type() == at::kInt && cor.numel() == nb && cor.is_contiguous(), "cor: int32 (N16*16)");
  for (const auto* t : {&ws, &b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == nb && t->is_contiguous(), "ws/b: float32 (N16*16)");
  auto y = torch::empty({g.T, out}, x.options());
  if (g.T == 0) return y;
  FfnOps o{nullptr, wp.data_ptr<int8_t>(), nullptr, cor.data_ptr<int32_t>(), nullptr, ws.data_ptr<float>(),
           nullptr, b.data_ptr<float>(), FFN_GELU_ERF};
  run_linear(g, o, x.data_ptr<float>(), y.data_ptr<float>(), static_cast<int>(path));
  return y;
}

// LayerNorm(h + res) * gamma + beta over the last dimension, one pass per row (ds_cpu_norm.h)
torch::Tensor add_layernorm(torch::Tensor h, torch::Tensor res, torch::Tensor gamma, torch::Tensor beta, double eps) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && res.scalar_type() == at::kFloat && h.device().is_cpu() &&
                  res.device().is_cpu(), "h, res: float32 CPU tensors");
  TORCH_CHECK(h.sizes() == res.sizes() && h.dim() >= 1, "h and res must have one shape, got ", h.sizes(), " and ",
              res.sizes());
  const int64_t n = h.size(-1);
  for (const auto* t : {&gamma, &beta})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->numel() == n && t->device().is_cpu(),
                "gamma, beta: float32 (", n, ")");
  TORCH_CHECK(eps >= 0, "eps must be >= 0");
  const auto hc = h.contiguous(), rc = res.contiguous(), gc = gamma.contiguous(), bc = beta.contiguous();
  auto out = torch::empty_like(hc);
  if (n == 0 || hc.numel() == 0) return out;
  add_layernorm_rows(hc.data_ptr<float>(), rc.data_ptr<float>(), gc.data_ptr<float>(), bc.data_ptr<float>(),
                     static_cast<float>(eps), hc.numel() / n, n, out.data_ptr<float>());
  return out;
}

// softmax(scale Q K^T) V per packed sequence and head (ds_cpu_attention.h); q, k, v: (tokens, heads, head_dim)
// views with a contiguous head dim; cu_seqlens: int64 (batch + 1) sequence starts
torch::Tensor varlen_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cu_seqlens,
                               double scale, bool force_generic) {
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() == 3 && t->stride(2) == 1,
                "q, k, v: float32 CPU (tokens, heads, head_dim) with a contiguous head dim");
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v must have one shape, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 &&
                  cu_seqlens.device().is_cpu(), "cu_seqlens: int64 CPU (batch + 1)");
  const auto cu = cu_seqlens.contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), B = cu.numel() - 1;
  TORCH_CHECK(c[0] == 0 && c[B] == T, "cu_seqlens must start at 0 and end at the token count ", T);
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(c[b + 1] >= c[b], "cu_seqlens must not decrease");
  auto out = torch::empty({T, H, d}, q.options());
  if (T == 0 || H == 0 || d == 0) return out;
  auto view = [](const torch::Tensor& t) { return dskern::AttnView{t.data_ptr<float>(), t.stride(0), t.stride(1)}; };
  dskern::varlen_attention_run(view(q), view(k), view(v), c, B, H, d, static_cast<float>(scale),
                               out.data_ptr<float>(), force_generic);
  return out;
}

// rows of a 4-bit table (Int4Embedding's layout, ds_cpu_embedding.h) for ids of any shape: ids.shape + (width,)
torch::Tensor int4_embedding(torch::Tensor weight, torch::Tensor scale, torch::Tensor offset, torch::Tensor ids,
                             int64_t width) {
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.device().is_cpu(),
              "weight: uint8 CPU (num, ceil(width / 2))");
  TORCH_CHECK(width >= 1 && weight.size(1) == (width + 1) / 2, "weight has ", weight.size(1), " bytes a row, width ",
              width, " needs ", (width + 1) / 2);
  for (const auto* t : {&scale, &offset})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == 2 && t->size(0) == weight.size(0) && t->device().is_cpu(),
                "scale, offset: float16 CPU (num, groups)");
  TORCH_CHECK(scale.sizes() == offset.sizes() && width % scale.size(1) == 0, "scale and offset must share a shape "
              "whose groups divide the width ", width);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.device().is_cpu(), "ids: int64 CPU");
  const auto w = weight.contiguous(), sc = scale.contiguous(), of = offset.contiguous(), ic = ids.contiguous();
  const int64_t n = ic.numel(), num = w.size(0);
  const int64_t* p = ic.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(p[t] >= 0 && p[t] < num, "index ", p[t], " is out of range for a table of ", num, " rows");
  auto sizes = ic.sizes().vec();
  sizes.push_back(width);
  auto out = torch::empty(sizes, weight.options().dtype(at::kFloat));
  if (n == 0) return out;
  dskern::int4_embedding_rows(w.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(), of.data_ptr<at::Half>(), p, n, width,
                              sc.size(1), out.data_ptr<float>());
  return out;
}


// One post-norm encoder block (BERT's layout) in one call, for inference on packed tokens:
//   y = LN1(Wo attn(Wqkv h) + bo + h),  out = LN2(FFN(y) + y)
// with the int8 kernels above (linear_forward, varlen_attention, add_layernorm, ffn_forward). Python builds it
// once per block from the block's fused layers (stackcomp/nn/native_blocks.py) and checks it against the
// block's own modules; per call it saves the module glue (a dozen Python calls and their checks) that
// dominates a single sentence's time.
namespace {  // the types behind the EncoderBlock binding

struct Int8Route {  // one int8 GEMM's operands for short calls and for long ones (the AMX layout)
  std::vector<torch::Tensor> small, large;  // wp, cor, ws, b (linear) or w1p .. b2 (FFN)
  int64_t small_path = 0, large_path = 0;
  const std::vector<torch::Tensor>& pick(int64_t T, int64_t large_from, int64_t* path) const {
    const bool big = T >= large_from;
    *path = big ? large_path : small_path;
    return big ? large : small;
  }
};

// The module tensors a native object's operands were made from, with where they were and their in-place
// update counts then: fresh() is false once one moved or changed (Python then builds the object again)
struct TensorSources {
  std::vector<torch::Tensor> tensors;
  std::vector<int64_t> versions;
  std::vector<const void*> places;

  static int64_t version_of(const torch::Tensor& t) { return t.is_inference() ? -1 : t._version(); }

  void remember(std::vector<torch::Tensor> ts) {
    tensors = std::move(ts);
    versions.clear();
    places.clear();
    for (const auto& t : tensors) {
      versions.push_back(version_of(t));
      places.push_back(t.data_ptr());
    }
  }

  bool fresh() const {
    for (size_t i = 0; i < tensors.size(); ++i)
      if (tensors[i].data_ptr() != places[i] || version_of(tensors[i]) != versions[i]) return false;
    return true;
  }
};

struct EncoderBlock {
  Int8Route qkv, attn_out, ffn;
  TensorSources sources;  // the block's int8 buffers and norm parameters
  torch::Tensor ln1_gamma, ln1_beta, ln2_gamma, ln2_beta;
  int64_t q_features = 0, k_features = 0, heads = 0, head_dim = 0, ffn_hidden = 0, act = 0, large_from = 0;
  int64_t qkv_out = 0, attn_out_features = 0, ffn_out = 0;
  bool torch_norms = false;  // the block's module adds, then calls torch's LayerNorm (DistilBERT): the same here
  double scale = 1.0, eps1 = 1e-12, eps2 = 1e-12;

  bool fresh() const { return sources.fresh(); }

  // h: (tokens, hidden) float32; cu_seqlens: int64 (sequences + 1) starts of the packed sequences
  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& cu_seqlens) const {
    TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous() && h.device().is_cpu(),
                "EncoderBlock: h must be contiguous float32 CPU (tokens, hidden)");
    const int64_t T = h.size(0);
    int64_t path = 0;
    const auto& a = qkv.pick(T, large_from, &path);
    auto y = linear_forward(h, a[0], a[1], a[2], a[3], qkv_out, path);  // (T, q + k + v)
    const int64_t v_features = qkv_out - q_features - k_features;
    auto q = y.narrow(1, 0, q_features).view({T, heads, head_dim});
    auto k = y.narrow(1, q_features, k_features).view({T, heads, head_dim});
    auto v = y.narrow(1, q_features + k_features, v_features).view({T, heads, head_dim});
    auto ctx = varlen_attention(q, k, v, cu_seqlens, scale, false).view({T, q_features});
    const auto& o = attn_out.pick(T, large_from, &path);
    auto attn = linear_forward(ctx, o[0], o[1], o[2], o[3], attn_out_features, path);
    auto mid = norm(attn, h, ln1_gamma, ln1_beta, eps1);
    const auto& f = ffn.pick(T, large_from, &path);
    auto ff = ffn_forward(mid, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], ffn_hidden, ffn_out, act, path);
    return norm(ff, mid, ln2_gamma, ln2_beta, eps2);
  }

  torch::Tensor norm(torch::Tensor& y, const torch::Tensor& res, const torch::Tensor& gamma, const torch::Tensor& beta,
                     double eps) const {
    if (!torch_norms) return add_layernorm(y, res, gamma, beta, eps);  // FusedResidualNorm's kernel
    return at::layer_norm(y.add_(res), {y.size(1)}, gamma, beta, eps);
  }
};

// One embedding table: Int4Embedding's 4-bit layout (uint8 codes, float16 scale and offset per group) or
// float32 rows, behind an optional vocabulary remap (a pruned vocabulary's id -> kept row)
struct EmbeddingTable {
  torch::Tensor weight, scale, offset, remap;  // scale, offset: int4 only; remap: undefined for none
  int64_t width = 0;
  bool int4 = false;

  torch::Tensor rows(const torch::Tensor& ids) const {
    const auto r = remap.defined() ? remap.index_select(0, ids).to(at::kLong) : ids;
    return int4 ? int4_embedding(weight, scale, offset, r, width) : weight.index_select(0, r);
  }
};

// A BERT-layout encoder without its head, on packed tokens: LN(word + token type + position), then the blocks.
// Built once by stackcomp/nn/native_blocks.py from the model's own modules (the blocks are EncoderBlocks).
struct EncoderModel {
  EmbeddingTable word, position, token_type;
  torch::Tensor ln_gamma, ln_beta;
  double eps = 1e-12;
  std::vector<EncoderBlock> blocks;
  TensorSources sources;  // the embedding tables and norm

  bool fresh() const {
    if (!sources.fresh()) return false;
    for (const auto& b : blocks)
      if (!b.fresh()) return false;
    return true;
  }

  // ids, token_types, positions: int64 (tokens); cu_seqlens: int64 (sequences + 1) -> (tokens, hidden)
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& token_types, const torch::Tensor& positions,
                        const torch::Tensor& cu_seqlens) const {
    for (const auto* t : {&ids, &token_types, &positions})
      TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->device().is_cpu() && t->size(0) == ids.size(0),
                  "EncoderModel: ids, token types and positions must be int64 CPU (tokens)");
    // BertEmbeddings' own ops in its order (word + token type, + position, torch's LayerNorm): the same floats
    // as the module path, so the int8 layers after it round every value the same way
    auto e = word.rows(ids);
    e.add_(token_type.rows(token_types));
    e.add_(position.rows(positions));
    auto h = at::layer_norm(e, {e.size(1)}, ln_gamma, ln_beta, eps);
    for (const auto& b : blocks) h = b.forward(h, cu_seqlens);
    return h;
  }
};

static EmbeddingTable embedding_table(const std::vector<torch::Tensor>& t, int64_t width, bool int4, const char* who) {
  TORCH_CHECK(t.size() == 4, "EncoderModel: the ", who, " table is weight, scale, offset, remap (empty for none)");
  EmbeddingTable e;
  e.weight = t[0];
  e.width = width;
  e.int4 = int4;
  if (int4) {
    e.scale = t[1];
    e.offset = t[2];
  } else {
    TORCH_CHECK(t[0].dim() == 2 && t[0].scalar_type() == at::kFloat && t[0].size(1) == width,
                "EncoderModel: the ", who, " table must be float32 (rows, ", width, ") or 4-bit");
  }
  if (t[3].numel()) e.remap = t[3];
  return e;
}

static Int8Route int8_route(std::vector<torch::Tensor> small, std::vector<torch::Tensor> large, int64_t small_path,
                            int64_t large_path, size_t n, const char* who) {
  TORCH_CHECK(small.size() == n && large.size() == n, "EncoderBlock: ", who, " takes ", n,
              " operand tensors for short and for long calls");
  Int8Route r;
  r.small = std::move(small);
  r.large = std::move(large);
  r.small_path = small_path;
  r.large_path = large_path;
  return r;
}

}  // namespace

bool has_vnni8() {
#if defined(DS_HAVE_VNNI8)
  return true;
#else
  return false;
#endif
}

std::string build_info() {
  std::string s;
#if defined(__AVX512F__)
  s += "avx512f ";
#endif
#if defined(DS_HAVE_VNNI8)
  s += "vbmi+vnni ";
#endif
#if defined(__AVX2__)
  s += "avx2 ";
#endif
#if defined(__FMA__)
  s += "fma ";
#endif
#if defined(_OPENMP)
  s += "openmp ";
#endif
  return s.empty() ? "generic" : s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ds_forward", &ds_forward, "packed DS linear forward (CPU)");
  m.def("ds_forward_vnni8", &ds_forward_vnni8, "packed DS linear forward, int8 with 8-bit activations (CPU)");
  m.def("has_vnni8", &has_vnni8, "whether ds_forward_vnni8 was compiled in");
  m.def("ffn_forward", &ffn_forward, "fused int8 FFN W2 act(W1 x + b1) + b2 (CPU)");
  m.def("ffn_has_vnni", &ffn_has_vnni, "whether ffn_forward has its AVX-512 VNNI path (else the portable one)");
  m.def("ffn_has_amx", &ffn_has_amx, "whether ffn_forward can run its AMX path here (compiled in, CPU, OS permission)");
  m.def("linear_forward", &linear_forward, "int8 linear, x quantized per row to 8 bits (CPU)");
  m.def("add_layernorm", &add_layernorm, "LayerNorm(h + res) * gamma + beta, one pass per row (CPU)");
  m.def("varlen_attention", &varlen_attention, "attention over packed variable-length sequences (CPU)");
  m.def("int4_embedding", &int4_embedding, "rows of a 4-bit embedding table as float32 (CPU)");
  m.def("build_info", &build_info, "ISA the extension was compiled for");
  py::class_<EncoderBlock>(m, "EncoderBlock", "a post-norm encoder block's int8 kernels in one call (native_blocks.py)")
      .def(py::init([](std::vector<torch::Tensor> qkv_small, std::vector<torch::Tensor> qkv_large, int64_t qkv_paths_small,
                       int64_t qkv_path_large, std::vector<torch::Tensor> out_small, std::vector<torch::Tensor> out_large,
                       int64_t out_path_small, int64_t out_path_large, std::vector<torch::Tensor> ffn_small,
                       std::vector<torch::Tensor> ffn_large, int64_t ffn_path_small, int64_t ffn_path_large,
                       std::vector<torch::Tensor> norms, std::vector<int64_t> sizes, std::vector<double> scalars,
                       std::vector<torch::Tensor> sources) {
             TORCH_CHECK(norms.size() == 4, "EncoderBlock: norms are ln1 gamma, beta, ln2 gamma, beta");
             TORCH_CHECK(sizes.size() == 11, "EncoderBlock: sizes are qkv_out, q_features, k_features, heads, head_dim, "
                         "attn_out_features, ffn_hidden, ffn_out, act, large_from, torch_norms");
             TORCH_CHECK(scalars.size() == 3, "EncoderBlock: scalars are scale, eps1, eps2");
             EncoderBlock b;
             b.qkv = int8_route(qkv_small, qkv_large, qkv_paths_small, qkv_path_large, 4, "qkv");
             b.attn_out = int8_route(out_small, out_large, out_path_small, out_path_large, 4, "attn_out");
             b.ffn = int8_route(ffn_small, ffn_large, ffn_path_small, ffn_path_large, 8, "ffn");
             b.ln1_gamma = norms[0];
             b.ln1_beta = norms[1];
             b.ln2_gamma = norms[2];
             b.ln2_beta = norms[3];
             b.qkv_out = sizes[0];
             b.q_features = sizes[1];
             b.k_features = sizes[2];
             b.heads = sizes[3];
             b.head_dim = sizes[4];
             b.attn_out_features = sizes[5];
             b.ffn_hidden = sizes[6];
             b.ffn_out = sizes[7];
             b.act = sizes[8];
             b.large_from = sizes[9];
             b.torch_norms = sizes[10] != 0;
             b.scale = scalars[0];
             b.eps1 = scalars[1];
             b.eps2 = scalars[2];
             TORCH_CHECK(b.heads >= 1 && b.head_dim >= 1 && b.q_features == b.heads * b.head_dim &&
                         b.k_features == b.q_features && b.qkv_out == 3 * b.q_features,
                         "EncoderBlock: query, key and value must each have heads * head_dim features");
             b.sources.remember(std::move(sources));
             return b;
           }))
      .def("forward", &EncoderBlock::forward, "h (tokens, hidden), cu_seqlens (sequences + 1) -> (tokens, hidden)",
           py::call_guard<py::gil_scoped_release>())
      .def("fresh", &EncoderBlock::fresh, "whether the source tensors are where and as they were when it was built");
  py::class_<EncoderModel>(m, "EncoderModel", "a BERT-layout encoder's embeddings and blocks in one call")
      .def(py::init([](std::vector<std::vector<torch::Tensor>> tables, std::vector<int64_t> widths,
                       std::vector<bool> int4, std::vector<torch::Tensor> norm, double eps,
                       std::vector<EncoderBlock> blocks, std::vector<torch::Tensor> sources) {
             TORCH_CHECK(tables.size() == 3 && widths.size() == 3 && int4.size() == 3,
                         "EncoderModel: three tables (word, position, token type)");
             TORCH_CHECK(norm.size() == 2, "EncoderModel: norm is the embeddings' LayerNorm gamma, beta");
             EncoderModel mdl;
             mdl.word = embedding_table(tables[0], widths[0], int4[0], "word");
             mdl.position = embedding_table(tables[1], widths[1], int4[1], "position");
             mdl.token_type = embedding_table(tables[2], widths[2], int4[2], "token type");
             mdl.ln_gamma = norm[0];
             mdl.ln_beta = norm[1];
             mdl.eps = eps;
             mdl.blocks = std::move(blocks);
             mdl.sources.remember(std::move(sources));
             return mdl;
           }))
      .def("forward", &EncoderModel::forward, "ids, token_types, positions (tokens), cu_seqlens -> (tokens, hidden)",
           py::call_guard<py::gil_scoped_release>())
      .def("fresh", &EncoderModel::fresh, "whether every tensor it was built from is where and as it was");
}
