// Lion's step over many CPU tensors in one call: the kernel of impl="cpp".
//
// Built by lion_hf/optim/cpu_kernel_build.py with the system's C++ compiler and called through
// ctypes (lion_hf/optim/cpu_kernel.py) with arrays of host data pointers. The Python side checks every
// tensor first, since nothing here can check a raw pointer: on the CPU (the impl is checked per device
// at every step, lion_hf/optim/dispatch.py), dtypes, the param's shape, memory that is there (no freed or
// shrunk storage, no zero tensor, negated views resolved: lion_hf/optim/validation.py), contiguous
// (cpu_kernel.py), and no two tensors of the call overlapping (dispatch.py, by strided extent).
//
// Each tensor has a kind: its param is fp32, bf16 or fp16; its grad has the param's dtype or is
// fp32; its momentum is fp32 or bf16; and a bf16/fp16 param is stored by round-to-nearest-even,
// by stochastic rounding, or by round-to-nearest with a Kahan residual of the param's dtype. The
// arithmetic is lion_tensor's (numerics.py), operation for operation, in fp32:
//   g' = -g if maximize else g
//   w  = p + c under Kahan summation, else p
//   u  = sign(m * beta1 + g' * (1 - beta1))     torch's sign: (x > 0) - (x < 0), so NaN -> 0
//   u  = u * agree / max(mean(agree), 1e-3), agree = (u * g' > 0)      (cautious only)
//   w' = w * decay - u * lr                     decay = 1 - lr * weight_decay
//   m' = m * beta2 + g' * (1 - beta2)
//   p  = round(w');  c = nearest(w' - p) under Kahan summation
// and a bf16/fp16 value is rounded as numerics.py rounds it (the same 16-bit hash of the
// element's index and a per-tensor seed for stochastic rounding; fp16's two neighbours found
// the same way). It is built with -ffp-contract=off, so no product is fused into an FMA and
// each result rounds as torch's separate ops round it (the explicit FMAs of Q8::quotient16 compute
// a division's correctly rounded quotient, not a product and sum): given the same seeds the step is bit
// for bit that of numerics.lion_tensor, the one reference (impl="for_loop"; tested), except for NaN payloads and a cautious tensor of more
// than 2**24 elements, which may round its agreeing fraction differently.
//
// Why one call: the tensors of every param group of a step are cut into blocks of equal length
// and the threads split the blocks, so small tensors (biases, norms) cost no call and no thread
// barrier of their own; each tensor reads its group's hyperparameters. The portable conversions
// are integer arithmetic on bit patterns, with selects instead of branches, so that the compiler
// vectorises every loop (it leaves _Float16 conversions scalar); with AVX-512, fp16 params use
// the CPU's own conversions instead (update_elements_fp16), and a tensor with a bf16 param, grad or
// momentum runs a loop of intrinsics whose random bits are looked up, not hashed (update_elements_x16).

#include <cmath>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LION_FP16_AVX512 1
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// The element-wise helpers must be inlined into the update loops, or those loops stay scalar
// around a call per element; the compiler's own heuristic declines for the larger ones.
#if defined(__GNUC__) || defined(__clang__)
#define LION_INLINE inline __attribute__((always_inline))
#else
#define LION_INLINE inline
#endif

namespace {

constexpr int64_t kBlock = 1 << 14;  // elements per unit of work: 64 KiB of an fp32 array
constexpr int64_t kScaleBlock = 256;  // elements per scale of an 8-bit momentum: a unit of work holds whole ones
static_assert(kBlock % kScaleBlock == 0, "a unit of work must hold whole blocks of an 8-bit momentum");

// Tensor kinds, as cpu_kernel.py numbers them.
constexpr int kParamFp32 = 0, kParamBf16 = 1, kParamFp16 = 2, kParamMask = 3;
constexpr int kGradFp32 = 4;      // the grad is fp32 (else the param's dtype)
constexpr int kMomentumBf16 = 8;  // the momentum is bf16, stored by stochastic rounding (else fp32)
constexpr int kMomentumInt8 = 128;  // the momentum is 8-bit codes with block scales (numerics.quantize_momentum)
constexpr int kRoundingShift = 4;
constexpr int kNearest = 0, kStochastic = 1, kKahan = 2;  // how a bf16/fp16 param is stored

// A param group's hyperparameters, as the caller lays them out (7 floats).
struct Hyper {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, grad_sign;
};

LION_INLINE uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

LION_INLINE float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// numerics.random_bits16: a bijection of 16-bit integers applied to (index + seed) mod 2**16.
LION_INLINE uint32_t random_bits16(int64_t index, uint32_t seed) {
  uint32_t x = (static_cast<uint32_t>(index & 0xFFFF) + seed) & 0xFFFFu;
  x = ((x ^ (x >> 8)) * 0x6D2Bu) & 0xFFFFu;
  x = ((x ^ (x >> 7)) * 0x5A35u) & 0xFFFFu;
  return x ^ (x >> 8);
}

// ---------------------------------------------------------------------------------------------
// Storage types: load as fp32; store an fp32 value by round-to-nearest-even or stochastically.
// ---------------------------------------------------------------------------------------------

struct Fp32 {
  using T = float;
  static constexpr int kind = kParamFp32;
  static LION_INLINE float load(float v) { return v; }
  static LION_INLINE float nearest(float x) { return x; }
  static LION_INLINE float stochastic(float x, uint32_t) { return x; }
};

// bf16 is the high half of an fp32 bit pattern.
struct Bf16 {
  using T = uint16_t;
  static constexpr int kind = kParamBf16;
  static LION_INLINE float load(uint16_t v) { return float_of(static_cast<uint32_t>(v) << 16); }
  // A NaN stays a NaN (the quiet 0x7FC0), whatever its payload.
  static LION_INLINE uint16_t nearest(float x) {
    const uint32_t b = bits_of(x);
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
  }
  // numerics.stochastic_round_to_bf16: add 16 random bits below the kept half and truncate.
  static LION_INLINE uint16_t stochastic(float x, uint32_t noise) {
    const uint32_t noisy = (bits_of(x) + noise) >> 16;
    return static_cast<uint16_t>(x != x ? 0x7FC0u : noisy);
  }
};

// IEEE half precision: 1 sign, 5 exponent, 10 mantissa bits.
struct Fp16 {
  using T = uint16_t;
  static constexpr int kind = kParamFp16;

  // Exact: normal numbers re-bias the exponent, subnormals are their mantissa times 2**-24
  // (exact in fp32), inf and NaN keep an all-ones exponent.
  static LION_INLINE float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t rest = h & 0x7FFFu;
    const uint32_t normal = (rest << 13) + 0x38000000u;
    const uint32_t special = (rest << 13) | 0x7F800000u;
    const uint32_t subnormal = bits_of(static_cast<float>(static_cast<int32_t>(rest)) * 0x1p-24f);
    const uint32_t magnitude = rest >= 0x7C00u ? special : (rest < 0x0400u ? subnormal : normal);
    return float_of(sign | magnitude);
  }

