#include "trainer/checkpoint_tools.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <vector>

#include "io/checkpoint_file.h"
#include "io/config.h"
#include "io/config_model.h"
#include "io/dataset.h"
#include "model/check.h"
#include "trainer/generate.h"
#include "trainer/train_checkpoint.h"
#include "trainer/train_step.h"

namespace moe {

// A file as given, or a folder's newest checkpoint that opens. The checkpoints passed over
// are warned about only when an older one opens; when none does, the one error line names
// the newest one's problem.
std::string resolve_checkpoint(const std::string& given) {
  if (!std::filesystem::exists(given)) user_error("%s: no such checkpoint file or folder", given.c_str());
  if (!std::filesystem::is_directory(given)) return given;
  CheckpointDir dir{given};
  std::vector<std::string> paths;
  if (!dir.latest().empty()) paths.push_back((std::filesystem::path(given) / dir.latest()).string());
  for (const std::string& p : dir.list_newest_first())
    if (std::find(paths.begin(), paths.end(), p) == paths.end()) paths.push_back(p);
  std::vector<std::string> skipped;
  for (const std::string& p : paths) {
    try {
      checkpoint_read_info(p);
    } catch (const UserError& e) {
      skipped.push_back(e.what());
      continue;
    }
    for (const std::string& why : skipped)
      std::fprintf(stderr, "warning: %s; used an older checkpoint\n", why.c_str());
    return p;
  }
  if (skipped.empty()) user_error("%s: no checkpoint in this folder (step-*.h5)", given.c_str());
  user_error("%s: no readable checkpoint in this folder (%zu tried; newest: %s)", given.c_str(),
             skipped.size(), skipped.front().c_str());
}

namespace {

Config saved_config(const std::string& path, const CheckpointInfo& info) {
  return config_parse(info.config_toml, path + " (saved config)", {});
}

}  // namespace

int inspect_main(const std::string& given) {
  const std::string path = resolve_checkpoint(given);
  CheckpointReader r(path);
  const CheckpointInfo info = checkpoint_read_info(path);
  const Config cfg = saved_config(path, info);
  const ModelDims d = config_model_dims(cfg);
  const std::time_t created = static_cast<std::time_t>(r.attr_i64("/meta", "created_unix"));
  char when[64] = "?";
  std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&created));
  std::printf("checkpoint: %s\n", path.c_str());
  std::printf("  format %lld, written by moetrain %s on %s\n",
              static_cast<long long>(r.attr_i64("/meta", "format_version")), info.version.c_str(), when);
  std::printf("  step %lld of %lld, %lld tokens seen, loss %.4f", static_cast<long long>(info.pos.step),
              static_cast<long long>(cfg.training.steps), static_cast<long long>(info.pos.tokens_seen),
              info.pos.loss);
  if (info.pos.val_loss >= 0) std::printf(", val loss %.4f", info.pos.val_loss);
  std::printf("\n  layout: dp %lld, ep %lld, pp %lld, schedule %s\n",
              static_cast<long long>(r.attr_i64("/meta", "dp")),
              static_cast<long long>(r.attr_i64("/meta", "ep")),
              static_cast<long long>(r.attr_i64("/meta", "pp")), r.attr_str("/meta", "schedule").c_str());
  std::printf("  model: run \"%s\", d_model %lld, %lld layers (%lld dense, %lld MoE: %lld routed "
              "experts top-%lld, %d shared), vocab %lld, seq_len %lld\n",
              cfg.run.name.c_str(), static_cast<long long>(d.C), static_cast<long long>(d.L),
              static_cast<long long>(d.dense_layers), static_cast<long long>(d.n_moe_layers()),
              static_cast<long long>(d.E), static_cast<long long>(d.K), cfg.moe.num_shared_experts,
              static_cast<long long>(d.V), static_cast<long long>(d.T));
  const ModelCounts counts = model_counts(d);
  std::printf("  parameters: %lld (%lld active per token)\n", static_cast<long long>(counts.total),
              static_cast<long long>(counts.active_matmul));
  const std::vector<CheckpointDataset> datasets = r.list();
  std::printf("  datasets: %zu\n", datasets.size());
  for (const CheckpointDataset& ds : datasets) {
    std::string shape = "[";
    for (size_t i = 0; i < ds.shape.size(); ++i)
      shape += (i ? ", " : "") + std::to_string(ds.shape[i]);
    shape += "]";
    std::printf("    %-52s %-8s %-14s%s\n", ds.path.c_str(), ds.dtype.c_str(), shape.c_str(),
                ds.fletcher32 ? " fletcher32" : "");
  }
  const std::string failure = r.verify_all();
  if (!failure.empty()) {
    std::printf("  checksums: FAILED\n");
    user_error("%s", failure.c_str());
  }
  std::printf("  checksums: all %zu datasets intact\n", datasets.size());
  return 0;
}

int eval_main(const std::string& given, const EvalOptions& opt) {
  const std::string path = resolve_checkpoint(given);
  const CheckpointInfo info = checkpoint_read_info(path);
  Config cfg = saved_config(path, info);
  const std::string data = opt.data.empty() ? cfg.data.val : opt.data;
  if (data.empty()) user_error("%s: the run had no data.val; pass --data", path.c_str());
  const int batches = opt.batches > 0 ? opt.batches : cfg.log.eval_batches;
  TokenShard shard(data);
  const int64_t T_ = cfg.model.seq_len;
  if (shard.size() < T_ + 1)
    user_error("%s: %lld tokens is fewer than model.seq_len + 1 = %lld", data.c_str(),
               static_cast<long long>(shard.size()), static_cast<long long>(T_ + 1));
  TrainState s;
  train_state_init(s, cfg);
  checkpoint_load_model(s.model, path);
  const int64_t B = cfg.training.micro_batch, windows = static_cast<int64_t>(batches) * B;
  BatchSource source = [&](int32_t* out, int64_t, int64_t first, int64_t n) {
    dataset_val_batch(shard, out, first, n, windows, T_, cfg.model.vocab_size);
  };
  const double loss = eval_loss(s, batches, source);
  std::printf("eval %s on %s (%lld windows of %lld tokens): loss %.4f nats/token, perplexity %.3f",
              path.c_str(), data.c_str(), static_cast<long long>(windows),
              static_cast<long long>(T_), loss, std::exp(loss));
  if (cfg.model.vocab_size == 256) std::printf(", %.4f bits per byte", loss / std::log(2.0));
  std::printf("\n");
  return 0;
}

int generate_main(const std::string& given, const GenerateOptions& opt) {
  const std::string path = resolve_checkpoint(given);
  const CheckpointInfo info = checkpoint_read_info(path);
  const Config cfg = saved_config(path, info);
  Model<float> m;
  model_build<float>(m, config_model_dims(cfg), 1);
  checkpoint_load_model(m, path);
  for (int i = 0; i < opt.samples; ++i) {
    const std::string text = generate_text(m, opt.prompt, opt.tokens, opt.temperature, opt.top_k,
                                           opt.seed, static_cast<uint64_t>(i));
    std::printf("%s%s\n", opt.prompt.c_str(), text.c_str());
    if (i + 1 < opt.samples) std::printf("---\n");
  }
  return 0;
}

}  // namespace moe
