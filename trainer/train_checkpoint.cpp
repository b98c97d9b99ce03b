#include "trainer/train_checkpoint.h"

#include <algorithm>
#include <ctime>
#include <memory>
#include <vector>

#include "io/checkpoint_file.h"
#include "model/check.h"

namespace moe {

namespace {

std::string bias_path(const ModelDims& d, int64_t moe_layer) {
  return "/router/layers/" + std::to_string(d.dense_layers + moe_layer) + "/bias";
}

CheckpointInfo read_info(const CheckpointReader& r) {
  CheckpointInfo info;
  info.pos.step = r.attr_i64("/meta", "step");
  info.pos.tokens_seen = r.attr_i64("/meta", "tokens_seen");
  info.pos.loss = r.attr_f64("/meta", "loss");
  info.pos.val_loss = r.attr_f64("/meta", "val_loss");
  info.config_toml = r.attr_str("/meta", "config_toml");
  info.version = r.attr_str("/meta", "moetrain_version");
  return info;
}

// Calls f(a, b) for each run [a, b) of flat indices that belongs to logical tensor t (rows
// `ld` apart) and falls inside [lo, hi).
template <typename F>
void for_each_shard_run(const LogicalTensor& t, int64_t lo, int64_t hi, F&& f) {
  const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1, cols = t.shape.back();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row0 = static_cast<int64_t>(t.offset) + r * t.ld;
    const int64_t a = std::max(lo, row0), b = std::min(hi, row0 + cols);
    if (a < b) f(a, b);
  }
}

// shard (this rank's part of a flat buffer, indexed from lo) -> dense (the tensor, rows ld
// apart), and back.
void shard_to_dense(float* dense, const float* shard, const LogicalTensor& t, int64_t lo,
                    int64_t hi) {
  const int64_t base = static_cast<int64_t>(t.offset);
  for_each_shard_run(t, lo, hi, [&](int64_t a, int64_t b) {
    std::copy(shard + (a - lo), shard + (b - lo), dense + (a - base));
  });
}
void dense_to_shard(float* shard, const float* dense, const LogicalTensor& t, int64_t lo,
                    int64_t hi) {
  const int64_t base = static_cast<int64_t>(t.offset);
  for_each_shard_run(t, lo, hi, [&](int64_t a, int64_t b) {
    std::copy(dense + (a - base), dense + (b - base), shard + (a - lo));
  });
}

int64_t dense_span(const LogicalTensor& t) {
  const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
  return (rows - 1) * t.ld + t.shape.back();
}

// Reads the weights into m.params and, when s is not null, this rank's shard of both Adam
// moments (one tensor at a time: never a full-size moment buffer).
void load_model_tensors(Model<float>& m, const CheckpointReader& r, TrainState* s) {
  std::vector<float> dense;
  const int64_t lo = s ? s->shard_begin : 0, hi = s ? s->shard_begin + s->shard : 0;
  for (const LogicalTensor& t : model_logical_tensors(m.d)) {
    r.read_f32("/model/" + t.name, t.shape, m.params + t.offset, t.ld);
    if (!s) continue;
    dense.resize(static_cast<size_t>(dense_span(t)));
    r.read_f32("/optim/m/" + t.name, t.shape, dense.data(), t.ld);
    dense_to_shard(s->adam_m, dense.data(), t, lo, hi);
    r.read_f32("/optim/v/" + t.name, t.shape, dense.data(), t.ld);
    dense_to_shard(s->adam_v, dense.data(), t, lo, hi);
  }
  for (int64_t l = 0; l < m.d.n_moe_layers(); ++l)
    r.read_f32(bias_path(m.d, l), {m.d.E}, m.router_bias + l * m.d.E, m.d.E);
}

}  // namespace

