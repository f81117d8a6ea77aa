// Lion's step over many CPU tensors in one call: the kernel of impl="cpp".
//
// Built by lion_hf/optim/cpu_kernel.py with the system's C++ compiler (-O3 -march=native
// -fopenmp -ffp-contract=off -fno-trapping-math) and called through ctypes with arrays of data
// pointers. The Python side checks every tensor first (dtypes, CPU, contiguous, the param's
// shape, no overlap): nothing here can check a raw pointer.
//
// Each tensor has a kind: its param (and grad) is fp32 or bf16, its momentum fp32 or bf16, and a
// bf16 param is stored by stochastic rounding or round-to-nearest-even. The arithmetic is
// _lion_tensor's (lion.py), operation for operation, in fp32:
//   g' = -g if maximize else g
//   c  = m * beta1 + g' * (1 - beta1)
//   u  = sign(c)                        torch's sign: (c > 0) - (c < 0), so NaN -> 0
//   u  = u * agree / max(mean(agree), 1e-3), agree = (u * g' > 0)      (cautious only)
//   p  = p * decay - u * lr             decay = 1 - lr * weight_decay
//   m  = m * beta2 + g' * (1 - beta2)
// and a bf16 result is rounded as lion.py's _round_to rounds it (the same 16-bit hash of the
// element's index and a per-tensor seed for stochastic rounding). With -ffp-contract=off no
// product is fused into an FMA, so each result rounds as torch's separate ops round it: given
// the same seeds the step is bit for bit that of impl="for_loop" (tested), except for NaN
// payloads and a cautious tensor of more than 2**24 elements, which may round its agreeing
// fraction differently.
//
// Why one call: torch.compile's graph takes a fixed number of tensors, so the compiled impl
// makes one call per 16 tensors, each with its own Python around it. Here all tensors are cut
// into blocks of equal length and the threads split the blocks, so small tensors (biases,
// norms) cost no call and no thread barrier of their own.

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 1 << 14;  // elements per unit of work: 64 KiB of an fp32 array

// Tensor kinds, as cpu_kernel.py numbers them.
constexpr int kBf16Param = 1;       // param and grad are bf16 (else fp32)
constexpr int kBf16Momentum = 2;    // momentum is bf16, stored by stochastic rounding (else fp32)
constexpr int kParamStochastic = 4; // a bf16 param is stored by stochastic rounding (else nearest)

struct Hyper {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, grad_sign;
};

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

inline float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// Storage types: fp32, or bf16 as the high half of an fp32 bit pattern.
struct Fp32 {
  using T = float;
  static float load(float v) { return v; }
};

struct Bf16 {
  using T = uint16_t;
  static float load(uint16_t v) { return float_of(static_cast<uint32_t>(v) << 16); }
};

inline float sign_of(float c) { return static_cast<float>(c > 0.f) - static_cast<float>(c < 0.f); }

// All ones where x is NaN or inf (exponent all ones), else 0.
inline uint32_t nonfinite_mask(float x) { return 0u - static_cast<uint32_t>((bits_of(x) & 0x7f800000u) == 0x7f800000u); }

// lion.py's _random_bits16: a bijection of 16-bit integers applied to (index + seed) mod 2**16.
inline uint32_t random_bits16(int64_t index, uint32_t seed) {
  uint32_t x = (static_cast<uint32_t>(index & 0xFFFF) + seed) & 0xFFFFu;
  x = ((x ^ (x >> 8)) * 0x6D2Bu) & 0xFFFFu;
  x = ((x ^ (x >> 7)) * 0x5A35u) & 0xFFFFu;
  return x ^ (x >> 8);
}

// fp32 -> bf16, up or down with probability given by the distance (lion.py's
// _stochastic_round_to_bf16); a NaN stays a NaN (the quiet one torch's conversion gives).
inline uint16_t stochastic_bf16(float x, int64_t index, uint32_t seed) {
  const uint32_t noisy = (bits_of(x) + random_bits16(index, seed)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : noisy);
}

