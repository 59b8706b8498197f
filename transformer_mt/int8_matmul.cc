// y [M, N] float32 = x [M, K] float32 (quantised per row here) times int8 weights packed for
// AVX512-VNNI (int8_kernel.pack), equal bit for bit to int8_kernel.reference: the same scales and
// roundings, exact int32 sums. x is quantised to u8 with an offset of 128 (vpdpbusd multiplies
// u8 by s8); the offset's share, 128 * the column's sum of weights, is taken off the sums.
// A micro-kernel computes 6 rows x 64 columns in 24 zmm accumulators, k four at a time.
// A second handler keeps only each row's first largest column (greedy search's output
// projection: first_argmax of the product without writing it); a third is a layer norm, for the
// products' inputs in the same decoding programs; a fourth the softmax of their attention. A
// fifth, for training, transposes a bf16 matrix (matmul.weight_grad: see there why).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
constexpr int kMR = 6;    // rows a micro-kernel call
constexpr int kCols = 64; // columns a packed block: 4 zmm of 16 int32

// The lanes of a 16-float vector that hold data when `left` values remain.
inline __mmask16 LanesLeft(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

// Per row: scale = max|x| * (1/127) (1 where 0), q = round_half_even(x * (1/scale)) + 128 as u8.
void QuantizeRows(const float* x, int64_t M, int64_t K, uint8_t* q, float* scales) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m512 mx = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_loadu_ps(row + k), absmask));
    float m_abs = _mm512_reduce_max_ps(mx);
    for (; k < K; ++k) { float a = row[k] < 0 ? -row[k] : row[k]; if (a > m_abs) m_abs = a; }
    const float s = m_abs > 0 ? m_abs * (1.0f / 127.0f) : 1.0f;
    scales[m] = s;
    const float inv = 1.0f / s;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i off = _mm512_set1_epi32(128);
    uint8_t* out = q + m * K;
    for (k = 0; k + 16 <= K; k += 16) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(row + k), vinv);
      __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), off);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(i));
    }
    for (; k < K; ++k) out[k] = static_cast<uint8_t>(static_cast<int32_t>(__builtin_roundevenf(row[k] * inv)) + 128);
  }
}

// The output of a micro-kernel call, a row at a time: y[j] holds the row's columns j * 16 ..
// j * 16 + 15 of the block, valid[j] the lanes within the product's width (nj vectors).
struct StoreEpilogue {  // y written to c [rows, ldc]
  float* c;
  int64_t ldc;
  inline void operator()(int r, const __m512* y, const __mmask16* valid, int nj) const {
    for (int j = 0; j < nj; ++j) _mm512_mask_storeu_ps(c + r * ldc + j * 16, valid[j], y[j]);
  }
};

struct ArgmaxEpilogue {  // each row's running best (value, column) per lane; y never written
  float* best;           // [rows, 16]
  int32_t* index;        // [rows, 16]
  int32_t first_column;  // of this block
  uint64_t banned;       // this block's banned columns, bit c for column first_column + c
  // A lane's best and its column stay in registers over the row's vectors (columns in order,
  // strictly greater: a lane keeps the first column of its maximum); one load and one store a
  // row, not one a vector (each store's value was the next vector's load: a chain through memory).
  inline void operator()(int r, const __m512* y, const __mmask16* valid, int nj) const {
    __m512 top = _mm512_loadu_ps(best + r * 16);
    __m512i column = _mm512_loadu_si512(index + r * 16);
    const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(first_column),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (int j = 0; j < nj; ++j) {
      const __mmask16 allowed = valid[j] & static_cast<__mmask16>(~(banned >> (j * 16)));
      const __mmask16 better = _mm512_mask_cmp_ps_mask(allowed, y[j], top, _CMP_GT_OQ);
      top = _mm512_mask_mov_ps(top, better, y[j]);
      column = _mm512_mask_mov_epi32(column, better, _mm512_add_epi32(lanes, _mm512_set1_epi32(j * 16)));
    }
    _mm512_storeu_ps(best + r * 16, top);
    _mm512_storeu_si512(index + r * 16, column);
  }
};

template <int MR, typename Epilogue>
inline void MicroKernel(int64_t K4, const uint8_t* a, int64_t lda, const int8_t* b, const float* rs, const float* cs,
                        const int32_t* comp, int64_t ncols, int mr, const Epilogue& out) {
  __m512i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t kg = 0; kg < K4; ++kg) {
    const int8_t* bk = b + kg * 256;
    const __m512i b0 = _mm512_load_si512(bk), b1 = _mm512_load_si512(bk + 64),
                  b2 = _mm512_load_si512(bk + 128), b3 = _mm512_load_si512(bk + 192);
    for (int r = 0; r < MR; ++r) {
      if (r >= mr) break;
      int32_t word;
      std::memcpy(&word, a + r * lda + kg * 4, 4);
      const __m512i av = _mm512_set1_epi32(word);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);
    }
  }
  for (int r = 0; r < mr; ++r) {
    const __m512 rsv = _mm512_set1_ps(rs[r]);
    __m512 y[4];
    __mmask16 valid[4];
    int nj = 0;
    for (int j = 0; j < 4 && ncols > j * 16; ++j, ++nj) {
      const __m512i sums = _mm512_sub_epi32(acc[r][j], _mm512_loadu_si512(comp + j * 16));
      y[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(rsv, _mm512_loadu_ps(cs + j * 16)));
      valid[j] = LanesLeft(ncols - j * 16);
    }
    out(r, y, valid, nj);
  }
}

