// Lion's step over many fp32 CPU tensors in one call: the kernel of impl="cpp".
//
// Built by lion_hf/optim/cpu_kernel.py with the system's C++ compiler (-O3 -march=native
// -fopenmp -ffp-contract=off -fno-trapping-math) and called through ctypes with arrays of data pointers. The
// Python side checks every tensor first (fp32, CPU, contiguous, equal lengths): nothing here
// can check a raw pointer.
//
// The arithmetic is _lion_tensor's (lion.py), operation for operation, in fp32:
//   g' = -g if maximize else g
//   c  = m * beta1 + g' * (1 - beta1)
//   u  = sign(c)                        torch's sign: (c > 0) - (c < 0), so NaN -> 0
//   u  = u * agree / max(mean(agree), 1e-3), agree = (u * g' > 0)      (cautious only)
//   p  = p * decay - u * lr             decay = 1 - lr * weight_decay
//   m  = m * beta2 + g' * (1 - beta2)
// With -ffp-contract=off no product is fused into an FMA, so each result rounds as torch's
// separate ops round it: the step is bit for bit that of impl="for_loop" (tested), except that a
// cautious tensor of more than 2**24 elements may round its agreeing fraction differently.
//
// Why one call: torch.compile's graph takes a fixed number of tensors, so the compiled impl
// makes one call per 16 tensors, each with its own Python around it. Here all tensors are cut
// into blocks of equal length and the threads split the blocks, so small tensors (biases,
// norms) cost no call and no thread barrier of their own.

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 1 << 14;  // elements per unit of work: 64 KiB of each array

struct Hyper {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, grad_sign;
};

inline float sign_of(float c) { return static_cast<float>(c > 0.f) - static_cast<float>(c < 0.f); }

// The new value where the gradient is finite, else the old one, bit for bit (the where() of
// nonfinite_grad="skip_elements"). A blend of bit patterns: a select on a float comparison is
// vectorised only under -fno-trapping-math, and the inf/NaN test is one on the exponent bits.
inline float unless_nonfinite(float g, float updated, float old) {
  uint32_t g_bits, new_bits, old_bits;
  std::memcpy(&g_bits, &g, 4);
  std::memcpy(&new_bits, &updated, 4);
  std::memcpy(&old_bits, &old, 4);
  const uint32_t keep = 0u - static_cast<uint32_t>((g_bits & 0x7f800000u) == 0x7f800000u);  // exponent all ones
  const uint32_t bits = (new_bits & ~keep) | (old_bits & keep);
  float result;
  std::memcpy(&result, &bits, 4);
  return result;
}

// Elements of [begin, end) whose update agrees in sign with the gradient (cautious Lion).
int64_t count_agreeing(const float* __restrict g, const float* __restrict m, int64_t begin, int64_t end,
                       const Hyper& h) {
  int64_t count = 0;
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i] * h.grad_sign;
    const float u = sign_of(m[i] * h.beta1 + gi * h.one_minus_beta1);
    count += (u * gi > 0.f);
  }
  return count;
}

// The update of [begin, end). `fraction` is the tensor's agreeing fraction (cautious only).
// Branch-free, so g++ vectorises it; the non-finite check costs no extra pass over memory.
template <bool kCautious, bool kSkipNonfinite>
void update_block(float* __restrict p, const float* __restrict g, float* __restrict m, int64_t begin, int64_t end,
                  const Hyper& h, float fraction) {
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i] * h.grad_sign;
    const float mi = m[i];
    const float pi = p[i];
    float u = sign_of(mi * h.beta1 + gi * h.one_minus_beta1);
    if constexpr (kCautious) {
      u = u * static_cast<float>(u * gi > 0.f) / fraction;
    }
    float new_p = pi * h.decay - u * h.lr;
    float new_m = mi * h.beta2 + gi * h.one_minus_beta2;
    if constexpr (kSkipNonfinite) {
      new_p = unless_nonfinite(gi, new_p, pi);
      new_m = unless_nonfinite(gi, new_m, mi);
    }
    p[i] = new_p;
    m[i] = new_m;
  }
}

