#include "trainer/train_checkpoint.h"

#include <algorithm>
#include <ctime>
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

// Reads the weights into m.params and, when moments is not null, both Adam moments into
// full-size buffers moments[0], moments[1] (n_alloc each).
void load_model_tensors(Model<float>& m, const CheckpointReader& r, float* const* moments) {
  for (const LogicalTensor& t : model_logical_tensors(m.d)) {
    r.read_f32("/model/" + t.name, t.shape, m.params + t.offset, t.ld);
    if (moments) {
      r.read_f32("/optim/m/" + t.name, t.shape, moments[0] + t.offset, t.ld);
      r.read_f32("/optim/v/" + t.name, t.shape, moments[1] + t.offset, t.ld);
    }
  }
  for (int64_t l = 0; l < m.d.n_moe_layers(); ++l)
    r.read_f32(bias_path(m.d, l), {m.d.E}, m.router_bias + l * m.d.E, m.d.E);
}

}  // namespace

void checkpoint_save(const TrainState& s, const RunPosition& pos, const std::string& path) {
  const Model<float>& m = s.model;
  const Config& cfg = s.cfg;
  // ZeRO-1 shards the moments: gather them whole (the checkpoint never stores a rank's
  // shard layout), then rank 0 writes while the others wait.
  const float* adam_m = s.adam_m - s.shard_begin;
  const float* adam_v = s.adam_v - s.shard_begin;
  std::vector<float> full_m, full_v;
  Comm* dp = train_dp_comm(s);
  if (dp) {
    full_m.assign(m.n_alloc, 0.0f);
    full_v.assign(m.n_alloc, 0.0f);
    std::copy_n(s.adam_m, s.shard, full_m.data() + s.shard_begin);
    std::copy_n(s.adam_v, s.shard, full_v.data() + s.shard_begin);
    dp->all_gather(full_m.data(), nullptr, s.shard);
    dp->all_gather(full_v.data(), nullptr, s.shard);
    adam_m = full_m.data();
    adam_v = full_v.data();
    if (!s.grid->is_root()) {
      dp->barrier();
      return;
    }
  }
  CheckpointWriter w(path);
  w.attr_i64("/meta", "format_version", kCheckpointFormatVersion);
  w.attr_str("/meta", "moetrain_version", MOETRAIN_VERSION);
  w.attr_i64("/meta", "step", pos.step);
  w.attr_i64("/meta", "tokens_seen", pos.tokens_seen);
  w.attr_f64("/meta", "loss", pos.loss);
  w.attr_f64("/meta", "val_loss", pos.val_loss);
  w.attr_str("/meta", "config_toml", config_to_toml(cfg));
  w.attr_i64("/meta", "dp", cfg.parallel.dp);
  w.attr_i64("/meta", "ep", cfg.parallel.ep);
  w.attr_i64("/meta", "pp", cfg.parallel.pp);
  w.attr_str("/meta", "schedule", to_string(cfg.parallel.schedule));
  w.attr_i64("/meta", "created_unix", static_cast<int64_t>(std::time(nullptr)));
  w.attr_i64("/optim", "step", pos.step);
  w.attr_f64("/optim", "lr", lr_at(s.lr_plan, pos.step > 0 ? pos.step - 1 : 0));
  w.attr_i64("/data", "seed", static_cast<int64_t>(cfg.run.seed));
  w.attr_i64("/data", "next_step", pos.step);
  for (const LogicalTensor& t : model_logical_tensors(m.d)) {
    w.write_f32("/model/" + t.name, t.shape, m.params + t.offset, t.ld);
    w.write_f32("/optim/m/" + t.name, t.shape, adam_m + t.offset, t.ld);
    w.write_f32("/optim/v/" + t.name, t.shape, adam_v + t.offset, t.ld);
  }
  for (int64_t l = 0; l < m.d.n_moe_layers(); ++l)
    w.write_f32(bias_path(m.d, l), {m.d.E}, m.router_bias + l * m.d.E, m.d.E);
  w.commit();
  if (dp) dp->barrier();
}

CheckpointInfo checkpoint_read_info(const std::string& path) {
  CheckpointReader r(path);
  return read_info(r);
}

CheckpointInfo checkpoint_load(TrainState& s, const std::string& path) {
  CheckpointReader r(path);
  CheckpointInfo info = read_info(r);
  // Every rank reads the whole tensors and keeps its own shard of the moments, so any
  // data-parallel layout can resume any checkpoint.
  if (s.shard == static_cast<int64_t>(s.model.n_alloc)) {  // one rank holds everything
    float* moments[2] = {s.adam_m, s.adam_v};
    load_model_tensors(s.model, r, moments);
    return info;
  }
  std::vector<float> full_m(s.model.n_alloc, 0.0f), full_v(s.model.n_alloc, 0.0f);
  float* moments[2] = {full_m.data(), full_v.data()};
  load_model_tensors(s.model, r, moments);
  std::copy_n(full_m.data() + s.shard_begin, s.shard, s.adam_m);
  std::copy_n(full_v.data() + s.shard_begin, s.shard, s.adam_v);
  return info;
}

CheckpointInfo checkpoint_load_model(Model<float>& m, const std::string& path) {
  CheckpointReader r(path);
  CheckpointInfo info = read_info(r);
  load_model_tensors(m, r, nullptr);
  return info;
}

}  // namespace moe