// x [M, K] quantised, then for each block of 64 columns and each tile of 6 rows, make(block,
// first row) gives the micro-kernel's epilogue.
template <typename MakeEpilogue>
void Multiply(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* b, const float* col_scale,
              const int32_t* comp, const MakeEpilogue& make) {
  thread_local std::vector<uint8_t> q;
  thread_local std::vector<float> rs;
  q.resize(M * K + 64);
  rs.resize(M + 16);
  QuantizeRows(x, M, K, q.data(), rs.data());
  const int64_t blocks = (N + kCols - 1) / kCols;
  for (int64_t nb = 0; nb < blocks; ++nb) {
    const int8_t* bb = b + nb * K * kCols;
    const int64_t ncols = N - nb * kCols < kCols ? N - nb * kCols : kCols;
    for (int64_t m = 0; m < M; m += kMR) {
      const int mr = static_cast<int>(M - m < kMR ? M - m : kMR);
      MicroKernel<kMR>(K / 4, q.data() + m * K, K, bb, rs.data() + m, col_scale + nb * kCols, comp + nb * kCols,
                       ncols, mr, make(nb, m));
    }
  }
}

ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> packed, ffi::Buffer<ffi::F32> col_scale,
                          ffi::Buffer<ffi::S32> comp, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t K = x.dimensions().back();
  const int64_t M = K ? static_cast<int64_t>(x.element_count()) / K : 0;
  const int64_t N = y->dimensions().back();
  if (K % 4 || static_cast<int64_t>(packed.element_count()) != (N + kCols - 1) / kCols * kCols * K)
    return ffi::Error::InvalidArgument("int8_matmul: packed weights do not match x's width");
  float* out = y->typed_data();
  Multiply(x.typed_data(), M, K, N, packed.typed_data(), col_scale.typed_data(), comp.typed_data(),
           [&](int64_t nb, int64_t m) { return StoreEpilogue{out + m * N + nb * kCols, N}; });
  return ffi::Error::Success();
}

// ids [M] int32: for each row of the product above (N = n columns), the first column of its
// largest value, the columns in `banned` excluded (what decode.first_argmax gives on the
// product's output), without writing the product.
ffi::Error Int8MatmulArgmaxImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> packed, ffi::Buffer<ffi::F32> col_scale,
                                ffi::Buffer<ffi::S32> comp, ffi::Buffer<ffi::S32> banned, ffi::ResultBuffer<ffi::S32> ids,
                                int64_t n) {
  const int64_t K = x.dimensions().back();
  const int64_t M = K ? static_cast<int64_t>(x.element_count()) / K : 0;
  const int64_t N = n;
  const int64_t blocks = (N + kCols - 1) / kCols;
  if (K % 4 || N < 1 || static_cast<int64_t>(packed.element_count()) != blocks * kCols * K ||
      static_cast<int64_t>(ids->element_count()) != M)
    return ffi::Error::InvalidArgument("int8_matmul_argmax: packed weights do not match x's width");
  std::vector<uint64_t> banned_bits(blocks, 0);
  for (size_t i = 0; i < banned.element_count(); ++i) {
    const int32_t column = banned.typed_data()[i];
    if (column >= 0 && column < N) banned_bits[column / kCols] |= uint64_t{1} << (column % kCols);
  }
  thread_local std::vector<float> best;
  thread_local std::vector<int32_t> index;
  best.assign(M * 16, -__builtin_inff());
  index.assign(M * 16, static_cast<int32_t>(N - 1));  // a row without a maximum (NaNs) gets the last
  Multiply(x.typed_data(), M, K, N, packed.typed_data(), col_scale.typed_data(), comp.typed_data(),
           [&](int64_t nb, int64_t m) {
             return ArgmaxEpilogue{best.data() + m * 16, index.data() + m * 16, static_cast<int32_t>(nb * kCols),
                                   banned_bits[nb]};
           });
  int32_t* out = ids->typed_data();
  for (int64_t m = 0; m < M; ++m) {  // the lanes' best: the largest value, at its first column
    float top = best[m * 16];
    int32_t column = index[m * 16];
    for (int lane = 1; lane < 16; ++lane) {
      const float v = best[m * 16 + lane];
      const int32_t c = index[m * 16 + lane];
      if (v > top || (v == top && c < column)) top = v, column = c;
    }
    out[m] = column;
  }
  return ffi::Error::Success();
}