  // |x|'s nearest fp16 magnitude (round to nearest even, as torch's conversion rounds: overflow to
  // inf, gradual underflow), from the magnitude bits `a` of x: as a 15-bit pattern, and as an fp32
  // value (not meaningful when the pattern is inf or NaN). Two functions rather than one with two
  // results, which the vectoriser would not see through; inlined, they share their work.
  static LION_INLINE uint32_t nearest_bits(uint32_t a) {
    // |x| >= 2**16 rounds to inf; a NaN becomes the quiet NaN.
    const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
    // Normal results: round the 13 bits fp16 drops to nearest even (a carry into the exponent is
    // the next binade, or inf just under 2**16), then re-bias the exponent.
    const uint32_t normal = (a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13;  // (127 - 15) << 23
    // |x| < 2**-14: adding 0.5 leaves |x| * 2**24 rounded to an integer (by the FPU, to nearest
    // even) in the low mantissa bits, which is the subnormal's bit pattern.
    const uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
    return a >= 0x47800000u ? big : (a < 0x38800000u ? subnormal : normal);
  }
  static LION_INLINE float nearest_value(uint32_t a) {
    const float subnormal = (float_of(a) + 0.5f) - 0.5f;
    const float normal = float_of((a + 0xFFFu + ((a >> 13) & 1u)) & 0xFFFFE000u);
    return a < 0x38800000u ? subnormal : normal;
  }

  static LION_INLINE uint16_t nearest(float x) {
    const uint32_t b = bits_of(x);
    return static_cast<uint16_t>(((b >> 16) & 0x8000u) | nearest_bits(b & 0x7FFFFFFFu));
  }

  // numerics.stochastic_round_to_fp16: the nearest value, or the next one past it towards x
  // (one step of the 16-bit pattern, which is monotone in magnitude) with probability
  // |x - nearest| / spacing, worked out on magnitudes (the sign only comes along). The spacing of
  // adjacent fp16 values is a power of two, so the division is exact, and so is this product by
  // its reciprocal, built from the exponent bits: 2**(25 - max(e, 1)), or 2**(26 - e) when
  // stepping below a power of two. Past 65504 the next value is inf (taken with probability
  // finite / inf = 0); inf and NaN keep the nearest value (their probability is NaN in numerics.py).
  static LION_INLINE uint16_t stochastic(float x, uint32_t noise) {
    const uint32_t b = bits_of(x);
    const uint32_t a = b & 0x7FFFFFFFu;
    const uint32_t near = nearest_bits(a);
    const float near_value = nearest_value(a);
    const float magnitude_x = float_of(a);
    const bool away = magnitude_x > near_value;
    const uint32_t e = near >> 10;
    // Toward zero from a power of two (mantissa 0, exponent >= 2) the spacing halves. (Spelt as
    // integer arithmetic: a conjunction of comparisons kept this loop scalar.)
    const uint32_t not_from_power = (near & 0x3FFu) | (near < 0x800u ? 1u : 0u) | (away ? 1u : 0u);
    const uint32_t inverse_exponent = 127u + 25u - (e > 1u ? e : 1u) + (not_from_power == 0u ? 1u : 0u);
    const float prob = std::fabs(magnitude_x - near_value) * float_of(inverse_exponent << 23);
    const float uniform = static_cast<float>(static_cast<int32_t>(noise)) * 0x1p-16f;
    // inf and NaN stay, and so does 65504 rounding away (to inf): probability 0. (Nested float
    // selects: conjunctions of comparisons kept this loop scalar.)
    const float finite_prob = near >= 0x7C00u ? 0.f : prob;
    const float taken = near == 0x7BFFu ? (away ? 0.f : finite_prob) : finite_prob;
    const uint32_t other = (near + (away ? 1u : 0x7FFFu)) & 0x7FFFu;
    return static_cast<uint16_t>(((b >> 16) & 0x8000u) | (uniform < taken ? other : near));
  }
};

// An 8-bit momentum (state_dtype="int8"): int8 codes, one fp32 scale per block of 256 elements
// (numerics.quantize_momentum / dequantize_momentum). A code's magnitude k holds 3 exponent and 4
// mantissa bits of m / scale: 2**(k / 16 - 7) * (1 + (k % 16) / 16) for k >= 16, k * 2**-10 below.
constexpr float pow2(int e) {  // exact: powers of two in fp32's normal range
  float r = 1.f;
  for (; e > 0; --e) r *= 2.f;
  for (; e < 0; ++e) r *= 0.5f;
  return r;
}

struct Q8 {
  using T = int8_t;
  static constexpr int64_t kBlockShift = 8;
  static constexpr int64_t kBlockSize = int64_t{1} << kBlockShift;
  static_assert(kBlockSize == kScaleBlock, "numerics.EIGHT_BIT_BLOCK");
  // numerics._EXPONENT_BITS and what follows from it.
  static constexpr uint32_t kExponentBits = 3, kMantissaBits = 7 - kExponentBits;
  static constexpr uint32_t kTop = (1u << kExponentBits) - 1, kDropped = 23 - kMantissaBits, kRebias = 127 - kTop;
  static constexpr uint32_t kMantissaMask = (1u << kMantissaBits) - 1;
  static constexpr int kTopInt = static_cast<int>(kTop), kMantissaInt = static_cast<int>(kMantissaBits);
  static constexpr float kSubnormalLimit = pow2(1 - kTopInt);  // the smallest normal code
  static constexpr float kSubnormalStep = pow2(1 - kTopInt - kMantissaInt);
  static constexpr float kSubnormalScale = pow2(kTopInt - 1 + kMantissaInt);

  static LION_INLINE float value(int8_t code) {
    const int32_t c = code;
    const auto k = static_cast<uint32_t>(c < 0 ? -c : c);
    const float normal = float_of(((k >> kMantissaBits) + kRebias) << 23 | (k & kMantissaMask) << kDropped);
    const float subnormal = static_cast<float>(k) * kSubnormalStep;
    const float v = k > kMantissaMask ? normal : subnormal;
    return c < 0 ? -v : v;
  }

  // x = m / scale in [-1, 1] (or NaN) as a code, rounded up or down with probability given by the
  // distance: 16 random bits added below the 4 kept mantissa bits of x's pattern, then truncated;
  // under 2**-6, x * 2**10 plus a uniform in [0, 1) truncated to an integer. NaN is code 0.
  static LION_INLINE int8_t encode(float x, uint32_t noise) {
    const float a = std::fabs(x);
    const uint32_t kept = (bits_of(a) + (noise << (kDropped - 16))) & ~((1u << kDropped) - 1);
    const int32_t normal = ((static_cast<int32_t>(kept >> 23) - static_cast<int32_t>(kRebias)) << kMantissaBits) +
                           static_cast<int32_t>((kept >> kDropped) & kMantissaMask);
    const bool low = a < kSubnormalLimit;
    const float small = low ? a : 0.f;
    const auto subnormal =
        static_cast<int32_t>(std::floor(small * kSubnormalScale + static_cast<float>(noise) * 0x1p-16f));
    int32_t k = low ? subnormal : normal;
    k = x != x ? 0 : k;
    return static_cast<int8_t>(x < 0.f ? -k : k);
  }

#if defined(LION_FP16_AVX512)
  // value() and encode() on 16 lanes (AVX-512 F, BW and VL, which the fp16 path needs too), the same
  // values bit for bit: the compiler's own vectorisation of the scalar ones spends several times the
  // instructions on their selects and conversions.

  // Codes as fp32: a magnitude's 3 exponent and 4 mantissa bits, shifted to the top of an fp16's
  // exponent and mantissa fields, are an fp16 of value(code) * 2**-8 (fp16's bias is 15, not kTop; the
  // codes below 16 become fp16 subnormals, k * 2**-18), which the CPU widens exactly (VCVTPH2PS takes
  // subnormals whatever MXCSR says, where an fp32 subnormal would be read as 0 under DAZ). halves32
  // makes those fp16s of 32 codes; scaled16 widens 16 of them and multiplies by their block's scale,
  // value(code) * scale bit for bit: `shifted_scale` is scale * 2**(15 - kTop), one product per
  // block; where it is exact (finite), half * shifted_scale is the same real number as value(code) *
  // scale, so it rounds the same; a scale so large that it overflows takes the two products.
  static constexpr float kHalfToValue = pow2(15 - kTopInt);
  static LION_INLINE __m512i halves32(__m256i codes) {
    const __m512i c = _mm512_cvtepi8_epi16(codes);
    const __m512i shifted = _mm512_slli_epi16(_mm512_abs_epi16(c), 10 - kMantissaBits);
    static_assert(kExponentBits <= 5 && kMantissaBits <= 10, "a code's fields fit an fp16's");
    return _mm512_ternarylogic_epi32(shifted, c, _mm512_set1_epi16(INT16_MIN), 0xF8);  // a | (b & c)
  }
  struct OldScale {  // a block's scale as scaled16 takes it
    __m512 scale, shifted_scale;
    bool shifted_is_exact;
    explicit OldScale(float s)
        : scale(_mm512_set1_ps(s)), shifted_scale(_mm512_set1_ps(s * kHalfToValue)),
          shifted_is_exact(!(std::isinf(s * kHalfToValue) && !std::isinf(s))) {}
  };
  static LION_INLINE __m512 scaled16(__m256i halves, const OldScale& old) {
    const __m512 widened = _mm512_cvtph_ps(halves);
    if (old.shifted_is_exact) return _mm512_mul_ps(widened, old.shifted_scale);
    return _mm512_mul_ps(_mm512_mul_ps(widened, _mm512_set1_ps(kHalfToValue)), old.scale);
  }

