// Scalar helpers written so that the compiler vectorizes the loops that call them (no libm calls,
// no branches): bfloat16 <-> float32 and a float32 exp; and the vector widening and narrowing of
// fp8 KV cache values.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace kiln_native {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// round to nearest even, NaN kept a (quiet) NaN: c10::BFloat16's rounding, branch-free
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// exp(x) within ~1e-7 relative (Cody-Waite reduction, degree-7 Taylor); saturates outside
// [-87, 88] (to ~1e-38 and ~1.6e38). std::exp is a scalar libm call.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693145751953125f;
  r -= n * 1.428606765330187e-06f;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return p * scale;
}

// silu(gate) * up from bfloat16 values, as silu_and_mul computes it: silu rounded to bfloat16, the
// product rounded once (the fused gate/up kernels call this too, so that they match it bitwise)
inline uint16_t silu_times_up(float gate, float up) {
  const float silu = round_bf16(gate / (1.f + fast_exp(-gate)));
  return float_to_bf16(silu * up);
}

#if defined(__AVX2__) && defined(__FMA__)
// 16 bfloat16 values as two vectors of float32 lanes in *chunk order*: one 32-byte load whose
// 32-bit lanes each hold a pair of dims, so a shift gives the even dims (0, 2, ..., 14) and a mask
// the odd ones: 3 operations for 16 values, where widening each half (zero-extend, shift) takes 6.
// Whatever multiplies such a chunk lane by lane (a query row, a row of V sums) is kept in the same
// order (bf16_chunk_position).
struct Chunk16 {
  __m256 a, b;
};
inline Chunk16 load_bf16_chunk(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))))};
}

// Where dim d of a row sits in chunk order.
inline int64_t bf16_chunk_position(int64_t d) { return (d & ~int64_t{15}) + (d & 1) * 8 + ((d & 15) >> 1); }

// fast_exp on 8 lanes with exp16's steps (n rounded to nearest, then 2^n built in the exponent
// bits: exact, as scalef is, since the clamp keeps n in [-126, 127]): bitwise exp16's lanes.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// 8 bfloat16 values (raw bits) widened to float32 lanes
inline __m256 load_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// float32 lanes -> bfloat16 bits in the low half of each 32-bit lane, float_to_bf16's rounding
inline __m256i bf16_bits8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

inline __m256 round_bf16x8(__m256 x) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(x), 16)); }

inline __m128i to_bf16x8(__m256 x) {
  const __m256i bits = bf16_bits8(x);
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}

// silu_times_up on 8 lanes of bfloat16 values (exp8 for fast_exp, as the AVX-512 loops use exp16)
inline __m128i silu_times_up8(__m256 gate, __m256 up) {
  const __m256 denominator = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate)));
  return to_bf16x8(_mm256_mul_ps(round_bf16x8(_mm256_div_ps(gate, denominator)), up));
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KILN_FP8_SIMD 1
// fp8 KV cache values (kv_layout.py) widen through float16, which the CPU converts (F16C): e5m2 is
// the top byte of a float16, and e4m3fn's 7 magnitude bits, put one bit lower under the sign, are
// a float16 of 1/256 the value, normal and subnormal alike. The loaders below return these *raw*
// values, value / kRawScale (exactly: a power of two); the kernels put the factor on the
// query and the output instead of a multiply per loaded vector. (The e4m3fn NaN, 0x7f, would
// widen to 480; the cache write saturates, so only a NaN input makes one.)
enum class Fp8 { e4m3, e5m2 };

// 16-bit lanes holding an fp8 value in their high byte (the low byte `low_mask` clears) -> float16 bits
template <Fp8 F>
inline __m128i fp8_half_bits(__m128i x, int16_t low_mask) {
  if constexpr (F == Fp8::e5m2) return _mm_and_si128(x, _mm_set1_epi16(low_mask));
  return _mm_and_si128(_mm_srai_epi16(x, 1), _mm_set1_epi16(static_cast<int16_t>(low_mask & 0xBFFF)));
}

// 16 fp8 values as a Chunk16 in bfloat16's chunk order (even dims, odd dims), raw: one 16-byte
// load whose 16-bit lanes each hold a pair of dims, the even one in the low byte.
template <Fp8 F>
inline Chunk16 load_fp8_chunk(const uint8_t* p) {
  const __m128i pairs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i even = F == Fp8::e5m2 ? _mm_slli_epi16(pairs, 8) : fp8_half_bits<F>(_mm_slli_epi16(pairs, 8), -1);
  // e4m3: the odd byte shifted under its sign drags the even byte's top bits into bits 6..0: cleared
  const __m128i odd = fp8_half_bits<F>(pairs, static_cast<int16_t>(F == Fp8::e5m2 ? 0xFF00 : 0xFF80));
  return {_mm256_cvtph_ps(even), _mm256_cvtph_ps(odd)};
}

// 8 fp8 values widened to float32 lanes in their order, raw
template <Fp8 F>
inline __m256 load_fp8x8(const uint8_t* p) {
  const __m128i high = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 8);
  return _mm256_cvtph_ps(F == Fp8::e5m2 ? high : fp8_half_bits<F>(high, -1));
}