void checkpoint_save(const TrainState& s, const RunPosition& pos, const std::string& path) {
  const Model<float>& m = s.model;
  const Config& cfg = s.cfg;
  // ZeRO-1 shards the moments. The checkpoint never stores a rank's shard layout: each
  // moment tensor is assembled on rank 0 by a reduction in which every rank contributes its
  // own elements and zeros elsewhere (exact), one tensor at a time, while rank 0 writes.
  Comm* dp = train_dp_comm(s);
  const bool writer = !dp || s.grid->is_root();
  std::unique_ptr<CheckpointWriter> w;
  if (writer) w = std::make_unique<CheckpointWriter>(path);
  if (writer) {
    w->attr_i64("/meta", "format_version", kCheckpointFormatVersion);
    w->attr_str("/meta", "moetrain_version", MOETRAIN_VERSION);
    w->attr_i64("/meta", "step", pos.step);
    w->attr_i64("/meta", "tokens_seen", pos.tokens_seen);
    w->attr_f64("/meta", "loss", pos.loss);
    w->attr_f64("/meta", "val_loss", pos.val_loss);
    w->attr_str("/meta", "config_toml", config_to_toml(cfg));
    w->attr_i64("/meta", "dp", cfg.parallel.dp);
    w->attr_i64("/meta", "ep", cfg.parallel.ep);
    w->attr_i64("/meta", "pp", cfg.parallel.pp);
    w->attr_str("/meta", "schedule", to_string(cfg.parallel.schedule));
    w->attr_i64("/meta", "created_unix", static_cast<int64_t>(std::time(nullptr)));
    w->attr_i64("/optim", "step", pos.step);
    w->attr_f64("/optim", "lr", lr_at(s.lr_plan, pos.step > 0 ? pos.step - 1 : 0));
    w->attr_i64("/data", "seed", static_cast<int64_t>(cfg.run.seed));
    w->attr_i64("/data", "next_step", pos.step);
  }
  const int64_t lo = s.shard_begin, hi = s.shard_begin + s.shard;
  std::vector<float> mine, whole;
  for (const LogicalTensor& t : model_logical_tensors(m.d)) {
    if (writer) w->write_f32("/model/" + t.name, t.shape, m.params + t.offset, t.ld);
    const float* moments[2] = {s.adam_m, s.adam_v};
    const char* names[2] = {"/optim/m/", "/optim/v/"};
    for (int k = 0; k < 2; ++k) {
      if (!dp) {  // one rank holds everything: write straight from the moment buffer
        w->write_f32(names[k] + t.name, t.shape, moments[k] + t.offset, t.ld);
        continue;
      }
      mine.assign(static_cast<size_t>(dense_span(t)), 0.0f);
      whole.resize(mine.size());
      shard_to_dense(mine.data(), moments[k], t, lo, hi);
      dp->reduce_sum(whole.data(), mine.data(), static_cast<int64_t>(mine.size()), 0);
      if (writer) w->write_f32(names[k] + t.name, t.shape, whole.data(), t.ld);
    }
  }
  if (writer) {
    for (int64_t l = 0; l < m.d.n_moe_layers(); ++l)
      w->write_f32(bias_path(m.d, l), {m.d.E}, m.router_bias + l * m.d.E, m.d.E);
    w->commit();
  }
  if (dp) dp->barrier();  // the file is complete before any rank moves on
}

CheckpointInfo checkpoint_read_info(const std::string& path) {
  CheckpointReader r(path);
  return read_info(r);
}

CheckpointInfo checkpoint_load(TrainState& s, const std::string& path) {
  CheckpointReader r(path);
  CheckpointInfo info = read_info(r);
  // Every rank reads the whole weights and keeps its own shard of the moments, so any
  // data-parallel layout can resume any checkpoint.
  load_model_tensors(s.model, r, &s);
  return info;
}

CheckpointInfo checkpoint_load_model(Model<float>& m, const std::string& path) {
  CheckpointReader r(path);
  CheckpointInfo info = read_info(r);
  load_model_tensors(m, r, nullptr);
  return info;
}

}  // namespace moe