  // x / scale, correctly rounded as the division rounds it, from the block's reciprocal r = 1 / scale
  // (one division, correctly rounded) and fused multiply-adds: q = x * r is within two units in the
  // last place; one correction q + (x - q * scale) * r makes it faithful (within one), and a second
  // is then the correctly rounded quotient (Markstein's theorem), provided nothing underflows or
  // overflows. That holds for a scale in [2**-50, 2**100] and a quotient of at least 2**-50 in
  // magnitude; a smaller quotient may be off, but encode codes every x under 2**-50 as 0 whatever
  // its low bits, as it does the true quotient. (In the default floating-point mode: with flush to
  // zero the remainders of small quotients would flush.) A scale outside that range divides.
  static constexpr uint32_t kReciprocalLow = (127u - 50u) << 23, kReciprocalHigh = (127u + 100u) << 23;
  static LION_INLINE bool divides_by_reciprocal(uint32_t scale_bits) {
    return scale_bits >= kReciprocalLow && scale_bits <= kReciprocalHigh;
  }
  static LION_INLINE __m512 quotient16(__m512 x, __m512 scale, __m512 reciprocal) {
    const __m512 q0 = _mm512_mul_ps(x, reciprocal);
    const __m512 q1 = _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, scale, x), reciprocal, q0);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(q1, scale, x), reciprocal, q1);
  }
  struct NewScale {  // a block's new scale (its absmax's bits, not 0) as code16 takes it
    __m512 scale, reciprocal;
    bool by_reciprocal;
    explicit NewScale(uint32_t absmax)
        : scale(_mm512_set1_ps(float_of(absmax))), reciprocal(_mm512_set1_ps(1.f / float_of(absmax))),
          by_reciprocal(divides_by_reciprocal(absmax)) {}
  };

  // 16 values of x = m / scale as codes, one per 32-bit lane; `noise`: 16 random bits per lane. A
  // NaN lane is made 0 first, which codes as 0 on the linear path (a caller whose block has a finite
  // nonzero scale, so no NaN quotient, passes kMayBeNaN = false). The normal code is the noisy pattern
  // shifted down to its exponent and 4 mantissa bits less the re-bias (the scalar sum, modulo 2**32 as
  // it is; the bits the scalar code masks off are shifted out); the subnormal's floor is the
  // conversion rounding down.
  template <bool kMayBeNaN>
  static LION_INLINE __m512i codes16(__m512 x, __m512i noise) {
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i a = kMayBeNaN ? _mm512_maskz_and_epi32(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), _mm512_castps_si512(x), magnitude)
                                : _mm512_and_si512(_mm512_castps_si512(x), magnitude);
    const __m512i noisy = _mm512_add_epi32(a, _mm512_slli_epi32(noise, kDropped - 16));
    const __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(noisy, kDropped), _mm512_set1_epi32(kRebias << kMantissaBits));
    const __mmask16 low = _mm512_cmp_ps_mask(_mm512_castsi512_ps(a), _mm512_set1_ps(kSubnormalLimit), _CMP_LT_OQ);
    const __m512 sum = _mm512_add_ps(_mm512_maskz_mul_ps(low, _mm512_castsi512_ps(a), _mm512_set1_ps(kSubnormalScale)),
                                     _mm512_mul_ps(_mm512_cvtepi32_ps(noise), _mm512_set1_ps(0x1p-16f)));
    const __m512i subnormal = _mm512_cvt_roundps_epi32(sum, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512i k = _mm512_mask_blend_epi32(low, normal, subnormal);
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_sub_epi32(k, negative, _mm512_setzero_si512(), k);
  }
  // codes16 of x / scale (a finite nonzero scale in the reciprocal's range gives no NaN quotient).
  static LION_INLINE __m512i code16(__m512 x, const NewScale& s, __m512i noise) {
    return s.by_reciprocal ? codes16<false>(quotient16(x, s.scale, s.reciprocal), noise)
                           : codes16<true>(_mm512_div_ps(x, s.scale), noise);
  }
#endif
};

LION_INLINE float sign_of(float c) { return static_cast<float>(c > 0.f) - static_cast<float>(c < 0.f); }

// All ones where x is NaN or inf (exponent all ones), else 0.
LION_INLINE uint32_t nonfinite_mask(float x) { return 0u - static_cast<uint32_t>((bits_of(x) & 0x7f800000u) == 0x7f800000u); }

// The new stored value where the gradient is finite, else the old one, bit for bit: a blend of
// bit patterns, not a select on a float comparison, so that it vectorises.
template <class T>
LION_INLINE T keep_where(uint32_t bad, T updated, T old) {
  if constexpr (sizeof(T) == 4) {
    return float_of((bits_of(updated) & ~bad) | (bits_of(old) & bad));
  } else {
    return static_cast<T>((updated & ~bad) | (old & bad));
  }
}

// The momentum of element i as fp32: an 8-bit one through its block's scale.
template <class M>
LION_INLINE float load_momentum(const typename M::T* m, const float* scale, int64_t i) {
  if constexpr (std::is_same_v<M, Q8>) {
    return Q8::value(m[i]) * scale[i >> Q8::kBlockShift];
  } else {
    return M::load(m[i]);
  }
}

// Elements of [begin, end) whose update agrees in sign with the gradient (cautious Lion).
template <class G, class M>
int64_t count_agreeing(const void* g_, const void* m_, const void* scale_, int64_t begin, int64_t end,
                       const Hyper& h) {
  const auto* __restrict g = static_cast<const typename G::T*>(g_);
  const auto* __restrict m = static_cast<const typename M::T*>(m_);
  const auto* __restrict scale = static_cast<const float*>(scale_);
  int64_t count = 0;
  for (int64_t i = begin; i < end; ++i) {
    const float gi = G::load(g[i]) * h.grad_sign;
    const float u = sign_of(load_momentum<M>(m, scale, i) * h.beta1 + gi * h.one_minus_beta1);
    count += (u * gi > 0.f);
  }
  return count;
}

// The update of [begin, end) of one tensor. `fraction` is its agreeing fraction (cautious only),
// the seeds its stochastic-rounding seeds, `skip` all ones under nonfinite_grad="skip_elements".
// Branch-free, so that it vectorises; the non-finite check costs no extra pass over memory.
// `index_offset` is added to an element's index in the tensor for its random bits (a caller passing
// pointers into the middle of a tensor).
template <class P, class G, class M, int kRounding, bool kCautious>
void update_elements_portable(void* p_, const void* g_, void* m_, void* c_, int64_t begin, int64_t end,
                              const Hyper& h, float fraction, uint32_t p_seed, uint32_t m_seed, uint32_t skip,
                              int64_t index_offset) {
  auto* __restrict p = static_cast<typename P::T*>(p_);
  const auto* __restrict g = static_cast<const typename G::T*>(g_);
  auto* __restrict m = static_cast<typename M::T*>(m_);
  auto* __restrict c = static_cast<typename P::T*>(c_);
  for (int64_t i = begin; i < end; ++i) {
    const float gi = G::load(g[i]) * h.grad_sign;
    const float mi = M::load(m[i]);
    const float pi = P::load(p[i]);
    float wi = pi;
    if constexpr (kRounding == kKahan) wi = pi + P::load(c[i]);
    float u = sign_of(mi * h.beta1 + gi * h.one_minus_beta1);
    if constexpr (kCautious) u = u * static_cast<float>(u * gi > 0.f) / fraction;
    const float new_w = wi * h.decay - u * h.lr;
    const float new_m = mi * h.beta2 + gi * h.one_minus_beta2;
    typename P::T new_p;
    if constexpr (kRounding == kStochastic) {
      new_p = P::stochastic(new_w, random_bits16(i + index_offset, p_seed));
    } else {
      new_p = P::nearest(new_w);
    }
    const uint32_t bad = nonfinite_mask(gi) & skip;
    if constexpr (kRounding == kKahan) c[i] = keep_where(bad, P::nearest(new_w - P::load(new_p)), c[i]);
    p[i] = keep_where(bad, new_p, p[i]);
    m[i] = keep_where(bad, M::stochastic(new_m, random_bits16(i + index_offset, m_seed)), m[i]);
  }
}

#if defined(LION_FP16_AVX512)
// bf16 params, grads or momenta on 16 lanes of AVX-512 intrinsics. The portable loop vectorises,
// but for a bf16 step the compiler's loop spends most of its instructions on the random bits (the
// element index in 64-bit lanes, the hash in 32-bit ones with two vpmulld each) and on shuffles;
// here the random bits of 16 elements are one load from a table. The arithmetic is the portable
// loop's, operation for operation (separate mul and add intrinsics, no FMA), and so are the
// roundings: bf16 conversions are integer operations on the fp32 bit pattern, not vcvtneps2bf16,
// which flushes subnormal inputs to zero. A NaN is stored as the quiet 0x7FC0 by both loops (torch's
// conversion may keep another NaN pattern: the NaN payload is not part of the bit-for-bit promise).
template <class S>
constexpr bool kVectorStorage = std::is_same_v<S, Fp32> || std::is_same_v<S, Bf16>;

// numerics.random_bits16 looked up rather than hashed: the hash of every 16-bit value, in a table
// built when the library loads (128 KiB, which stays in the L2 cache while a step streams its
// tensors), padded so that 32 consecutive elements are one unaligned load wherever they start.
struct RandomBitsTable {
  static constexpr int64_t kSize = (1 << 16) + 32;
  alignas(64) uint16_t bits[kSize];
  RandomBitsTable() {
    for (int64_t x = 0; x < kSize; ++x) bits[x] = static_cast<uint16_t>(random_bits16(x, 0));
  }
};
const RandomBitsTable kRandomBits;

// numerics.random_bits16 of 16 consecutive elements from `first`, as 32-bit lanes.
LION_INLINE __m512i random_bits16_x16(int64_t first, uint32_t seed) {
  const uint16_t* at = kRandomBits.bits + ((first + seed) & 0xFFFF);
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
}

// numerics.random_bits16 of 32 consecutive elements from `first`, as 16-bit lanes.
LION_INLINE __m512i random_bits16_x32(int64_t first, uint32_t seed) {
  return _mm512_loadu_si512(kRandomBits.bits + ((first + seed) & 0xFFFF));
}

template <class S>
LION_INLINE __m512 load16(const typename S::T* x) {
  if constexpr (std::is_same_v<S, Bf16>) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  } else {
    return _mm512_loadu_ps(x);
  }
}

// Bf16::nearest and Bf16::stochastic on 16 lanes, as 32-bit lanes holding the bf16 pattern.
LION_INLINE __m512i bf16_nearest_x16(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), odd), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

