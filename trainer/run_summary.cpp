#include "trainer/run_summary.h"

#include "io/config_model.h"
#include "model/check.h"

namespace moe {

namespace {
double mib(double bytes) { return bytes / (1024.0 * 1024.0); }
}  // namespace

std::string run_summary(const Config& cfg) {
  ModelDims d = config_model_dims(cfg);
  const ModelCounts c = model_counts(d);
  // What one rank holds: replicated tensors plus its EP rank's share of the routed experts.
  const int dp = cfg.parallel.dp, ep = cfg.parallel.ep, edp = dp / ep;
  if (d.n_moe_layers() > 0) d.ep = ep;
  double n_rep = 0, n_exp = 0;
  for (const ParamInfo& p : model_param_table(d))
    (p.routed_experts ? n_exp : n_rep) += static_cast<double>(p.count);
  const double params = (n_rep + n_exp) * 4;
  const double grads = params;
  // Adam first and second moments, FP32, sharded (ZeRO-1): replicated tensors over dp,
  // experts over the dp / ep ranks holding them; plus the reduced-gradient shard when dp > 1.
  const double shard = n_rep / dp + n_exp / edp;
  const double optim = (dp > 1 ? 3 : 2) * shard * 4;
  const int64_t N = int64_t{cfg.training.micro_batch} * cfg.model.seq_len;
  const double acts =
      static_cast<double>(model_activation_bytes(d, cfg.training.micro_batch, sizeof(float))) +
      (d.ep > 1 ? static_cast<double>(moe_rows_max(d, N) * d.C) * 4 : 0.0);  // dispatch wire buffer
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
                 "(ZeRO-1 over dp %d, experts over %d), activations %.1f (micro-batch %d x %d), "
                 "total %.1f\n",
                 mib(params), mib(grads), mib(optim), dp, edp, mib(acts), cfg.training.micro_batch,
                 cfg.model.seq_len, mib(params + grads + optim + acts));
  s += strprintf("layout: dp %d x pp %d = %d ranks; ep %d (%lld routed experts per rank)\n", dp,
                 cfg.parallel.pp, dp * cfg.parallel.pp, ep,
                 static_cast<long long>(d.n_moe_layers() > 0 ? d.E / ep : 0));
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
