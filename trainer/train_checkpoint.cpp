#include "trainer/train_checkpoint.h"

#include <ctime>

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

void load_model_tensors(Model<float>& m, const CheckpointReader& r, float* adam_m, float* adam_v) {
  for (const LogicalTensor& t : model_logical_tensors(m.d)) {
    r.read_f32("/model/" + t.name, t.shape, m.params + t.offset, t.ld);
    if (adam_m) r.read_f32("/optim/m/" + t.name, t.shape, adam_m + t.offset, t.ld);
    if (adam_v) r.read_f32("/optim/v/" + t.name, t.shape, adam_v + t.offset, t.ld);
  }
  for (int64_t l = 0; l < m.d.n_moe_layers(); ++l)
    r.read_f32(bias_path(m.d, l), {m.d.E}, m.router_bias + l * m.d.E, m.d.E);
}

}  // namespace

void checkpoint_save(const TrainState& s, const RunPosition& pos, const std::string& path) {
  const Model<float>& m = s.model;
  const Config& cfg = s.cfg;
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
    w.write_f32("/optim/m/" + t.name, t.shape, s.adam_m + t.offset, t.ld);
    w.write_f32("/optim/v/" + t.name, t.shape, s.adam_v + t.offset, t.ld);
  }
  for (int64_t l = 0; l < m.d.n_moe_layers(); ++l)
    w.write_f32(bias_path(m.d, l), {m.d.E}, m.router_bias + l * m.d.E, m.d.E);
  w.commit();
}

CheckpointInfo checkpoint_read_info(const std::string& path) {
  CheckpointReader r(path);
  return read_info(r);
}

CheckpointInfo checkpoint_load(TrainState& s, const std::string& path) {
  CheckpointReader r(path);
  CheckpointInfo info = read_info(r);
  load_model_tensors(s.model, r, s.adam_m, s.adam_v);
  return info;
}

CheckpointInfo checkpoint_load_model(Model<float>& m, const std::string& path) {
  CheckpointReader r(path);
  CheckpointInfo info = read_info(r);
  load_model_tensors(m, r, nullptr, nullptr);
  return info;
}

}  // namespace moe