LION_INLINE __m512i bf16_stochastic_x16(__m512 x, __m512i noise) {
  const __m512i noisy = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(x), noise), 16);
  return _mm512_mask_mov_epi32(noisy, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// Store 16 fp32 lanes as S (rounded as kRounding says, `noise` its random bits), except where `bad`
// is set: there the old bits stay. Returns the stored values as fp32.
template <class S, int kRounding>
LION_INLINE __m512 store16(typename S::T* x, __m512 value, __m512i noise, __mmask16 bad) {
  if constexpr (std::is_same_v<S, Bf16>) {
    const __m512i rounded = kRounding == kStochastic ? bf16_stochastic_x16(value, noise) : bf16_nearest_x16(value);
    auto* at = reinterpret_cast<__m256i*>(x);
    _mm256_storeu_si256(at, _mm256_mask_blend_epi16(bad, _mm512_cvtepi32_epi16(rounded), _mm256_loadu_si256(at)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(rounded, 16));
  } else {
    _mm512_storeu_ps(x, _mm512_mask_blend_ps(bad, value, _mm512_loadu_ps(x)));
    return value;
  }
}

// sign_of on 16 lanes in one instruction: VFIXUPIMMPS maps each lane's class to a constant, +0 for
// NaN and zero, -1 for a negative number or -inf, +1 for a positive one or +inf (one 4-bit answer
// per class, from QNaN up: +0, +0, +0, +1 (the value 1.0), -1, +1, -1, +1).
LION_INLINE __m512 sign16(__m512 x) {
  return _mm512_fixupimm_ps(x, x, _mm512_set1_epi32(static_cast<int32_t>(0xA9A9A888u)), 0);
}

// The portable loop's update of elements [begin, begin + 16 * (n / 16)), n = end - begin.
template <class P, class G, class M, int kRounding, bool kCautious>
int64_t update_elements_x16(void* p_, const void* g_, void* m_, void* c_, int64_t begin, int64_t end, const Hyper& h,
                            float fraction, uint32_t p_seed, uint32_t m_seed, uint32_t skip, int64_t index_offset) {
  auto* __restrict p = static_cast<typename P::T*>(p_);
  const auto* __restrict g = static_cast<const typename G::T*>(g_);
  auto* __restrict m = static_cast<typename M::T*>(m_);
  auto* __restrict c = static_cast<typename P::T*>(c_);
  const __m512 grad_sign = _mm512_set1_ps(h.grad_sign), beta1 = _mm512_set1_ps(h.beta1);
  const __m512 one_minus_beta1 = _mm512_set1_ps(h.one_minus_beta1), beta2 = _mm512_set1_ps(h.beta2);
  const __m512 one_minus_beta2 = _mm512_set1_ps(h.one_minus_beta2), decay = _mm512_set1_ps(h.decay);
  const __m512 lr = _mm512_set1_ps(h.lr), one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  const __m512 cautious_fraction = _mm512_set1_ps(fraction);
  const __m512i exponent = _mm512_set1_epi32(0x7F800000);
  const __m512i no_noise = _mm512_setzero_si512();
  const int64_t stop = begin + (end - begin) / 16 * 16;
  for (int64_t i = begin; i < stop; i += 16) {
    const __m512 gi = _mm512_mul_ps(load16<G>(g + i), grad_sign);
    const __m512 mi = load16<M>(m + i);
    __m512 wi = load16<P>(p + i);
    if constexpr (kRounding == kKahan) wi = _mm512_add_ps(wi, load16<P>(c + i));
    const __m512 interpolated = _mm512_add_ps(_mm512_mul_ps(mi, beta1), _mm512_mul_ps(gi, one_minus_beta1));
    __m512 u = sign16(interpolated);
    if constexpr (kCautious) {
      const __m512 agree = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_mul_ps(u, gi), zero, _CMP_GT_OQ), one);
      u = _mm512_div_ps(_mm512_mul_ps(u, agree), cautious_fraction);
    }
    const __m512 step = _mm512_mul_ps(u, lr);
    const __m512 new_w = _mm512_sub_ps(_mm512_mul_ps(wi, decay), step);
    const __m512 new_m = _mm512_add_ps(_mm512_mul_ps(mi, beta2), _mm512_mul_ps(gi, one_minus_beta2));
    __mmask16 bad = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(gi), exponent), exponent);
    if (!skip) bad = 0;
    const __m512i p_noise = kRounding == kStochastic ? random_bits16_x16(i + index_offset, p_seed) : no_noise;
    const __m512 stored = store16<P, kRounding == kStochastic ? kStochastic : kNearest>(p + i, new_w, p_noise, bad);
    if constexpr (kRounding == kKahan) store16<P, kNearest>(c + i, _mm512_sub_ps(new_w, stored), no_noise, bad);
    const __m512i m_noise = std::is_same_v<M, Bf16> ? random_bits16_x16(i + index_offset, m_seed) : no_noise;
    store16<M, kStochastic>(m + i, new_m, m_noise, bad);
  }
  return stop;
}
#endif

// The update of [begin, end) of one tensor: the AVX-512 loop where the CPU has it and a bf16
// array is involved (then the portable loop takes the last n % 16 elements), else the portable one.
template <class P, class G, class M, int kRounding, bool kCautious>
void update_elements(void* p, const void* g, void* m, void* c, int64_t begin, int64_t end, const Hyper& h,
                     float fraction, uint32_t p_seed, uint32_t m_seed, uint32_t skip, int64_t index_offset = 0) {
#if defined(LION_FP16_AVX512)
  if constexpr (kVectorStorage<P> && kVectorStorage<G> && kVectorStorage<M> &&
                (std::is_same_v<P, Bf16> || std::is_same_v<G, Bf16> || std::is_same_v<M, Bf16>)) {
    begin = update_elements_x16<P, G, M, kRounding, kCautious>(p, g, m, c, begin, end, h, fraction, p_seed, m_seed,
                                                               skip, index_offset);
  }
#endif
  update_elements_portable<P, G, M, kRounding, kCautious>(p, g, m, c, begin, end, h, fraction, p_seed, m_seed, skip,
                                                          index_offset);
}

#if defined(LION_FP16_AVX512)
// fp16 params with the CPU's own conversions (F16C, at AVX-512 width): the software conversions the
// portable loop needs are several times the arithmetic of the update itself. A block is staged
// through fp32 scratch arrays in cache: widen p (+ its Kahan residual) and an fp16 grad, run the
// fp32 update (which stores the momentum), then round the new weights back. The arithmetic and
// the roundings are those of the portable loop, bit for bit: vcvtps2ph rounds to nearest even as
// torch's conversion does, and stochastic rounding divides as numerics.py divides.
constexpr int64_t kChunk = 512;

LION_INLINE __m512i hash16(__m512i index, __m512i seed) {
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  __m512i x = _mm512_and_si512(_mm512_add_epi32(_mm512_and_si512(index, low16), seed), low16);
  x = _mm512_and_si512(_mm512_mullo_epi32(_mm512_xor_si512(x, _mm512_srli_epi32(x, 8)), _mm512_set1_epi32(0x6D2B)), low16);
  x = _mm512_and_si512(_mm512_mullo_epi32(_mm512_xor_si512(x, _mm512_srli_epi32(x, 7)), _mm512_set1_epi32(0x5A35)), low16);
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 8));
}

LION_INLINE __m512 widen(const uint16_t* h) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))); }

LION_INLINE __m256i narrow_nearest(__m512 x) { return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// numerics.stochastic_round_to_fp16 on 16 lanes. The spacing of adjacent fp16 values is a power of
// two (or inf past 65504, or NaN beside a zero): scaling |x - nearest| by its exponent is the
// division, exactly, and gives 0 or NaN where the division does (then the nearest value stays).
LION_INLINE __m256i narrow_stochastic(__m512 x, __m512i noise) {
  const __m256i near = narrow_nearest(x);
  const __m512 near32 = _mm512_cvtph_ps(near);
  const __mmask16 away = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_abs_ps(near32), _CMP_GT_OQ);
  const __m256i other = _mm256_add_epi16(near, _mm256_mask_blend_epi16(away, _mm256_set1_epi16(-1), _mm256_set1_epi16(1)));
  const __m512 spacing = _mm512_sub_ps(_mm512_cvtph_ps(other), near32);
  const __m512 prob = _mm512_scalef_ps(_mm512_abs_ps(_mm512_sub_ps(x, near32)),
                                       _mm512_sub_ps(_mm512_setzero_ps(), _mm512_getexp_ps(spacing)));
  const __m512 uniform = _mm512_mul_ps(_mm512_cvtepi32_ps(noise), _mm512_set1_ps(0x1p-16f));
  return _mm256_mask_blend_epi16(_mm512_cmp_ps_mask(uniform, prob, _CMP_LT_OQ), near, other);
}