// 8 float32 lanes, already within the format's finite range (or NaN), as fp8 bytes in the low 8
// bytes: c10's own conversion (torch/headeronly/util/Float8_*.h) lane by lane, so the bytes are
// torch's. Below the smallest normal, a float add of a magic number rounds the subnormal to nearest
// even; above it, adding a bias of half an ulp minus one (plus the kept bit's parity) rounds the
// mantissa; NaN stays NaN (0x7f with its sign). Checked against c10 on every float32 bit pattern.
template <Fp8 F>
inline __m128i fp8_bytes8(__m256 x) {
  constexpr int kShift = F == Fp8::e4m3 ? 20 : 21;  // float32 mantissa bits dropped
  constexpr int32_t kBias = F == Fp8::e4m3 ? ((7 - 127) << 23) + 0x7FFFF : ((15 - 127) << 23) + 0xFFFFF;
  constexpr int32_t kSmallestNormal = (F == Fp8::e4m3 ? 121 : 113) << 23;
  constexpr int32_t kDenormMagic = (F == Fp8::e4m3 ? 141 : 134) << 23;
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int32_t>(0x80000000u)));
  const __m256i magnitude = _mm256_xor_si256(bits, sign);
  const __m256i magic = _mm256_set1_epi32(kDenormMagic);
  const __m256i subnormal = _mm256_sub_epi32(
      _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(magnitude), _mm256_castsi256_ps(magic))), magic);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(magnitude, kShift), _mm256_set1_epi32(1));
  __m256i normal = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(magnitude, _mm256_set1_epi32(kBias)), odd), kShift);
  if constexpr (F == Fp8::e4m3) normal = _mm256_min_epu32(normal, _mm256_set1_epi32(0x7E));  // a carry into 0x7f
  __m256i out = _mm256_blendv_epi8(normal, subnormal, _mm256_cmpgt_epi32(_mm256_set1_epi32(kSmallestNormal), magnitude));
  out = _mm256_blendv_epi8(out, _mm256_set1_epi32(0x7F), _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000)));
  out = _mm256_or_si256(out, _mm256_srli_epi32(sign, 24));
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(out), _mm256_extracti128_si256(out, 1));
  return _mm_packus_epi16(words, words);
}
#endif

template <typename T>
constexpr bool kIsFp8 = std::is_same_v<T, c10::Float8_e4m3fn> || std::is_same_v<T, c10::Float8_e5m2>;

#if defined(KILN_FP8_SIMD)
template <typename T>
constexpr Fp8 kFp8Format = std::is_same_v<T, c10::Float8_e4m3fn> ? Fp8::e4m3 : Fp8::e5m2;

// What the kernels read values through, by element type (fp8 raw, see above): 8 widened in order,
// and 16 in chunk order (bfloat16 as raw bits or as c10::BFloat16).
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 widen8(const uint16_t* p) { return load_bf16x8(p); }
inline __m256 widen8(const c10::BFloat16* p) { return load_bf16x8(reinterpret_cast<const uint16_t*>(p)); }
inline __m256 widen8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
template <typename T, std::enable_if_t<kIsFp8<T>, int> = 0>
inline __m256 widen8(const T* p) { return load_fp8x8<kFp8Format<T>>(reinterpret_cast<const uint8_t*>(p)); }

inline Chunk16 load_chunk(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }  // dims 0-7, 8-15
inline Chunk16 load_chunk(const uint16_t* p) { return load_bf16_chunk(p); }
inline Chunk16 load_chunk(const c10::BFloat16* p) { return load_bf16_chunk(reinterpret_cast<const uint16_t*>(p)); }
template <typename T, std::enable_if_t<kIsFp8<T>, int> = 0>
inline Chunk16 load_chunk(const T* p) { return load_fp8_chunk<kFp8Format<T>>(reinterpret_cast<const uint8_t*>(p)); }
#endif

// What an fp8 loader's raw values are short of (see above); 1 for every other type.
template <typename T>
constexpr float kRawScale = 1.f;
template <>
constexpr float kRawScale<c10::Float8_e4m3fn> = 256.f;

// One cache value as the vector loaders read it (raw), for the scalar loops beside them.
template <typename T>
inline float raw_value(T x) {
  return static_cast<float>(x) * (1.f / kRawScale<T>);
}

#if defined(__AVX512F__)
// fast_exp on 16 lanes, with the rounding step as round-to-nearest and the 2^n scaling by scalef
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 bfloat16 values (raw bits) widened to float32 lanes
inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

#if defined(KILN_FP8_SIMD)
// 16 fp8 values widened to float32 lanes in their order, raw (see load_fp8_chunk)
template <typename T, Fp8 F = kFp8Format<T>>
inline __m512 load_fp8x16(const T* values) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(values);
  const __m256i high = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 8);
  return _mm512_cvtph_ps(F == Fp8::e5m2 ? high
      : _mm256_and_si256(_mm256_srai_epi16(high, 1), _mm256_set1_epi16(static_cast<int16_t>(0xBFFF))));
}
#endif

// float32 lanes -> bfloat16 bits, float_to_bf16's rounding (nearest even, NaN kept a quiet NaN)
inline __m256i to_bf16x16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(rounded);
}

inline __m512 round_bf16x16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(x)), 16));
}
#endif

}  // namespace kiln_native