// fp32 -> bf16, round to nearest even, as torch's conversion rounds.
inline uint16_t nearest_bf16(float x) {
  const uint32_t b = bits_of(x);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

// The stored value of a new fp32 param or momentum in storage S.
template <class S, bool kStochastic>
inline typename S::T store(float x, int64_t index, uint32_t seed) {
  if constexpr (sizeof(typename S::T) == 4) {
    return x;
  } else if constexpr (kStochastic) {
    return stochastic_bf16(x, index, seed);
  } else {
    return nearest_bf16(x);
  }
}

// The new stored value where the gradient is finite, else the old one, bit for bit (the where()
// of nonfinite_grad="skip_elements"). A blend of bit patterns, not a select on a float
// comparison, which g++ vectorises only under -fno-trapping-math.
template <class T>
inline T unless_nonfinite(uint32_t bad, T updated, T old) {
  if constexpr (sizeof(T) == 4) {
    return float_of((bits_of(updated) & ~bad) | (bits_of(old) & bad));
  } else {
    return static_cast<T>((updated & ~bad) | (old & bad));
  }
}

// Elements of [begin, end) whose update agrees in sign with the gradient (cautious Lion).
template <class P, class M>
int64_t count_agreeing(const void* g_, const void* m_, int64_t begin, int64_t end, const Hyper& h) {
  const auto* __restrict g = static_cast<const typename P::T*>(g_);
  const auto* __restrict m = static_cast<const typename M::T*>(m_);
  int64_t count = 0;
  for (int64_t i = begin; i < end; ++i) {
    const float gi = P::load(g[i]) * h.grad_sign;
    const float u = sign_of(M::load(m[i]) * h.beta1 + gi * h.one_minus_beta1);
    count += (u * gi > 0.f);
  }
  return count;
}

// The update of [begin, end) of one tensor. `fraction` is its agreeing fraction (cautious only),
// the seeds its stochastic-rounding seeds. Branch-free, so g++ vectorises it; the non-finite
// check costs no extra pass over memory.
template <class P, class M, bool kParamStochastic, bool kCautious, bool kSkipNonfinite>
void update_block(void* p_, const void* g_, void* m_, int64_t begin, int64_t end, const Hyper& h, float fraction,
                  uint32_t p_seed, uint32_t m_seed) {
  auto* __restrict p = static_cast<typename P::T*>(p_);
  const auto* __restrict g = static_cast<const typename P::T*>(g_);
  auto* __restrict m = static_cast<typename M::T*>(m_);
  for (int64_t i = begin; i < end; ++i) {
    const float gi = P::load(g[i]) * h.grad_sign;
    const float mi = M::load(m[i]);
    float u = sign_of(mi * h.beta1 + gi * h.one_minus_beta1);
    if constexpr (kCautious) {
      u = u * static_cast<float>(u * gi > 0.f) / fraction;
    }
    auto new_p = store<P, kParamStochastic>(P::load(p[i]) * h.decay - u * h.lr, i, p_seed);
    auto new_m = store<M, true>(mi * h.beta2 + gi * h.one_minus_beta2, i, m_seed);
    if constexpr (kSkipNonfinite) {
      const uint32_t bad = nonfinite_mask(gi);
      new_p = unless_nonfinite(bad, new_p, p[i]);
      new_m = unless_nonfinite(bad, new_m, m[i]);
    }
    p[i] = new_p;
    m[i] = new_m;
  }
}

struct Step {
  int64_t n_tensors;
  void* const* params;
  const void* const* grads;
  void* const* exp_avgs;
  const int64_t* numels;
  const int32_t* kinds;
  const int32_t* seeds;  // [n_tensors][2]: param, momentum
  Hyper h;
  std::vector<int64_t> block_tensor, block_start;
  std::vector<float> fractions;

  int64_t end_of(int64_t b) const {
    const int64_t t = block_tensor[b];
    return block_start[b] + kBlock < numels[t] ? block_start[b] + kBlock : numels[t];
  }
};

template <bool kCautious, bool kSkip>
void update_block_of_kind(const Step& s, int64_t b) {
  const int64_t t = s.block_tensor[b];
  const int64_t begin = s.block_start[b], end = s.end_of(b);
  const float fraction = kCautious ? s.fractions[t] : 1.f;
  const auto p_seed = static_cast<uint32_t>(s.seeds[2 * t]), m_seed = static_cast<uint32_t>(s.seeds[2 * t + 1]);
  void* p = s.params[t];
  const void* g = s.grads[t];
  void* m = s.exp_avgs[t];
  switch (s.kinds[t]) {
    case 0:
      return update_block<Fp32, Fp32, false, kCautious, kSkip>(p, g, m, begin, end, s.h, fraction, p_seed, m_seed);
    case kBf16Momentum:
      return update_block<Fp32, Bf16, false, kCautious, kSkip>(p, g, m, begin, end, s.h, fraction, p_seed, m_seed);
    case kBf16Param:
      return update_block<Bf16, Fp32, false, kCautious, kSkip>(p, g, m, begin, end, s.h, fraction, p_seed, m_seed);
    case kBf16Param | kParamStochastic:
      return update_block<Bf16, Fp32, true, kCautious, kSkip>(p, g, m, begin, end, s.h, fraction, p_seed, m_seed);
    case kBf16Param | kBf16Momentum:
      return update_block<Bf16, Bf16, false, kCautious, kSkip>(p, g, m, begin, end, s.h, fraction, p_seed, m_seed);
    case kBf16Param | kBf16Momentum | kParamStochastic:
      return update_block<Bf16, Bf16, true, kCautious, kSkip>(p, g, m, begin, end, s.h, fraction, p_seed, m_seed);
    default:
      return;  // unreachable: lion_hf_cpu_step refuses unknown kinds before any update
  }
}

int64_t count_agreeing_of_kind(const Step& s, int64_t b) {
  const int64_t t = s.block_tensor[b];
  const int64_t begin = s.block_start[b], end = s.end_of(b);
  const int kind = s.kinds[t] & (kBf16Param | kBf16Momentum);
  const void* g = s.grads[t];
  const void* m = s.exp_avgs[t];
  if (kind == 0) return count_agreeing<Fp32, Fp32>(g, m, begin, end, s.h);
  if (kind == kBf16Momentum) return count_agreeing<Fp32, Bf16>(g, m, begin, end, s.h);
  if (kind == kBf16Param) return count_agreeing<Bf16, Fp32>(g, m, begin, end, s.h);
  return count_agreeing<Bf16, Bf16>(g, m, begin, end, s.h);
}

template <bool kCautious, bool kSkip>
void run(const Step& s, int n_threads) {
  const auto n_blocks = static_cast<int64_t>(s.block_tensor.size());
  // Static schedule: each thread streams one contiguous run of blocks.
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t b = 0; b < n_blocks; ++b) update_block_of_kind<kCautious, kSkip>(s, b);
}