template <bool kCautious, bool kSkipNonfinite>
void run(int64_t n_blocks, const std::vector<int64_t>& block_tensor, const std::vector<int64_t>& block_start,
         float* const* ps, const float* const* gs, float* const* ms, const int64_t* numels, const Hyper& h,
         const std::vector<float>& fractions, int n_threads) {
  // Static schedule: each thread streams one contiguous run of blocks.
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t t = block_tensor[b];
    const int64_t begin = block_start[b];
    const int64_t end = begin + kBlock < numels[t] ? begin + kBlock : numels[t];
    update_block<kCautious, kSkipNonfinite>(ps[t], gs[t], ms[t], begin, end, h, kCautious ? fractions[t] : 1.f);
  }
}

template <bool kCautious>
void run(int64_t n_blocks, const std::vector<int64_t>& block_tensor, const std::vector<int64_t>& block_start,
         float* const* ps, const float* const* gs, float* const* ms, const int64_t* numels, const Hyper& h,
         const std::vector<float>& fractions, bool skip_nonfinite, int n_threads) {
  if (skip_nonfinite) {
    run<kCautious, true>(n_blocks, block_tensor, block_start, ps, gs, ms, numels, h, fractions, n_threads);
  } else {
    run<kCautious, false>(n_blocks, block_tensor, block_start, ps, gs, ms, numels, h, fractions, n_threads);
  }
}

}  // namespace

extern "C" void lion_hf_fp32_step(int64_t n_tensors, float* const* params, const float* const* grads,
                                  float* const* exp_avgs, const int64_t* numels, float lr, float decay, float beta1,
                                  float one_minus_beta1, float beta2, float one_minus_beta2, int maximize,
                                  int cautious, int skip_nonfinite, int n_threads) {
  const Hyper h{lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, maximize ? -1.f : 1.f};
  std::vector<int64_t> block_tensor, block_start;
  for (int64_t t = 0; t < n_tensors; ++t) {
    for (int64_t s = 0; s < numels[t]; s += kBlock) {
      block_tensor.push_back(t);
      block_start.push_back(s);
    }
  }
  const auto n_blocks = static_cast<int64_t>(block_tensor.size());
  if (n_threads < 1) n_threads = 1;
  if (!cautious) {
    run<false>(n_blocks, block_tensor, block_start, params, grads, exp_avgs, numels, h, {}, skip_nonfinite != 0,
               n_threads);
    return;
  }
  // Cautious: a first pass counts each tensor's agreeing elements (over all of them, as torch's
  // mean does; an inf gradient can agree), then the fraction is rounded as torch's
  // agree.mean().clamp(min=1e-3) rounds it.
  std::vector<int64_t> counts(n_blocks);
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t t = block_tensor[b];
    const int64_t begin = block_start[b];
    const int64_t end = begin + kBlock < numels[t] ? begin + kBlock : numels[t];
    counts[b] = count_agreeing(grads[t], exp_avgs[t], begin, end, h);
  }
  std::vector<int64_t> agreeing(n_tensors, 0);
  for (int64_t b = 0; b < n_blocks; ++b) agreeing[block_tensor[b]] += counts[b];
  std::vector<float> fractions(n_tensors, 1.f);
  for (int64_t t = 0; t < n_tensors; ++t) {
    if (numels[t] == 0) continue;
    const float fraction = static_cast<float>(agreeing[t]) / static_cast<float>(numels[t]);
    fractions[t] = fraction < 1e-3f ? 1e-3f : fraction;
  }
  run<true>(n_blocks, block_tensor, block_start, params, grads, exp_avgs, numels, h, fractions,
            skip_nonfinite != 0, n_threads);
}
