// Schema of torch.ops.dense_rlhf.dense_rewards, its input checks, and the Python module stub.
#include <Python.h>

#include "dense_rewards.h"

namespace dense_rlhf {

namespace {

AttnDtype attn_dtype(const at::Tensor& attn) {
  switch (attn.scalar_type()) {
    case at::kFloat: return AttnDtype::kFloat32;
    case at::kHalf: return AttnDtype::kFloat16;
    case at::kBFloat16: return AttnDtype::kBFloat16;
    case at::kDouble: return AttnDtype::kFloat64;
    default: TORCH_CHECK_TYPE(false, "dense_rewards: attn must be float16, bfloat16, float32 or float64, got ",
                              attn.scalar_type());
  }
}

}  // namespace

DenseRewardsParams prepare(const at::Tensor& attn, const at::Tensor& score, const at::Tensor& mask,
                           double beta, const c10::optional<at::Tensor>& reward_index, at::Tensor& out,
                           at::Tensor& status) {
  TORCH_CHECK_VALUE(attn.dim() == 4, "dense_rewards: attn must be [B, H, R, L], got ", attn.sizes());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.scalar_type() == at::kBool,
                    "dense_rewards: mask must be a bool [B, L] tensor, got ", mask.scalar_type(), " ",
                    mask.sizes());
  const int64_t batch = attn.size(0);
  const int64_t length = attn.size(3);
  TORCH_CHECK_VALUE(mask.size(0) == batch && mask.size(1) == length, "dense_rewards: mask ", mask.sizes(),
                    " does not match attn ", attn.sizes());
  TORCH_CHECK_VALUE(score.dim() == 1 && score.size(0) == batch && score.scalar_type() == at::kFloat,
                    "dense_rewards: score must be a float32 [B] tensor, got ", score.scalar_type(), " ",
                    score.sizes());
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "dense_rewards: beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(score.device() == attn.device() && mask.device() == attn.device(),
                    "dense_rewards: attn, score and mask must be on one device");

  DenseRewardsParams p{};
  p.attn = attn.data_ptr();
  p.attn_dtype = attn_dtype(attn);
  p.batch = batch;
  p.heads = attn.size(1);
  p.rows = attn.size(2);
  p.length = length;
  for (int i = 0; i < 4; ++i) p.attn_stride[i] = attn.stride(i);
  p.score = score.data_ptr<float>();
  p.score_stride = score.stride(0);
  p.mask = mask.data_ptr<bool>();
  p.mask_stride[0] = mask.stride(0);
  p.mask_stride[1] = mask.stride(1);
  if (reward_index.has_value()) {
    const at::Tensor& index = *reward_index;
    TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == batch && index.scalar_type() == at::kLong,
                      "dense_rewards: reward_index must be an int64 [B] tensor, got ", index.scalar_type(), " ",
                      index.sizes());
    TORCH_CHECK_VALUE(index.device() == attn.device(), "dense_rewards: reward_index must be on attn's device");
    p.reward_index = index.data_ptr<int64_t>();
    p.reward_index_stride = index.stride(0);
  }
  p.beta = static_cast<float>(beta);

  out = at::empty({batch, length}, attn.options().dtype(at::kFloat));
  status = at::empty({batch}, attn.options().dtype(at::kInt));
  p.out = out.data_ptr<float>();
  p.status = status.data_ptr<int32_t>();
  return p;
}

TORCH_LIBRARY(dense_rlhf, m) {
  m.def("dense_rewards(Tensor attn, Tensor score, Tensor mask, float beta, Tensor? reward_index) "
        "-> (Tensor, Tensor)");
}

}  // namespace dense_rlhf

// Importing dense_rlhf._C loads this library, which registers the op; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
