// Lion's step over many fp32 CPU tensors in one call: the kernel of impl="cpp".
//
// Built by lion_hf/optim/cpu_kernel.py with the system's C++ compiler (-O3 -march=native
// -fopenmp -ffp-contract=off) and called through ctypes with arrays of data pointers. The
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
#include <vector>

namespace {

constexpr int64_t kBlock = 1 << 14;  // elements per unit of work: 64 KiB of each array

struct Hyper {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, grad_sign;
};

inline float sign_of(float c) { return static_cast<float>(c > 0.f) - static_cast<float>(c < 0.f); }

// A finite float minus itself is 0; NaN and inf give NaN.
inline bool finite(float x) { return x - x == 0.f; }

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
// Branch-free, so g++ vectorises it.
template <bool kCautious>
void update_block(float* __restrict p, const float* __restrict g, float* __restrict m, int64_t begin, int64_t end,
                  const Hyper& h, float fraction) {
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i] * h.grad_sign;
    const float mi = m[i];
    float u = sign_of(mi * h.beta1 + gi * h.one_minus_beta1);
    if constexpr (kCautious) {
      u = u * static_cast<float>(u * gi > 0.f) / fraction;
    }
    p[i] = p[i] * h.decay - u * h.lr;
    m[i] = mi * h.beta2 + gi * h.one_minus_beta2;
  }
}

// The same update, leaving every element whose gradient is NaN or inf untouched
// (nonfinite_grad="skip_elements"). Runs only on blocks that hold such an element.
template <bool kCautious>
void update_block_masked(float* __restrict p, const float* __restrict g, float* __restrict m, int64_t begin,
                         int64_t end, const Hyper& h, float fraction) {
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i] * h.grad_sign;
    if (!finite(gi)) continue;
    const float mi = m[i];
    float u = sign_of(mi * h.beta1 + gi * h.one_minus_beta1);
    if constexpr (kCautious) {
      u = u * static_cast<float>(u * gi > 0.f) / fraction;
    }
    p[i] = p[i] * h.decay - u * h.lr;
    m[i] = mi * h.beta2 + gi * h.one_minus_beta2;
  }
}

bool block_all_finite(const float* __restrict g, int64_t begin, int64_t end) {
  int bad = 0;
  for (int64_t i = begin; i < end; ++i) bad |= !finite(g[i]);
  return bad == 0;
}

template <bool kCautious>
void run(int64_t n_blocks, const std::vector<int64_t>& block_tensor, const std::vector<int64_t>& block_start,
         float* const* ps, const float* const* gs, float* const* ms, const int64_t* numels, const Hyper& h,
         const std::vector<float>& fractions, bool skip_nonfinite, int n_threads) {
  // Static schedule: each thread streams one contiguous run of blocks.
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t t = block_tensor[b];
    const int64_t begin = block_start[b];
    const int64_t end = begin + kBlock < numels[t] ? begin + kBlock : numels[t];
    const float fraction = kCautious ? fractions[t] : 1.f;
    if (skip_nonfinite && !block_all_finite(gs[t], begin, end)) {
      update_block_masked<kCautious>(ps[t], gs[t], ms[t], begin, end, h, fraction);
    } else {
      update_block<kCautious>(ps[t], gs[t], ms[t], begin, end, h, fraction);
    }
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
  // Cautious: a first pass counts each tensor's agreeing elements (non-finite ones never agree),
  // then the fraction is rounded as torch's agree.mean().clamp(min=1e-3) rounds it.
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