template <class G, class M, int kRounding, bool kCautious>
void update_elements_fp16(uint16_t* p, const typename G::T* g, void* m, uint16_t* c, int64_t begin, int64_t end,
                          const Hyper& h, float fraction, uint32_t p_seed, uint32_t m_seed, uint32_t skip) {
  alignas(64) float w[kChunk];
  alignas(64) float g32[kChunk];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t n = end - start < kChunk ? end - start : kChunk;
    const int64_t vectors = n / 16 * 16;
    for (int64_t j = 0; j < vectors; j += 16) {
      __m512 wj = widen(p + start + j);
      if constexpr (kRounding == kKahan) wj = _mm512_add_ps(wj, widen(c + start + j));
      _mm512_store_ps(w + j, wj);
      if constexpr (std::is_same_v<G, Fp16>) _mm512_store_ps(g32 + j, widen(g + start + j));
    }
    for (int64_t j = vectors; j < n; ++j) {
      w[j] = Fp16::load(p[start + j]);
      if constexpr (kRounding == kKahan) w[j] = w[j] + Fp16::load(c[start + j]);
      if constexpr (std::is_same_v<G, Fp16>) g32[j] = Fp16::load(g[start + j]);
    }
    const float* grads = std::is_same_v<G, Fp16> ? g32 : reinterpret_cast<const float*>(g) + start;
    update_elements<Fp32, Fp32, M, kNearest, kCautious>(w, grads, static_cast<typename M::T*>(m) + start, nullptr, 0,
                                                        n, h, fraction, 0, m_seed, skip, start);
    for (int64_t j = 0; j < vectors; j += 16) {
      const __m512 new_w = _mm512_load_ps(w + j);
      __m256i new_p;
      if constexpr (kRounding == kStochastic) {
        const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>((start + j) & 0xFFFF)), lane);
        new_p = narrow_stochastic(new_w, hash16(index, _mm512_set1_epi32(static_cast<int32_t>(p_seed))));
      } else {
        new_p = narrow_nearest(new_w);
      }
      // Where the gradient is NaN or inf (and skipped), the param and its residual keep their bits.
      const __m512i grad_bits = _mm512_castps_si512(_mm512_loadu_ps(grads + j));
      const __m512i exponent = _mm512_set1_epi32(0x7F800000);
      __mmask16 bad = _mm512_cmpeq_epi32_mask(_mm512_and_si512(grad_bits, exponent), exponent);
      if (!skip) bad = 0;
      auto* p_at = reinterpret_cast<__m256i*>(p + start + j);
      if constexpr (kRounding == kKahan) {
        auto* c_at = reinterpret_cast<__m256i*>(c + start + j);
        const __m256i new_c = narrow_nearest(_mm512_sub_ps(new_w, _mm512_cvtph_ps(new_p)));
        _mm256_storeu_si256(c_at, _mm256_mask_blend_epi16(bad, new_c, _mm256_loadu_si256(c_at)));
      }
      _mm256_storeu_si256(p_at, _mm256_mask_blend_epi16(bad, new_p, _mm256_loadu_si256(p_at)));
    }
    for (int64_t j = vectors; j < n; ++j) {
      const int64_t i = start + j;
      const uint16_t new_p = kRounding == kStochastic ? Fp16::stochastic(w[j], random_bits16(i, p_seed))
                                                      : Fp16::nearest(w[j]);
      const uint32_t bad = nonfinite_mask(grads[j]) & skip;
      if constexpr (kRounding == kKahan) c[i] = keep_where(bad, Fp16::nearest(w[j] - Fp16::load(new_p)), c[i]);
      p[i] = keep_where(bad, new_p, p[i]);
    }
  }
}
#endif

// The update of [begin, end) of one tensor: the fp16 path with the CPU's conversions where it
// has them, else the portable loop.
template <class P, class G, class M, int kRounding, bool kCautious>
void update_block(void* p, const void* g, void* m, void* c, int64_t begin, int64_t end, const Hyper& h,
                  float fraction, uint32_t p_seed, uint32_t m_seed, uint32_t skip) {
#if defined(LION_FP16_AVX512)
  if constexpr (std::is_same_v<P, Fp16>) {
    return update_elements_fp16<G, M, kRounding, kCautious>(
        static_cast<uint16_t*>(p), static_cast<const typename G::T*>(g), m, static_cast<uint16_t*>(c), begin, end, h,
        fraction, p_seed, m_seed, skip);
  }
#endif
  update_elements<P, G, M, kRounding, kCautious>(p, g, m, c, begin, end, h, fraction, p_seed, m_seed, skip);
}

// How far ahead of the block it works on the 8-bit path asks for memory, in elements. Its
// arithmetic per block is long enough that the CPU's own prefetchers, which follow the loads,
// fall behind and leave memory idle while it codes; asking for a later block's lines first
// overlaps that block's memory traffic with this block's arithmetic.
constexpr int64_t kPrefetchAhead = 2 * kScaleBlock;

// Prefetches the lines of the 8-bit path's block at `start` (if it is before `end`): param (for
// writing), grad, codes, and the residual under Kahan summation.
template <class P, class G, int kRounding>
LION_INLINE void prefetch_q8_block(const typename P::T* p, const typename G::T* g, const int8_t* m,
                                   const typename P::T* c, int64_t start, int64_t end) {
  if (start >= end) return;
  constexpr int64_t kLine = 64;
  const int64_t n = end - start < kScaleBlock ? end - start : kScaleBlock;
  const auto* p_bytes = reinterpret_cast<const char*>(p + start);
  const auto* g_bytes = reinterpret_cast<const char*>(g + start);
  for (int64_t k = 0; k < n * static_cast<int64_t>(sizeof(*p)); k += kLine) __builtin_prefetch(p_bytes + k, 1, 3);
  for (int64_t k = 0; k < n * static_cast<int64_t>(sizeof(*g)); k += kLine) __builtin_prefetch(g_bytes + k, 0, 3);
  for (int64_t k = 0; k < n; k += kLine) __builtin_prefetch(m + start + k, 1, 3);
  if constexpr (kRounding == kKahan) {
    const auto* c_bytes = reinterpret_cast<const char*>(c + start);
    for (int64_t k = 0; k < n * static_cast<int64_t>(sizeof(*c)); k += kLine) __builtin_prefetch(c_bytes + k, 1, 3);
  }
}

