// CPU kernel of dense_rewards: rows in parallel, each needed attention row read once.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../dense_rewards.h"

namespace dense_rlhf {
namespace {

// First / last true position of a mask row, -1 if none. A contiguous row is scanned eight bytes at a time
// (bool is one byte, 0 or 1), so that long prompts and padding cost little.
int64_t first_true(const bool* mask, int64_t stride, int64_t length) {
  int64_t t = 0;
  if (stride == 1) {
    for (uint64_t word; t + 8 <= length; t += 8) {
      std::memcpy(&word, mask + t, 8);
      if (word != 0) break;
    }
  }
  for (; t < length; ++t) {
    if (mask[t * stride]) return t;
  }
  return -1;
}

int64_t last_true(const bool* mask, int64_t stride, int64_t length) {
  int64_t end = length;  // positions [end, length) are known false
  if (stride == 1) {
    for (uint64_t word; end >= 8; end -= 8) {
      std::memcpy(&word, mask + end - 8, 8);
      if (word != 0) break;
    }
  }
  for (int64_t t = end - 1; t >= 0; --t) {
    if (mask[t * stride]) return t;
  }
  return -1;
}

// acc[i] = sum over heads of row_h[i * stride], i < count. Four heads per pass: a quarter of the passes over
// acc, and four independent read streams (software prefetch of the next group measured no faster).
template <typename T>
void sum_heads(const T* base, int64_t head_stride, int64_t stride, int64_t heads, int64_t count, float* acc) {
  std::fill(acc, acc + count, 0.0f);
  int64_t h = 0;
  for (; h + 4 <= heads; h += 4) {
    const T* r0 = base + h * head_stride;
    const T* r1 = r0 + head_stride;
    const T* r2 = r1 + head_stride;
    const T* r3 = r2 + head_stride;
    if (stride == 1) {
      for (int64_t i = 0; i < count; ++i) {
        acc[i] += (static_cast<float>(r0[i]) + static_cast<float>(r1[i])) +
                  (static_cast<float>(r2[i]) + static_cast<float>(r3[i]));
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        const int64_t j = i * stride;
        acc[i] += (static_cast<float>(r0[j]) + static_cast<float>(r1[j])) +
                  (static_cast<float>(r2[j]) + static_cast<float>(r3[j]));
      }
    }
  }
  for (; h < heads; ++h) {
    const T* row = base + h * head_stride;
    if (stride == 1) {
      for (int64_t i = 0; i < count; ++i) acc[i] += static_cast<float>(row[i]);
    } else {
      for (int64_t i = 0; i < count; ++i) acc[i] += static_cast<float>(row[i * stride]);
    }
  }
}

// Zeroes acc where the mask is false and returns the sum of what is left; *negative tells whether a value
// left is < 0 (-0.0 is not). Eight partial sums: one serial chain of float additions (the compiler may not
// reorder them) would cost an add latency per token.
float mask_and_sum(float* acc, const bool* mask, int64_t stride, int64_t count, bool* negative) {
  int32_t any_negative = 0;  // an integer OR-reduction, which the compiler vectorises
  for (int64_t i = 0; i < count; ++i) {
    const float value = mask[i * stride] ? acc[i] : 0.0f;
    acc[i] = value;
    any_negative |= value < 0.0f;
  }
  *negative = any_negative != 0;
  float partial[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int k = 0; k < 8; ++k) partial[k] += acc[i + k];
  }
  for (; i < count; ++i) partial[0] += acc[i];
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
         ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

template <typename T>
void dense_rewards_row(const DenseRewardsParams& p, int64_t b) {
  const int64_t length = p.length;
  float* out = p.out + b * length;
  const bool* mask = p.mask + b * p.mask_stride[0];
  const int64_t ms = p.mask_stride[1];

  const int64_t last = last_true(mask, ms, length);
  if (last < 0) {
    std::fill(out, out + length, 0.0f);
    p.status[b] = kStatusEmptyMask;
    return;
  }
  const float score = p.score[b * p.score_stride];
  if (!std::isfinite(score)) {
    std::fill(out, out + length, 0.0f);
    p.status[b] = kStatusBadScore;
    return;
  }
  const int64_t first = first_true(mask, ms, last + 1);
  std::fill(out, out + first, 0.0f);
  std::fill(out + last + 1, out + length, 0.0f);

  const int64_t r = p.reward_index ? p.reward_index[b * p.reward_index_stride] : last;
  bool usable = false;
  float total = 0.0f;
  if (r < 0 || r >= p.rows) {
    p.status[b] = kStatusBadRewardIndex;
  } else {
    // Sum heads over the completion span, then zero the span's non-completion tokens; the head mean's 1/H
    // cancels in the normalisation.
    float* acc = out + first;
    const int64_t count = last - first + 1;
    const T* base = static_cast<const T*>(p.attn) + b * p.attn_stride[0] + r * p.attn_stride[2] +
                    first * p.attn_stride[3];
    sum_heads(base, p.attn_stride[1], p.attn_stride[3], p.heads, count, acc);
    bool negative = false;
    total = mask_and_sum(acc, mask + first * ms, ms, count, &negative);
    const bool finite = std::isfinite(total);
    p.status[b] = !finite ? kStatusBadAttention : negative ? kStatusNegativeAttention : kStatusOk;
    usable = finite && !negative && total != 0.0f;
  }

  if (usable) {
    // With no negative value, 0 <= acc[t] <= total, so acc[t] / total is in [0, 1] and no product below can
    // overflow, however small total is (next to an attention sink, or denormal). Never fold beta * score / total
    // into one factor: it overflows when total is tiny. "+ 0.0f" turns the -0.0 of a masked token (0 times a
    // negative score) into +0.0.
    const float dense = p.beta * score;
    for (int64_t t = first; t <= last; ++t) out[t] = dense * (out[t] / total) + 0.0f;
    out[last] += (1.0f - p.beta) * score;
  } else {  // sparse fallback: the whole score on the last completion token
    std::fill(out + first, out + last + 1, 0.0f);
    out[last] = score;
  }
}

template <typename T>
void run(const DenseRewardsParams& p) {
  const int64_t work_per_row = std::max<int64_t>(1, p.heads * p.length);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_row);
  at::parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) dense_rewards_row<T>(p, b);
  });
}

std::tuple<at::Tensor, at::Tensor> dense_rewards_cpu(const at::Tensor& attn, const at::Tensor& score,
                                                     const at::Tensor& mask, double beta,
                                                     const c10::optional<at::Tensor>& reward_index) {
  at::Tensor out, status;
  const DenseRewardsParams p = prepare(attn, score, mask, beta, reward_index, out, status);
  switch (p.attn_dtype) {
    case AttnDtype::kFloat32: run<float>(p); break;
    case AttnDtype::kFloat16: run<c10::Half>(p); break;
    case AttnDtype::kBFloat16: run<c10::BFloat16>(p); break;
    case AttnDtype::kFloat64: run<double>(p); break;
  }
  return {out, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_rlhf, CPU, m) { m.impl("dense_rewards", &dense_rewards_cpu); }

}  // namespace dense_rlhf
