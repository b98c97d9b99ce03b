#include "trainer/run_summary.h"

#include <algorithm>

#include "io/config_model.h"
#include "model/check.h"
#include "model/model_stages.h"
#include "parallel/expert_exchange.h"
#include "parallel/pipeline.h"

namespace moe {

namespace {
double mib(double bytes) { return bytes / (1024.0 * 1024.0); }
}  // namespace

std::string run_summary(const Config& cfg) {
  ModelDims d = config_model_dims(cfg);
  const ModelCounts c = model_counts(d);
  // What one rank holds: replicated tensors plus its EP rank's share of the routed experts.
  const int dp = cfg.parallel.dp, ep = cfg.parallel.ep, pp = cfg.parallel.pp;
  // ZeRO-1 groups: DualPipe's two copies of a stage share one.
  const int copies = pp > 1 && cfg.parallel.schedule == PipeSchedule::kDualPipe ? 2 : 1;
  const int zero = dp * copies, ezero = dp / ep * copies;
  if (d.n_moe_layers() > 0) d.ep = ep;
  const int64_t M = cfg.training.global_batch / (int64_t{cfg.training.micro_batch} * dp);
  // With a pipeline, the pipeline rank holding the most: its stages' tensors, and one
  // activation slot (its layers only) per micro-batch it holds at once.
  double params = 0, optim = 0, acts = 0, pipe = 0;
  const double moment_bytes = cfg.optim.state_dtype == StateDtype::kBf16 ? 2 : 4;
  // The backends hold the same arenas but for the attention core's scratch (each its own) and
  // the pipeline's buffers.
  const bool gpu = cfg.run.device == Device::kCuda;
  const Device device = gpu ? Device::kCuda : Device::kCpu;
#ifdef MOETRAIN_HAVE_NCCL
  const bool ticked = gpu;  // pipeline_set_p2p: received gradients only, on the device
#else
  const bool ticked = false;
#endif
  // Expert rows as balanced routing delivers them (N K per rank and MoE layer); the buffers
  // the trainer allocates for dropless routing's worst case are reported beside.
  ModelDims balanced = d;
  balanced.ep = 1;
  balanced.ep_rank = 0;
  const double whole_acts = static_cast<double>(
      model_activation_bytes(balanced, cfg.training.micro_batch, sizeof(float), device));
  const double worst_extra =
      static_cast<double>(
          model_activation_bytes(d, cfg.training.micro_batch, sizeof(float), device)) -
      whole_acts;
  const std::vector<ParamInfo> table = model_param_table(d);
  const std::vector<int64_t> bounds =
      pp > 1 ? model_stage_bounds(d, schedule_num_stages(cfg.parallel.schedule, pp),
                                  cfg.parallel.stage_layers)
             : std::vector<int64_t>{};
  int lanes = 1;  // expert exchanges in flight at once
  for (int r = 0; r < pp; ++r) {
    ModelPart part = model_part_whole(d);
    int slots = 1;
    if (pp > 1) {
      // (An F&B pair's two chunks exchange at once: two lanes.)
      const PipelinePlan plan =
          pipeline_plan(cfg.parallel.schedule, pp, static_cast<int>(M), r, bounds, d);
      part = plan.part;
      slots = plan.n_slots;
      lanes = std::max(lanes, plan.has_fb ? 2 : 1);
      pipe = std::max(pipe, static_cast<double>(pipeline_buffer_bytes(
                                plan, cfg.training.micro_batch, cfg.model.seq_len, d.C, ticked)));
    }
    double n_rep = 0, n_exp = 0;
    for (const ParamInfo& p : table)
      if (part.holds(p.layer)) (p.routed_experts ? n_exp : n_rep) += static_cast<double>(p.count);
    int64_t layers = 0;
    for (uint8_t h : part.layers) layers += h;
    params = std::max(params, (n_rep + n_exp) * 4);
    // Adam first and second moments, FP32 or BF16 (optim.state_dtype), sharded (ZeRO-1);
    // plus the FP32 reduced-gradient shard when sharded at all.
    const double shard = n_rep / zero + n_exp / ezero;
    optim = std::max(optim, shard * (2 * moment_bytes + (zero > 1 ? 4 : 0)));
    acts = std::max(acts, whole_acts * static_cast<double>(layers) / static_cast<double>(d.L) * slots);
  }
  const double grads = params;
  // bf16 / fp8: the weights as the GEMMs read them, and the workspace of quantized GEMM
  // operands every slot shares. Both are float-sized on every backend: the emulation keeps
  // rounded floats, and a GPU's native BF16 weights use half of the same allocation.
  const bool quantized = cfg.precision.mode != PrecisionMode::kFp32;
  const double gemm_weights = quantized ? params : 0.0;
  const double workspace = static_cast<double>(model_workspace_bytes(d, cfg.training.micro_batch));
  const int64_t N = int64_t{cfg.training.micro_batch} * cfg.model.seq_len;
  // The expert exchange's wire buffers, as EpExchange allocates them (on the GPU: its arena).
  const double exchange =
      d.ep > 1 && d.n_moe_blocks() > 0
          ? static_cast<double>(ep_exchange_buffer_bytes(
                d.dispatch_fp8 ? EpWireFormat::kFp8Bf16 : EpWireFormat::kFloat,
                moe_rows_max(d, N), d.C, lanes, gpu))
          : 0.0;
  const double fpt = model_flops_per_token(d);
  std::string s;
  s += strprintf("parameters: %lld total (%.2fM), %lld active per token (%.2fM matmul weights; "
                 "%.2fM with the embedding)\n",
                 static_cast<long long>(c.total), c.total / 1e6,
                 static_cast<long long>(c.active_matmul), c.active_matmul / 1e6,
                 static_cast<double>(c.active_matmul + c.embedding) / 1e6);
  if (c.mtp > 0)
    s += strprintf("  multi-token prediction: %lld module%s, %lld parameters (%.2fM) beside the "
                   "main model's (embedding and head shared)\n",
                   static_cast<long long>(d.mtp), d.mtp > 1 ? "s" : "",
                   static_cast<long long>(c.mtp), static_cast<double>(c.mtp) / 1e6);
  s += strprintf("  layers: %lld (%lld dense, %lld MoE: %lld routed experts top-%lld, %lld shared)\n",
                 static_cast<long long>(d.L), static_cast<long long>(d.dense_layers),
                 static_cast<long long>(d.n_moe_layers()), static_cast<long long>(d.E),
                 static_cast<long long>(d.K), static_cast<long long>(cfg.moe.num_shared_experts));
  s += strprintf("memory (per %s, MiB): parameters %.1f, gradients %.1f, optimizer %.1f "
                 "(%s moments, ZeRO-1 over %d, experts over %d), activations %.1f "
                 "(micro-batch %d x %d, %s)",
                 gpu ? "GPU" : "rank",
                 mib(params), mib(grads), mib(optim), to_string(cfg.optim.state_dtype), zero,
                 ezero, mib(acts), cfg.training.micro_batch, cfg.model.seq_len,
                 to_string(cfg.precision.mode));
  if (quantized)
    s += strprintf(", GEMM weight copy %.1f, GEMM workspace %.1f", mib(gemm_weights),
                   mib(workspace));
  if (exchange > 0) s += strprintf(", expert exchange %.1f", mib(exchange));
  if (pipe > 0) s += strprintf(", pipeline buffers %.1f", mib(pipe));
  s += strprintf(", total %.1f\n",
                 mib(params + grads + optim + acts + gemm_weights + workspace + exchange + pipe));
  if (worst_extra > 0)
    s += strprintf("  activations count balanced expert loads; the dropless worst case (every token "
                   "of the EP group routed here) adds %.1f MiB per micro-batch\n",
                   mib(worst_extra));
  s += strprintf("layout: dp %d x pp %d = %d ranks; ep %d (%lld routed experts per rank)\n", dp,
                 cfg.parallel.pp, dp * cfg.parallel.pp, ep,
                 static_cast<long long>(d.n_moe_layers() > 0 ? d.E / ep : 0));
  if (d.mla())
    s += strprintf("  attention: MLA, %lld heads, q rank %lld, kv rank %lld, qk %lld + %lld (RoPE), "
                   "v %lld per head\n",
                   static_cast<long long>(d.NH), static_cast<long long>(d.q_lora),
                   static_cast<long long>(d.kv_lora), static_cast<long long>(d.qk_nope),
                   static_cast<long long>(d.qk_rope), static_cast<long long>(d.v_hd));
  s += strprintf("FLOPs per token: %.4g (6 x active + 6 x layers x seq_len x heads x (qk + v head "
                 "dims)); per step: %.4g\n",
                 fpt, fpt * cfg.training.global_batch * cfg.model.seq_len);
  if (d.mtp > 0)
    s += strprintf("  multi-token prediction adds %.4g FLOPs per token in training (MFU counts "
                   "them)\n", model_mtp_flops_per_token(d));
  s += strprintf("step: global batch %d sequences = %d micro-batches of %d, %lld tokens\n",
                 cfg.training.global_batch,
                 cfg.training.global_batch / (cfg.training.micro_batch * cfg.parallel.dp),
                 cfg.training.micro_batch,
                 static_cast<long long>(cfg.training.global_batch) * cfg.model.seq_len);
  return s;
}

}  // namespace moe