#if defined(LION_FP16_AVX512)
// One whole block of a pure bf16 tensor (bf16 param and grad) with an 8-bit momentum, not cautious:
// update_block_q8's passes fused where they can be, on 32 elements at a time in the lane order that
// unpacking 16-bit values gives (32-bit lanes of elements 0-3, 8-11, 16-19, 24-27, then 4-7, 12-15,
// 20-23, 28-31: one instruction per 16 widened bf16s, where widening in order takes two), which
// packing restores. The codes are put in that order by one dword permutation, the random bits by the
// same unpacking, and the scratch momentum holds it. The arithmetic and roundings are
// update_elements_x16's and update_block_q8's, operation for operation.
template <int kRounding, bool kMaximize>
void update_block_q8_bf16(uint16_t* p, const uint16_t* g, int8_t* m, uint16_t* c, float* scale, int64_t start,
                          const Hyper& h, uint32_t p_seed, uint32_t m_seed, uint32_t skip) {
  alignas(64) float m32[Q8::kBlockSize];
  const __m512 grad_sign = _mm512_set1_ps(h.grad_sign), beta1 = _mm512_set1_ps(h.beta1);
  const __m512 one_minus_beta1 = _mm512_set1_ps(h.one_minus_beta1), beta2 = _mm512_set1_ps(h.beta2);
  const __m512 one_minus_beta2 = _mm512_set1_ps(h.one_minus_beta2), decay = _mm512_set1_ps(h.decay);
  const __m512 lr = _mm512_set1_ps(h.lr);
  const __m512i zeros = _mm512_setzero_si512();
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), quiet_nan = _mm512_set1_epi32(0x7FC00000);
  const __m256i unpacked_order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const float old_scale = scale[start >> Q8::kBlockShift];
  const Q8::OldScale old(old_scale);
  __m512i absmax16 = zeros;
  for (int64_t j = 0; j < Q8::kBlockSize; j += 32) {
    const int64_t i = start + j;
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + i));
    const __m512i halves = Q8::halves32(_mm256_permutevar8x32_epi32(codes, unpacked_order));
    const __m512i p_raw = _mm512_loadu_si512(p + i), g_raw = _mm512_loadu_si512(g + i);
    const __m512i p_noise = kRounding == kStochastic ? random_bits16_x32(i, p_seed) : zeros;
    __m512i c_raw = zeros;
    if constexpr (kRounding == kKahan) c_raw = _mm512_loadu_si512(c + i);
    // Whether any of the 32 grads is NaN or inf (a bf16 exponent of all ones), for skip_elements: most
    // runs of 32 have none, and then the elements' non-finite test and the blends that keep old values
    // are left out.
    const __m512i exponent16 = _mm512_set1_epi16(0x7F80);
    const bool any_bad = skip && _mm512_cmpeq_epi16_mask(_mm512_and_si512(g_raw, exponent16), exponent16) != 0;
    __m512i stored[2], residual[2];
    for (int half = 0; half < 2; ++half) {
      const __m512 mi = Q8::scaled16(half ? _mm512_extracti64x4_epi64(halves, 1) : _mm512_castsi512_si256(halves),
                                     old);
      // bf16 values in the high half of 32-bit lanes: their fp32 patterns.
      const __m512i p_bits = half ? _mm512_unpackhi_epi16(zeros, p_raw) : _mm512_unpacklo_epi16(zeros, p_raw);
      // g' = g * grad_sign; times +1 it is g itself, so that product is left out unless maximizing.
      __m512 gi = _mm512_castsi512_ps(half ? _mm512_unpackhi_epi16(zeros, g_raw) : _mm512_unpacklo_epi16(zeros, g_raw));
      if constexpr (kMaximize) gi = _mm512_mul_ps(gi, grad_sign);
      __m512 wi = _mm512_castsi512_ps(p_bits);
      if constexpr (kRounding == kKahan) {
        wi = _mm512_add_ps(wi, _mm512_castsi512_ps(half ? _mm512_unpackhi_epi16(zeros, c_raw)
                                                          : _mm512_unpacklo_epi16(zeros, c_raw)));
      }
      const __m512 interpolated = _mm512_add_ps(_mm512_mul_ps(mi, beta1), _mm512_mul_ps(gi, one_minus_beta1));
      const __m512 step = _mm512_mul_ps(sign16(interpolated), lr);
      const __m512 new_w = _mm512_sub_ps(_mm512_mul_ps(wi, decay), step);
      const __m512 new_m = _mm512_add_ps(_mm512_mul_ps(mi, beta2), _mm512_mul_ps(gi, one_minus_beta2));
      // nonfinite_mask: NaN or inf (quiet or signalling NaN, +inf, -inf).
      const __mmask16 bad = any_bad ? _mm512_fpclass_ps_mask(gi, 0x99) : 0;
      // The new param's bf16 pattern in the high half of the lane (Bf16::stochastic / nearest before
      // their shift), a NaN as the quiet 0x7FC0.
      const __m512i w_bits = _mm512_castps_si512(new_w);
      __m512i rounded;
      if constexpr (kRounding == kStochastic) {
        const __m512i noise = half ? _mm512_unpackhi_epi16(p_noise, zeros) : _mm512_unpacklo_epi16(p_noise, zeros);
        rounded = _mm512_add_epi32(w_bits, noise);
      } else {
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(w_bits, 16), _mm512_set1_epi32(1));
        rounded = _mm512_add_epi32(_mm512_add_epi32(w_bits, _mm512_set1_epi32(0x7FFF)), odd);
      }
      rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(new_w, new_w, _CMP_UNORD_Q), quiet_nan);
      __m512i kept_p = rounded;
      __m512 kept_m = new_m;
      if (any_bad) {
        kept_p = _mm512_mask_blend_epi32(bad, rounded, p_bits);
        kept_m = _mm512_mask_blend_ps(bad, new_m, mi);
      }
      stored[half] = _mm512_srli_epi32(kept_p, 16);
      if constexpr (kRounding == kKahan) {
        const __m512 kept = _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
        const __m512i c_bits = half ? _mm512_unpackhi_epi16(zeros, c_raw) : _mm512_unpacklo_epi16(zeros, c_raw);
        __m512i new_c = _mm512_slli_epi32(bf16_nearest_x16(_mm512_sub_ps(new_w, kept)), 16);
        if (any_bad) new_c = _mm512_mask_blend_epi32(bad, new_c, c_bits);
        residual[half] = _mm512_srli_epi32(new_c, 16);
      }
      _mm512_store_ps(m32 + j + 16 * half, kept_m);
      absmax16 = _mm512_max_epu32(absmax16, _mm512_and_si512(_mm512_castps_si512(kept_m), magnitude));
    }
    _mm512_storeu_si512(p + i, _mm512_packus_epi32(stored[0], stored[1]));
    if constexpr (kRounding == kKahan) _mm512_storeu_si512(c + i, _mm512_packus_epi32(residual[0], residual[1]));
  }
  const uint32_t absmax = _mm512_reduce_max_epu32(absmax16);
  const float new_scale = float_of(absmax);
  scale[start >> Q8::kBlockShift] = new_scale;
  if (absmax == 0) {
    std::memset(m + start, 0, Q8::kBlockSize);
    return;
  }
  const Q8::NewScale divisor(absmax);
  for (int64_t j = 0; j < Q8::kBlockSize; j += 32) {
    const __m512i noise = random_bits16_x32(start + j, m_seed);
    __m512i k[2];
    for (int half = 0; half < 2; ++half) {
      const __m512 x = _mm512_load_ps(m32 + j + 16 * half);
      const __m512i bits = half ? _mm512_unpackhi_epi16(noise, zeros) : _mm512_unpacklo_epi16(noise, zeros);
      k[half] = Q8::code16(x, divisor, bits);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(m + start + j), _mm512_cvtepi16_epi8(_mm512_packs_epi32(k[0], k[1])));
  }
}
#endif

// The update of [begin, end) of one tensor with an 8-bit momentum (begin a multiple of the
// scales' block), block by block: its codes widened to fp32 in a scratch block, the portable update
// of the same roundings with that fp32 momentum (where a gradient is skipped, the element keeps its
// widened value), then the block's new scale (the absmax, on bit patterns as numerics.py takes it,
// so a NaN wins) and its codes. Bit for bit numerics.lion_tensor with quantize_momentum. With
// AVX-512 the widening, the absmax and the coding run 16 lanes at a time (Q8::halves32, scaled16,
// quotient16, code16, the random bits looked up as the bf16 loop looks them up), the scalar code
// taking a partial block's last elements; the block stays in L1 between the passes; a whole block of
// a pure bf16 tensor takes update_block_q8_bf16. A block whose momentum is all zeros (scale 0: every
// quotient 0 / 0 is NaN, coded 0) is coded 0 without its last pass.
template <class P, class G, int kRounding, bool kCautious>
void update_block_q8(void* p_, const void* g_, void* m_, void* c_, void* scale_, int64_t begin, int64_t end,
                     const Hyper& h, float fraction, uint32_t p_seed, uint32_t m_seed, uint32_t skip) {
  auto* p = static_cast<typename P::T*>(p_);
  const auto* g = static_cast<const typename G::T*>(g_);
  auto* __restrict m = static_cast<int8_t*>(m_);
  auto* c = static_cast<typename P::T*>(c_);
  auto* __restrict scale = static_cast<float*>(scale_);
  alignas(64) float m32[Q8::kBlockSize];
  for (int64_t start = begin; start < end; start += Q8::kBlockSize) {
    const int64_t n = end - start < Q8::kBlockSize ? end - start : Q8::kBlockSize;
    const int64_t block = start >> Q8::kBlockShift;
    prefetch_q8_block<P, G, kRounding>(p, g, m, c, start + kPrefetchAhead, end);
#if defined(LION_FP16_AVX512)
    if constexpr (std::is_same_v<P, Bf16> && std::is_same_v<G, Bf16> && !kCautious) {
      if (n == Q8::kBlockSize) {
        if (h.grad_sign == 1.f) {
          update_block_q8_bf16<kRounding, false>(p, g, m, c, scale, start, h, p_seed, m_seed, skip);
        } else {
          update_block_q8_bf16<kRounding, true>(p, g, m, c, scale, start, h, p_seed, m_seed, skip);
        }
        continue;
      }
    }
#endif
    const float old_scale = scale[block];
    int64_t j = 0;
#if defined(LION_FP16_AVX512)
    const Q8::OldScale old(old_scale);
    for (; j + 32 <= n; j += 32) {
      const __m512i halves = Q8::halves32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + start + j)));
      _mm512_store_ps(m32 + j, Q8::scaled16(_mm512_castsi512_si256(halves), old));
      _mm512_store_ps(m32 + j + 16, Q8::scaled16(_mm512_extracti64x4_epi64(halves, 1), old));
    }
#endif
    for (; j < n; ++j) m32[j] = Q8::value(m[start + j]) * old_scale;
    update_elements<P, G, Fp32, kRounding, kCautious>(p + start, g + start, m32, c + start, 0, n, h, fraction, p_seed,
                                                      0, skip, start);
    uint32_t absmax = 0;
    j = 0;
#if defined(LION_FP16_AVX512)
    __m512i absmax16 = _mm512_setzero_si512();
    for (; j + 16 <= n; j += 16) {
      absmax16 = _mm512_max_epu32(absmax16, _mm512_and_si512(_mm512_castps_si512(_mm512_load_ps(m32 + j)),
                                                             _mm512_set1_epi32(0x7FFFFFFF)));
    }
    absmax = _mm512_reduce_max_epu32(absmax16);
#endif
    for (; j < n; ++j) {
      const uint32_t a = bits_of(m32[j]) & 0x7FFFFFFFu;
      absmax = a > absmax ? a : absmax;
    }
    const float new_scale = float_of(absmax);
    scale[block] = new_scale;
    if (absmax == 0) {
      std::memset(m + start, 0, static_cast<size_t>(n));
      continue;
    }
    j = 0;
#if defined(LION_FP16_AVX512)
    const Q8::NewScale divisor(absmax);
    for (; j + 16 <= n; j += 16) {
      const __m512i k = Q8::code16(_mm512_load_ps(m32 + j), divisor, random_bits16_x16(start + j, m_seed));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(m + start + j), _mm512_cvtepi32_epi8(k));
    }
