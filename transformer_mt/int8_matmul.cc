// y [M, N] float32 = x [M, K] float32 (quantised per row here) times int8 weights packed for
// AVX512-VNNI (int8_kernel.pack), equal bit for bit to int8_kernel.reference: the same scales and
// roundings, exact int32 sums. x is quantised to u8 with an offset of 128 (vpdpbusd multiplies
// u8 by s8); the offset's share, 128 * the column's sum of weights, is taken off the sums.
// A micro-kernel computes 6 rows x 64 columns in 24 zmm accumulators, k four at a time.
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
constexpr int kMR = 6;    // rows a micro-kernel call
constexpr int kCols = 64; // columns a packed block: 4 zmm of 16 int32

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

template <int MR>
inline void MicroKernel(int64_t K4, const uint8_t* a, int64_t lda, const int8_t* b, const float* rs, const float* cs,
                        const int32_t* comp, float* c, int64_t ldc, int64_t ncols, int mr) {
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
    for (int j = 0; j < 4; ++j) {
      if (ncols <= j * 16) break;
      const __m512i sums = _mm512_sub_epi32(acc[r][j], _mm512_loadu_si512(comp + j * 16));
      const __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(rsv, _mm512_loadu_ps(cs + j * 16)));
      const int64_t left = ncols - j * 16;
      const __mmask16 mask = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
      _mm512_mask_storeu_ps(c + r * ldc + j * 16, mask, y);
    }
  }
}

ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> packed, ffi::Buffer<ffi::F32> col_scale,
                          ffi::Buffer<ffi::S32> comp, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const int64_t K = xd.back();
  const int64_t M = K ? static_cast<int64_t>(x.element_count()) / K : 0;
  const int64_t N = y->dimensions().back();
  const int64_t blocks = (N + kCols - 1) / kCols;
  if (K % 4 || static_cast<int64_t>(packed.element_count()) != blocks * kCols * K)
    return ffi::Error::InvalidArgument("int8_matmul: packed weights do not match x's width");
  thread_local std::vector<uint8_t> q;
  thread_local std::vector<float> rs;
  q.resize(M * K + 64);
  rs.resize(M + 16);
  QuantizeRows(x.typed_data(), M, K, q.data(), rs.data());
  const int8_t* b = packed.typed_data();
  float* out = y->typed_data();
  for (int64_t nb = 0; nb < blocks; ++nb) {
    const int8_t* bb = b + nb * K * kCols;
    const int64_t ncols = N - nb * kCols < kCols ? N - nb * kCols : kCols;
    for (int64_t m = 0; m < M; m += kMR) {
      const int mr = static_cast<int>(M - m < kMR ? M - m : kMR);
      MicroKernel<kMR>(K / 4, q.data() + m * K, K, bb, rs.data() + m, col_scale.typed_data() + nb * kCols,
                       comp.typed_data() + nb * kCols, out + m * N + nb * kCols, N, ncols, mr);
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
