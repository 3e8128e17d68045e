// CPU kernel of dense_rewards: rows in parallel, each needed attention row read once.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

#include "../dense_rewards.h"

namespace dense_rlhf {
namespace {

// Adds head h's attention over [first, last] into acc (acc[t - first]); unit stride is the fast common case.
template <typename T>
void add_row(const T* row, int64_t stride, int64_t count, float* acc) {
  if (stride == 1) {
    for (int64_t i = 0; i < count; ++i) acc[i] += static_cast<float>(row[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) acc[i] += static_cast<float>(row[i * stride]);
  }
}

template <typename T>
void dense_rewards_row(const DenseRewardsParams& p, int64_t b) {
  const int64_t length = p.length;
  float* out = p.out + b * length;
  std::fill(out, out + length, 0.0f);
  const bool* mask = p.mask + b * p.mask_stride[0];
  const int64_t ms = p.mask_stride[1];

  int64_t last = -1;
  for (int64_t t = length - 1; t >= 0; --t) {
    if (mask[t * ms]) { last = t; break; }
  }
  if (last < 0) { p.status[b] = kStatusEmptyMask; return; }
  const float score = p.score[b * p.score_stride];
  if (!std::isfinite(score)) { p.status[b] = kStatusBadScore; return; }
  int64_t first = 0;
  while (!mask[first * ms]) ++first;

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
    for (int64_t h = 0; h < p.heads; ++h) add_row(base + h * p.attn_stride[1], p.attn_stride[3], count, acc);
    for (int64_t t = first; t <= last; ++t) {
      if (!mask[t * ms]) out[t] = 0.0f;
      total += out[t];
    }
    const bool finite = std::isfinite(total);
    p.status[b] = finite ? kStatusOk : kStatusBadAttention;
    usable = finite && total != 0.0f;
  }

  if (usable) {
    const float scale = p.beta * score / total;
    for (int64_t t = first; t <= last; ++t) out[t] *= scale;
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