// y [M, D] = a layer norm of each row of x [M, D], as flax's LayerNorm computes it (mean and
// mean of squares, variance = their difference floored at 0): the int8 products' inputs in a
// decoding program, one call where XLA:CPU runs two reductions of ~50 us each at these shapes.
ffi::Error LayerNormImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                         ffi::ResultBuffer<ffi::F32> y, float epsilon) {
  const int64_t D = x.dimensions().back();
  const int64_t M = D ? static_cast<int64_t>(x.element_count()) / D : 0;
  if (static_cast<int64_t>(scale.element_count()) != D || static_cast<int64_t>(bias.element_count()) != D)
    return ffi::Error::InvalidArgument("layer_norm: scale and bias do not match x's width");
  const float* g = scale.typed_data();
  const float* b = bias.typed_data();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x.typed_data() + m * D;
    float* out = y->typed_data() + m * D;
    __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= D; k += 16) {
      const __m512 v = _mm512_loadu_ps(row + k);
      s1 = _mm512_add_ps(s1, v);
      s2 = _mm512_fmadd_ps(v, v, s2);
    }
    float sum = _mm512_reduce_add_ps(s1), sum2 = _mm512_reduce_add_ps(s2);
    for (; k < D; ++k) sum += row[k], sum2 += row[k] * row[k];
    const float mean = sum / static_cast<float>(D);
    const float var = std::max(0.0f, sum2 / static_cast<float>(D) - mean * mean);
    const float r = 1.0f / std::sqrt(var + epsilon);
    const __m512 vmean = _mm512_set1_ps(mean), vr = _mm512_set1_ps(r);
    for (k = 0; k + 16 <= D; k += 16) {
      const __m512 mul = _mm512_mul_ps(vr, _mm512_loadu_ps(g + k));
      _mm512_storeu_ps(out + k, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(row + k), vmean), mul,
                                                _mm512_loadu_ps(b + k)));
    }
    for (; k < D; ++k) out[k] = (row[k] - mean) * (r * g[k]) + b[k];
  }
  return ffi::Error::Success();
}

// e^x for x <= 0 (a softmax's shifted logits), ~1 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by
// a degree-7 polynomial (Cephes' expf), times 2^n; 0 below ln(FLT_MIN), where a masked logit
// (-1e9) lands, so masked keys weigh exactly 0 as in XLA. NaN stays NaN.
inline __m512 ExpNonPositive(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654475f), _CMP_LT_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

// y [M, L] = the softmax of each row of x [M, L] (attention weights in a decoding program whose
// products run in this library): e^(x - max) / sum, each row on its own, so a row's weights never
// depend on the other rows of its batch (XLA:CPU's reductions may: benchmarks/RESULTS.md).
ffi::Error SoftmaxImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t L = x.dimensions().back();
  const int64_t M = L ? static_cast<int64_t>(x.element_count()) / L : 0;
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x.typed_data() + m * L;
    float* out = y->typed_data() + m * L;
    __m512 mx = neg_inf;
    for (int64_t k = 0; k < L; k += 16) {
      const __mmask16 valid = LanesLeft(L - k);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(neg_inf, valid, row + k));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < L; k += 16) {
      const __mmask16 valid = LanesLeft(L - k);
      const __m512 e = _mm512_maskz_mov_ps(valid, ExpNonPositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, row + k), top)));
      sum = _mm512_add_ps(sum, e);
      _mm512_mask_storeu_ps(out + k, valid, e);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    for (int64_t k = 0; k < L; k += 16) {
      const __mmask16 valid = LanesLeft(L - k);
      _mm512_mask_storeu_ps(out + k, valid, _mm512_div_ps(_mm512_maskz_loadu_ps(valid, out + k), total));
    }
  }
  return ffi::Error::Success();
}

// y [C, R] = x [R, C] transposed, bf16 moved as 16-bit words: a weight gradient's operand laid out
// so that XLA runs x^T g as a bf16 dot (matmul.weight_grad). An opaque call, so XLA cannot fold the
// transpose back into the dot. Tiles of 32 x 32 keep both sides' lines in L1.
ffi::Error TransposeBf16Impl(ffi::Buffer<ffi::BF16> x, ffi::ResultBuffer<ffi::BF16> y) {
  const int64_t R = x.dimensions()[0], C = x.dimensions()[1];
  const uint16_t* in = reinterpret_cast<const uint16_t*>(x.untyped_data());
  uint16_t* out = reinterpret_cast<uint16_t*>(y->untyped_data());
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < R; r0 += kTile) {
    const int64_t r1 = std::min(R, r0 + kTile);
    for (int64_t c0 = 0; c0 < C; c0 += kTile) {
      const int64_t c1 = std::min(C, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) out[c * R + r] = in[r * C + c];
    }
  }
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerMtInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerMtInt8MatmulArgmax, Int8MatmulArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("n"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerMtLayerNorm, LayerNormImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerMtSoftmax, SoftmaxImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerMtTransposeBf16, TransposeBf16Impl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::BF16>>().Ret<ffi::Buffer<ffi::BF16>>());