inline bool known_kind(int32_t kind) {
  switch (kind) {
    case 0:
    case kBf16Momentum:
    case kBf16Param:
    case kBf16Param | kParamStochastic:
    case kBf16Param | kBf16Momentum:
    case kBf16Param | kBf16Momentum | kParamStochastic:
      return true;
    default:
      return false;
  }
}

}  // namespace

// Returns how many tensors have a kind it does not know; then it has updated nothing.
extern "C" int64_t lion_hf_cpu_step(int64_t n_tensors, void* const* params, const void* const* grads,
                                    void* const* exp_avgs, const int64_t* numels, const int32_t* kinds,
                                    const int32_t* seeds, float lr, float decay, float beta1,
                                    float one_minus_beta1, float beta2, float one_minus_beta2, int maximize,
                                    int cautious, int skip_nonfinite, int n_threads) {
  int64_t unknown = 0;
  for (int64_t t = 0; t < n_tensors; ++t) unknown += !known_kind(kinds[t]);
  if (unknown) return unknown;
  Step s{n_tensors, params, grads, exp_avgs, numels, kinds, seeds,
         Hyper{lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, maximize ? -1.f : 1.f}, {}, {}, {}};
  for (int64_t t = 0; t < n_tensors; ++t) {
    for (int64_t start = 0; start < numels[t]; start += kBlock) {
      s.block_tensor.push_back(t);
      s.block_start.push_back(start);
    }
  }
  if (n_threads < 1) n_threads = 1;
  if (cautious) {
    // A first pass counts each tensor's agreeing elements (over all of them, as torch's mean
    // does; an inf gradient can agree), then the fraction is rounded as torch's
    // agree.mean().clamp(min=1e-3) rounds it.
    const auto n_blocks = static_cast<int64_t>(s.block_tensor.size());
    std::vector<int64_t> counts(n_blocks);
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t b = 0; b < n_blocks; ++b) counts[b] = count_agreeing_of_kind(s, b);
    std::vector<int64_t> agreeing(n_tensors, 0);
    for (int64_t b = 0; b < n_blocks; ++b) agreeing[s.block_tensor[b]] += counts[b];
    s.fractions.assign(n_tensors, 1.f);
    for (int64_t t = 0; t < n_tensors; ++t) {
      if (numels[t] == 0) continue;
      const float fraction = static_cast<float>(agreeing[t]) / static_cast<float>(numels[t]);
      s.fractions[t] = fraction < 1e-3f ? 1e-3f : fraction;
    }
    if (skip_nonfinite) run<true, true>(s, n_threads); else run<true, false>(s, n_threads);
  } else if (skip_nonfinite) {
    run<false, true>(s, n_threads);
  } else {
    run<false, false>(s, n_threads);
  }
  return 0;
}