#endif
    for (; j < n; ++j) m[start + j] = Q8::encode(m32[j] / new_scale, random_bits16(start + j, m_seed));
  }
}

template <class P, class G, class M, int kRounding>
constexpr int kind_of() {
  return P::kind | (std::is_same_v<G, P> ? 0 : kGradFp32) | (std::is_same_v<M, Bf16> ? kMomentumBf16 : 0) |
         (std::is_same_v<M, Q8> ? kMomentumInt8 : 0) | (kRounding << kRoundingShift);
}

// One block of one tensor, whatever its momentum.
template <class P, class G, class M, int kRounding, bool kCautious>
LION_INLINE void update_tensor_block(void* p, const void* g, void* m, void* c, void* scale, int64_t begin, int64_t end,
                                     const Hyper& h, float fraction, uint32_t p_seed, uint32_t m_seed, uint32_t skip) {
  if constexpr (std::is_same_v<M, Q8>) {
    update_block_q8<P, G, kRounding, kCautious>(p, g, m, c, scale, begin, end, h, fraction, p_seed, m_seed, skip);
  } else {
    update_block<P, G, M, kRounding, kCautious>(p, g, m, c, begin, end, h, fraction, p_seed, m_seed, skip);
  }
}

// Every kind the kernel takes: fp32 params (exact, so one rounding), and bf16 and fp16 params
// with a grad of their dtype or fp32, either momentum and each rounding.
#define LION_ROUNDINGS(X, P, G, M) X(P, G, M, kNearest) X(P, G, M, kStochastic) X(P, G, M, kKahan)
#define LION_LOW_PRECISION_KINDS(X, P) \
  LION_ROUNDINGS(X, P, P, Fp32) LION_ROUNDINGS(X, P, P, Bf16) LION_ROUNDINGS(X, P, P, Q8) \
  LION_ROUNDINGS(X, P, Fp32, Fp32) LION_ROUNDINGS(X, P, Fp32, Bf16) LION_ROUNDINGS(X, P, Fp32, Q8)
#define LION_KINDS(X) \
  X(Fp32, Fp32, Fp32, kNearest) X(Fp32, Fp32, Bf16, kNearest) X(Fp32, Fp32, Q8, kNearest) \
  LION_LOW_PRECISION_KINDS(X, Bf16) LION_LOW_PRECISION_KINDS(X, Fp16)

// One call's tensors. Each tensor belongs to a param group, whose hyperparameters it reads, and
// its kind may carry kCautious (the group's option).
struct Step {
  void* const* params;
  const void* const* grads;
  void* const* exp_avgs;
  void* const* residuals;  // the Kahan residual of each tensor (unused by other kinds)
  void* const* scales;     // the block scales of each 8-bit momentum (unused by other kinds)
  const int64_t* numels;
  const int32_t* kinds;
  const int32_t* groups;   // each tensor's group: its row of `hyper`
  const int32_t* seeds;    // [n_tensors][2]: param, momentum
  const Hyper* hyper;
  uint32_t skip;
  std::vector<int64_t> block_tensor, block_start;
  std::vector<float> fractions;

  int64_t end_of(int64_t b) const {
    const int64_t t = block_tensor[b];
    return block_start[b] + kBlock < numels[t] ? block_start[b] + kBlock : numels[t];
  }
};

constexpr int kCautious = 64;  // a kind bit: the tensor's group is cautious

void update_block_of_kind(const Step& s, int64_t b) {
  const int64_t t = s.block_tensor[b];
  const int64_t begin = s.block_start[b], end = s.end_of(b);
  const Hyper& h = s.hyper[s.groups[t]];
  const float fraction = s.kinds[t] & kCautious ? s.fractions[t] : 1.f;
  const auto p_seed = static_cast<uint32_t>(s.seeds[2 * t]), m_seed = static_cast<uint32_t>(s.seeds[2 * t + 1]);
  switch (s.kinds[t]) {
#define LION_UPDATE_CASES(P, G, M, R)                                                                          \
  case kind_of<P, G, M, R>():                                                                                  \
    return update_tensor_block<P, G, M, R, false>(s.params[t], s.grads[t], s.exp_avgs[t], s.residuals[t],        \
                                                  s.scales[t], begin, end, h, fraction, p_seed, m_seed, s.skip); \
  case kind_of<P, G, M, R>() | kCautious:                                                                      \
    return update_tensor_block<P, G, M, R, true>(s.params[t], s.grads[t], s.exp_avgs[t], s.residuals[t],         \
                                                 s.scales[t], begin, end, h, fraction, p_seed, m_seed, s.skip);
    LION_KINDS(LION_UPDATE_CASES)
#undef LION_UPDATE_CASES
    default:
      return;  // unreachable: lion_hf_cpu_step refuses unknown kinds before any update
  }
}

template <class G>
int64_t count_agreeing_with(int kind, const void* g, const void* m, const void* scale, int64_t begin, int64_t end,
                            const Hyper& h) {
  if (kind & kMomentumInt8) return count_agreeing<G, Q8>(g, m, scale, begin, end, h);
  if (kind & kMomentumBf16) return count_agreeing<G, Bf16>(g, m, scale, begin, end, h);
  return count_agreeing<G, Fp32>(g, m, scale, begin, end, h);
}

int64_t count_agreeing_of_kind(const Step& s, int64_t b) {
  const int64_t t = s.block_tensor[b];
  const int64_t begin = s.block_start[b], end = s.end_of(b);
  const int kind = s.kinds[t];
  const Hyper& h = s.hyper[s.groups[t]];
  const void* g = s.grads[t];
  const void* m = s.exp_avgs[t];
  const void* scale = s.scales[t];
  const int grad = (kind & kGradFp32) ? kParamFp32 : (kind & kParamMask);
  if (grad == kParamBf16) return count_agreeing_with<Bf16>(kind, g, m, scale, begin, end, h);
  if (grad == kParamFp16) return count_agreeing_with<Fp16>(kind, g, m, scale, begin, end, h);
  return count_agreeing_with<Fp32>(kind, g, m, scale, begin, end, h);
}

LION_INLINE bool known_kind(int32_t kind) {
  switch (kind & ~kCautious) {
#define LION_KNOWN_CASE(P, G, M, R) case kind_of<P, G, M, R>():
    LION_KINDS(LION_KNOWN_CASE)
#undef LION_KNOWN_CASE
    return true;
    default:
      return false;
  }
}

}  // namespace

// One Lion step over `n_tensors` tensors of any kinds and groups. `hyper` holds 7 floats per group
// (lr, decay, beta1, 1 - beta1, beta2, 1 - beta2, and -1 to maximize or 1); `scales` the block
// scales of each 8-bit momentum. Returns how many tensors have a kind it does not know; then it
// has updated nothing.
extern "C" int64_t lion_hf_cpu_step(int64_t n_tensors, void* const* params, const void* const* grads,
                                    void* const* exp_avgs, void* const* residuals, void* const* scales,
                                    const int64_t* numels,
                                    const int32_t* kinds, const int32_t* groups, const int32_t* seeds,
                                    const float* hyper, int skip_nonfinite, int n_threads) {
  static_assert(sizeof(Hyper) == 7 * sizeof(float), "Hyper is read from 7 floats per group");
  int64_t unknown = 0;
  bool any_cautious = false;
  for (int64_t t = 0; t < n_tensors; ++t) {
    unknown += !known_kind(kinds[t]);
    any_cautious |= (kinds[t] & kCautious) != 0;
  }
  if (unknown) return unknown;
  Step s{params, grads, exp_avgs, residuals, scales, numels, kinds, groups, seeds, reinterpret_cast<const Hyper*>(hyper),
         skip_nonfinite ? 0xFFFFFFFFu : 0u, {}, {}, {}};
  for (int64_t t = 0; t < n_tensors; ++t) {
    for (int64_t start = 0; start < numels[t]; start += kBlock) {
      s.block_tensor.push_back(t);
      s.block_start.push_back(start);
    }
  }
  const auto n_blocks = static_cast<int64_t>(s.block_tensor.size());
  // A few blocks are not worth waking other threads for.
  if (n_threads < 1 || n_blocks < 4) n_threads = 1;
  if (any_cautious) {
    // A first pass counts each cautious tensor's agreeing elements (over all of them, as torch's
    // mean does; an inf gradient can agree), then the fraction is rounded as torch's
    // agree.mean().clamp(min=1e-3) rounds it.
    std::vector<int64_t> counts(n_blocks, 0);
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t b = 0; b < n_blocks; ++b) {
      if (kinds[s.block_tensor[b]] & kCautious) counts[b] = count_agreeing_of_kind(s, b);
    }
    std::vector<int64_t> agreeing(n_tensors, 0);
    for (int64_t b = 0; b < n_blocks; ++b) agreeing[s.block_tensor[b]] += counts[b];
    s.fractions.assign(n_tensors, 1.f);
    for (int64_t t = 0; t < n_tensors; ++t) {
      if (numels[t] == 0) continue;
      const float fraction = static_cast<float>(agreeing[t]) / static_cast<float>(numels[t]);
      s.fractions[t] = fraction < 1e-3f ? 1e-3f : fraction;
    }
  }
  // Each thread streams one contiguous run of blocks, the runs about equal in elements (a tensor
  // smaller than a block is a block of its own, so equal numbers of blocks can be unequal work).
  std::vector<int64_t> first_block(n_threads + 1, n_blocks);
  first_block[0] = 0;
  int64_t total = 0;
  for (int64_t t = 0; t < n_tensors; ++t) total += numels[t];
  int64_t done = 0;
  for (int64_t b = 0, next = 1; b < n_blocks && next < n_threads; ++b) {
    while (next < n_threads && done >= total / n_threads * next) first_block[next++] = b;
    const int64_t left = numels[s.block_tensor[b]] - s.block_start[b];
    done += left < kBlock ? left : kBlock;
  }
