#include "trainer/run_summary.h"

#include "io/config_model.h"
#include "model/check.h"

namespace moe {

namespace {
double mib(double bytes) { return bytes / (1024.0 * 1024.0); }
}  // namespace

std::string run_summary(const Config& cfg) {
  const ModelDims d = config_model_dims(cfg);
  const ModelCounts c = model_counts(d);
  const double params = static_cast<double>(c.total) * 4;
  const double grads = params;
  // Adam first and second moments, FP32, sharded over the data-parallel ranks (ZeRO-1).
  const double optim = 2 * params / cfg.parallel.dp;
  const double acts =
      static_cast<double>(model_activation_bytes(d, cfg.training.micro_batch, sizeof(float)));
  const double fpt = model_flops_per_token(d);
  std::string s;
  s += strprintf("parameters: %lld total (%.2fM), %lld active per token (%.2fM matmul weights)\n",
                 static_cast<long long>(c.total), c.total / 1e6,
                 static_cast<long long>(c.active_matmul), c.active_matmul / 1e6);
  s += strprintf("  layers: %lld (%lld dense, %lld MoE: %lld routed experts top-%lld, %lld shared)\n",
                 static_cast<long long>(d.L), static_cast<long long>(d.dense_layers),
                 static_cast<long long>(d.n_moe_layers()), static_cast<long long>(d.E),
                 static_cast<long long>(d.K), static_cast<long long>(cfg.moe.num_shared_experts));
  s += strprintf("memory (per rank, MiB): parameters %.1f, gradients %.1f, optimizer %.1f "
                 "(ZeRO-1 over dp %d), activations %.1f (micro-batch %d x %d), total %.1f\n",
                 mib(params), mib(grads), mib(optim), cfg.parallel.dp, mib(acts), cfg.training.micro_batch,
                 cfg.model.seq_len, mib(params + grads + optim + acts));
  s += strprintf("FLOPs per token: %.4g (6 x active + 12 x layers x seq_len x d_attn); per step: %.4g\n",
                 fpt, fpt * cfg.training.global_batch * cfg.model.seq_len);
  s += strprintf("step: global batch %d sequences = %d micro-batches of %d, %lld tokens\n",
                 cfg.training.global_batch,
                 cfg.training.global_batch / (cfg.training.micro_batch * cfg.parallel.dp),
                 cfg.training.micro_batch,
                 static_cast<long long>(cfg.training.global_batch) * cfg.model.seq_len);
  return s;
}

}  // namespace moe