#pragma omp parallel for schedule(static, 1) num_threads(n_threads)
  for (int thread = 0; thread < n_threads; ++thread) {
    for (int64_t b = first_block[thread]; b < first_block[thread + 1]; ++b) update_block_of_kind(s, b);
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Distributed Lion (lion_hf/optim/distributed.py, through dispatch.vote_signs / vote_apply): fp32
// params, grads and momenta only.
//
// Pass 1 (lion_hf_dist_signs) writes the ternary sign of c = m * beta1 + g' * (1 - beta1) of every
// element, packed base 3; pass 2 (lion_hf_dist_apply), once every rank's signs are gathered, sums
// them, votes, and updates the weights and this rank's momentum. The arithmetic is that of the
// torch path (for_loop.for_loop_signs / for_loop_vote_apply: numerics.interpolate and
// numerics.apply_update), operation for operation in fp32 (no FMA: -ffp-contract=off).
//
// The packing (signs.py's module docstring): the elements of a step, tensor after tensor,
// are cut into chunks of 5 * 4096; a chunk of `len` elements packs into S = ceil(len / 5) bytes,
// its element o in byte o % S as digit o / S (weight 3**digit), trit = sign + 1; padding is sign 0.
// Digits are planar so that both passes read and write contiguous runs and vectorise.

#include <algorithm>

namespace {

constexpr int64_t kSignChunkBytes = 4096;
constexpr int64_t kSignChunk = 5 * kSignChunkBytes;

LION_INLINE bool finite_bits(float x) { return (bits_of(x) & 0x7f800000u) != 0x7f800000u; }

// The first global element of each tensor, and the total at the end.
std::vector<int64_t> element_starts(int64_t n_tensors, const int64_t* numels) {
  std::vector<int64_t> starts(n_tensors + 1, 0);
  for (int64_t t = 0; t < n_tensors; ++t) starts[t + 1] = starts[t] + numels[t];
  return starts;
}

// Calls f(tensor, first local element, end local element, offset in the chunk) for each piece of
// a tensor inside the global range [begin, end).
template <class F>
LION_INLINE void for_pieces(const std::vector<int64_t>& starts, int64_t begin, int64_t end, F&& f) {
  const int64_t chunk_begin = begin;
  auto t = static_cast<int64_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
  for (; begin < end; ++t) {
    const int64_t stop = std::min(end, starts[t + 1]);
    if (stop > begin) f(t, begin - starts[t], stop - starts[t], begin - chunk_begin);
    begin = std::max(begin, stop);
  }
}

}  // namespace

// Pass 1. `hyper` holds 3 floats per group (beta1, 1 - beta1, -1 to maximize or 1). With
// `zero_nonfinite` an element whose grad is NaN/inf sends sign 0; with `count_nonfinite` the
// return value is the number of such grads (else 0). Writes ceil(total / 5) bytes at `out`.
extern "C" int64_t lion_hf_dist_signs(int64_t n_tensors, const float* const* grads, const float* const* exp_avgs,
                                      const int64_t* numels, const int32_t* groups, const float* hyper,
                                      int zero_nonfinite, int count_nonfinite, uint8_t* out, int n_threads) {
  const std::vector<int64_t> starts = element_starts(n_tensors, numels);
  const int64_t total = starts[n_tensors];
  const int64_t n_chunks = (total + kSignChunk - 1) / kSignChunk;
  if (n_threads < 1 || n_chunks < 4) n_threads = 1;
  int64_t nonfinite = 0;
#pragma omp parallel for schedule(static) num_threads(n_threads) reduction(+ : nonfinite)
  for (int64_t k = 0; k < n_chunks; ++k) {
    alignas(64) uint8_t trit[kSignChunk];
    const int64_t begin = k * kSignChunk, end = std::min(total, begin + kSignChunk);
    const int64_t bytes = (end - begin + 4) / 5;
    for (int64_t i = end - begin; i < 5 * bytes; ++i) trit[i] = 1;
    for_pieces(starts, begin, end, [&](int64_t t, int64_t a, int64_t b, int64_t at) {
      const float* g = grads[t] + a;
      const float* m = exp_avgs[t] + a;
      const float beta1 = hyper[3 * groups[t]], one_minus_beta1 = hyper[3 * groups[t] + 1];
      const float grad_sign = hyper[3 * groups[t] + 2];
      uint8_t* o = trit + at;
      int32_t bad = 0;  // a piece is at most one chunk; 32-bit lanes keep the loop wide
      for (int64_t i = 0; i < b - a; ++i) {
        const float gi = g[i] * grad_sign;
        const bool fin = finite_bits(gi);
        float c = m[i] * beta1 + gi * one_minus_beta1;
        if (zero_nonfinite) c = fin ? c : 0.f;
        o[i] = static_cast<uint8_t>(1 + (c > 0.f) - (c < 0.f));
        bad += !fin;
      }
      if (count_nonfinite) nonfinite += bad;
    });
    uint8_t* dst = out + k * kSignChunkBytes;
    const uint8_t *t0 = trit, *t1 = trit + bytes, *t2 = trit + 2 * bytes, *t3 = trit + 3 * bytes,
                  *t4 = trit + 4 * bytes;
    for (int64_t j = 0; j < bytes; ++j) {
      dst[j] = static_cast<uint8_t>(t0[j] + 3 * (t1[j] + 3 * (t2[j] + 3 * (t3[j] + 3 * t4[j]))));
    }
  }
  return nonfinite;
}

// Pass 2. `gathered` points at rank 0's packed signs (after its header); rank r's are `row_bytes`
// further on. `hyper` holds 5 floats per group (lr, decay, beta2, 1 - beta2, -1 to maximize or 1).
// The update is sign(sum) (majority) or sum * inv_world (average); then
// p = p * decay - u * lr and m = m * beta2 + g' * (1 - beta2), the momentum kept where the grad is
// NaN/inf if `keep_nonfinite_momentum`.
extern "C" void lion_hf_dist_apply(int64_t n_tensors, float* const* params, const float* const* grads,
                                   float* const* exp_avgs, const int64_t* numels, const int32_t* groups,
                                   const float* hyper, const uint8_t* gathered, int64_t world, int64_t row_bytes,
                                   int average, float inv_world, int keep_nonfinite_momentum, int n_threads) {
  const std::vector<int64_t> starts = element_starts(n_tensors, numels);
  const int64_t total = starts[n_tensors];
  const int64_t n_chunks = (total + kSignChunk - 1) / kSignChunk;
  if (n_threads < 1 || n_chunks < 4) n_threads = 1;
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t k = 0; k < n_chunks; ++k) {
    alignas(64) int16_t sum[kSignChunk];
    alignas(64) uint8_t digits[kSignChunkBytes];
    const int64_t begin = k * kSignChunk, end = std::min(total, begin + kSignChunk);
    const int64_t bytes = (end - begin + 4) / 5;
    std::fill(sum, sum + 5 * bytes, static_cast<int16_t>(0));
    for (int64_t r = 0; r < world; ++r) {
      std::memcpy(digits, gathered + r * row_bytes + k * kSignChunkBytes, bytes);
      for (int64_t d = 0; d < 5; ++d) {
        int16_t* s = sum + d * bytes;
        for (int64_t j = 0; j < bytes; ++j) {
          const uint8_t v = digits[j];
          const uint8_t rest = static_cast<uint8_t>(v / 3);
          s[j] = static_cast<int16_t>(s[j] + (v - 3 * rest) - 1);
          digits[j] = rest;
        }
      }
    }
    for_pieces(starts, begin, end, [&](int64_t t, int64_t a, int64_t b, int64_t at) {
      float* p = params[t] + a;
      const float* g = grads[t] + a;
      float* m = exp_avgs[t] + a;
      const float* h = hyper + 5 * groups[t];
      const float lr = h[0], decay = h[1], beta2 = h[2], one_minus_beta2 = h[3], grad_sign = h[4];
      const int16_t* s = sum + at;
      for (int64_t i = 0; i < b - a; ++i) {
        const float u = average ? static_cast<float>(s[i]) * inv_world
                                : static_cast<float>((s[i] > 0) - (s[i] < 0));
        p[i] = p[i] * decay - u * lr;
        const float gi = g[i] * grad_sign;
        const float new_m = m[i] * beta2 + gi * one_minus_beta2;
        m[i] = (keep_nonfinite_momentum && !finite_bits(gi)) ? m[i] : new_m;
      }
    });
  }
}
