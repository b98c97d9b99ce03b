#include "trainer/train_checkpoint.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

#include "io/checkpoint_file.h"
#include "model/check.h"
#include "model/fp8.h"

namespace moe {

namespace {

// MoE block moe_l's router bias (ModelDims::moe_index): a layer's, or an MTP module's.
std::string bias_path(const ModelDims& d, int64_t moe_l) {
  if (moe_l < d.n_moe_layers())
    return "/router/layers/" + std::to_string(d.dense_layers + moe_l) + "/bias";
  return "/router/mtp/" + std::to_string(moe_l - d.n_moe_layers()) + "/bias";
}

CheckpointInfo read_info(const CheckpointReader& r) {
  CheckpointInfo info;
  info.pos.step = r.attr_i64("/meta", "step");
  info.pos.tokens_seen = r.attr_i64("/meta", "tokens_seen");
  info.pos.loss = r.attr_f64("/meta", "loss");
  info.pos.val_loss = r.attr_f64("/meta", "val_loss");
  info.config_toml = r.attr_str("/meta", "config_toml");
  info.version = r.attr_str("/meta", "moetrain_version");
  if (r.has_attr("/data", "spike_history"))
    info.pos.spike_history = r.attr_str("/data", "spike_history");
  if (r.has_attr("/data", "skipped_batches")) {
    const std::string list = r.attr_str("/data", "skipped_batches");
    const char* p = list.c_str();
    while (*p) {
      char* end = nullptr;
      const long long b = std::strtoll(p, &end, 10);
      if (end == p || b < 0)
        user_error("%s: /data skipped_batches is not a list of batch numbers: \"%s\"",
                   r.path().c_str(), list.c_str());
      info.pos.skipped_batches.push_back(b);
      p = end;
      while (*p == ' ') ++p;
    }
  }
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

// Elements as the file holds them (FP32) and as the state holds them (FP32, or BF16 moment
// bits: widening is exact, narrowing rounds to nearest even, exact for widened BF16).
float as_f32(float x) { return x; }
float as_f32(uint16_t h) { return bf16_to_float(h); }
void store_as(float* dst, float x) { *dst = x; }
void store_as(uint16_t* dst, float x) { *dst = bf16_from_float(x); }

// shard (this rank's part of a flat buffer, indexed from lo) -> dense (the tensor, rows ld
// apart), and back. The shard holds floats or BF16 moments; the dense tensor is FP32.
template <typename T>
void shard_to_dense(float* dense, const T* shard, const LogicalTensor& t, int64_t lo,
                    int64_t hi) {
  const int64_t base = static_cast<int64_t>(t.offset);
  for_each_shard_run(t, lo, hi, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) dense[i - base] = as_f32(shard[i - lo]);
  });
}
template <typename T>
void dense_to_shard(T* shard, const float* dense, const LogicalTensor& t, int64_t lo,
                    int64_t hi) {
  const int64_t base = static_cast<int64_t>(t.offset);
  for_each_shard_run(t, lo, hi, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) store_as(shard + (i - lo), dense[i - base]);
  });
}

// Calls f(p) with moment k (0: m, 1: v) of this rank's shards, (state_size) elements, typed
// as the state keeps it: float* or uint16_t* (BF16 bits).
template <typename S, typename F>
void with_moment(S& s, int k, F&& f) {
  if (s.adam_m_bf16) {
    f(k == 0 ? s.adam_m_bf16 : s.adam_v_bf16);
  } else {
    f(k == 0 ? s.adam_m : s.adam_v);
  }
}

int64_t dense_span(const LogicalTensor& t) {
  const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
  return (rows - 1) * t.ld + t.shape.back();
}

// The part of this rank's shards of moment k that falls inside tensor t's span, as a host
// copy: f(host, lo, hi) sees flat elements [lo, hi) of one region's shard at host[i - lo]
// (float, or BF16 bits). With write_back the copy is uploaded again after f, so elements of
// other tensors inside the span keep their values. The state is device memory on a GPU run.
template <typename S, typename F>
void with_moment_span(S& s, int k, const LogicalTensor& t, bool write_back, F&& f) {
  Ops<float>& ops = *s.model.ops;
  const int64_t t_lo = static_cast<int64_t>(t.offset), t_hi = t_lo + dense_span(t);
  with_moment(s, k, [&](auto* moment) {
    using Elem = std::remove_const_t<std::remove_pointer_t<decltype(moment)>>;
    std::vector<Elem> host;
    for (const ShardRegion& g : s.regions) {
      const int64_t lo = std::max(t_lo, g.shard_begin), hi = std::min(t_hi, g.shard_begin + g.shard);
      if (lo >= hi) continue;
      host.resize(static_cast<size_t>(hi - lo));
      auto* dev = moment + g.state_offset + (lo - g.shard_begin);
      const size_t bytes = host.size() * sizeof(Elem);
      ops.download(host.data(), dev, bytes);
      f(host.data(), lo, hi);
      if constexpr (!std::is_const_v<std::remove_pointer_t<decltype(moment)>>)
        if (write_back) ops.upload(dev, host.data(), bytes);
    }
  });
}

// Tensor t's span of the parameters, read to the host (through the backend: device memory on
// a GPU run) into `span`.
void download_span(const Model<float>& m, const LogicalTensor& t, std::vector<float>& span) {
  span.resize(static_cast<size_t>(dense_span(t)));
  m.ops->download(span.data(), m.params + t.offset, span.size() * sizeof(float));
}

// Reads the weights this model holds into m.params and, when s is not null, this rank's
// shards of both Adam moments (one tensor at a time: never a full-size moment buffer).
void load_model_tensors(Model<float>& m, const CheckpointReader& r, TrainState* s) {
  std::vector<float> dense, span;
  for (const LogicalTensor& t : model_logical_tensors(m.d, m.table)) {
    // Through a host copy of the tensor's span: rows ld apart leave other tensors' elements
    // between them, which the upload must carry back unchanged.
    download_span(m, t, span);
    r.read_f32("/model/" + t.name, t.shape, span.data(), t.ld);
    m.ops->upload(m.params + t.offset, span.data(), span.size() * sizeof(float));
    if (!s) continue;
    dense.resize(static_cast<size_t>(dense_span(t)));
    const char* names[2] = {"/optim/m/", "/optim/v/"};
    for (int k = 0; k < 2; ++k) {
      r.read_f32(names[k] + t.name, t.shape, dense.data(), t.ld);
      with_moment_span(*s, k, t, true, [&](auto* host, int64_t lo, int64_t hi) {
        dense_to_shard(host, dense.data(), t, lo, hi);
      });
    }
  }
  for (int64_t l = 0; l < m.d.n_moe_blocks(); ++l)
    r.read_f32(bias_path(m.d, l), {m.d.E}, m.router_bias + l * m.d.E, m.d.E);
}

}  // namespace

void checkpoint_save(const TrainState& s, const RunPosition& pos, const std::string& path) {
  const Model<float>& m = s.model;
  const Config& cfg = s.cfg;
  // The checkpoint never stores a rank's layout: every tensor is written whole, under its
  // global name. Rank 0 writes. A tensor rank 0 does not hold (another EP rank's experts,
  // another pipeline rank's layers), and every moment (ZeRO-1 shards), is assembled on rank 0
  // by a reduction over the job in which one owner contributes its elements and every other
  // rank zeros (exact), one tensor at a time.
  Comm* world = train_world_comm(s);
  const bool writer = !world || s.grid->is_root();
  // A write that fails on rank 0 (disk full, quota, I/O error) must not leave the other ranks
  // inside this save's reductions: rank 0 keeps the first error, drops the file (the writer
  // removes its temporary file) and goes on taking part in every reduction without writing.
  // The outcome is agreed at the end, so every rank returns or throws alike and the caller
  // may train on (checkpoint.on_save_error = "continue").
  std::unique_ptr<CheckpointWriter> w;
  std::string write_error;
  auto write = [&](auto&& f) {
    if (!w) return;
    try {
      f(*w);
    } catch (const UserError& e) {
      write_error = e.what();
      w.reset();
    }
  };
  if (writer) {
    try {
      w = std::make_unique<CheckpointWriter>(path);
    } catch (const UserError& e) {
      write_error = e.what();
    }
  }
  write([&](CheckpointWriter& out) {
    out.attr_i64("/meta", "format_version", kCheckpointFormatVersion);
    out.attr_str("/meta", "moetrain_version", MOETRAIN_VERSION);
    out.attr_i64("/meta", "step", pos.step);
    out.attr_i64("/meta", "tokens_seen", pos.tokens_seen);
    out.attr_f64("/meta", "loss", pos.loss);
    out.attr_f64("/meta", "val_loss", pos.val_loss);
    out.attr_str("/meta", "config_toml", config_to_toml(cfg));
    out.attr_i64("/meta", "dp", cfg.parallel.dp);
    out.attr_i64("/meta", "ep", cfg.parallel.ep);
    out.attr_i64("/meta", "pp", cfg.parallel.pp);
    out.attr_str("/meta", "schedule", to_string(cfg.parallel.schedule));
    out.attr_i64("/meta", "created_unix", static_cast<int64_t>(std::time(nullptr)));
    out.attr_i64("/optim", "step", pos.step);
    out.attr_f64("/optim", "lr", lr_at(s.lr_plan, pos.step > 0 ? pos.step - 1 : 0));
    out.attr_i64("/data", "seed", static_cast<int64_t>(cfg.run.seed));
    out.attr_i64("/data", "next_step", pos.step);
    out.attr_str("/data", "spike_history", pos.spike_history);
    std::string skipped;
    for (int64_t b : pos.skipped_batches) {
      if (!skipped.empty()) skipped += ' ';
      skipped += std::to_string(b);
    }
    out.attr_str("/data", "skipped_batches", skipped);
  });
  // The whole model's tensors in one order on every rank; where this rank holds each.
  std::map<std::string, LogicalTensor> held;
  for (const LogicalTensor& t : model_logical_tensors(m.d, m.table)) held.emplace(t.name, t);
  // The one copy of each weight that goes into the file: dp rank 0 (or the first rank of the
  // experts' group) of the first pipeline rank holding it (DualPipe holds each stage twice).
  const ProcessGrid* grid = s.grid;
  const bool first_copy = !grid || grid->copies == 1 || grid->pp_rank < grid->pp / 2;
  auto owns = [&](const LogicalTensor& t) {
    return first_copy && (!grid || (t.expert < 0 ? grid->dp_rank == 0 : grid->edp_rank == 0));
  };
  std::vector<float> mine, total, span;
  // Assembles tensor g on rank 0 from every rank's contribution (fill puts this rank's
  // elements into a zeroed buffer of g's layout; the sum is exact) and writes it there.
  auto assemble_and_write = [&](const std::string& path, const LogicalTensor& g, auto&& fill) {
    mine.assign(static_cast<size_t>(dense_span(g)), 0.0f);
    total.resize(mine.size());
    fill(mine.data());
    world->reduce_sum(total.data(), mine.data(), static_cast<int64_t>(mine.size()), 0);
    write([&](CheckpointWriter& out) { out.write_f32(path, g.shape, total.data(), g.ld); });
  };
  for (const LogicalTensor& g : model_logical_tensors(m.d.whole_model())) {
    const auto it = held.find(g.name);
    const LogicalTensor* t = it == held.end() ? nullptr : &it->second;
    // Weights: rank 0 writes its own copy; the rest come from their owner. Whether rank 0
    // holds a tensor is the same question on every rank (its pipeline part, and global
    // expert id < EL), so all ranks agree on which tensors need a reduction.
    const bool root_holds = s.root_part.holds(g.layer) && g.expert < m.d.EL();
    if (!world || root_holds) {
      write([&](CheckpointWriter& out) {
        download_span(m, *t, span);
        out.write_f32("/model/" + g.name, g.shape, span.data(), t->ld);
      });
    } else {
      assemble_and_write("/model/" + g.name, g, [&](float* dense) {
        if (!t || !owns(*t)) return;
        download_span(m, *t, span);
        shard_to_dense(dense, span.data(), *t, static_cast<int64_t>(t->offset),
                       static_cast<int64_t>(t->offset) + dense_span(*t));
      });
    }
    // The moments go into the file as FP32 whatever the state's dtype (BF16 widens exactly).
    const char* names[2] = {"/optim/m/", "/optim/v/"};
    for (int k = 0; k < 2; ++k) {
      // Puts this rank's elements of the moment into tensor t's layout (one tensor's worth).
      auto fill = [&](float* dense) {
        if (!t) return;
        with_moment_span(s, k, *t, false, [&](const auto* host, int64_t lo, int64_t hi) {
          shard_to_dense(dense, host, *t, lo, hi);
        });
      };
      if (!world) {  // one rank holds everything, one tensor at a time
        write([&](CheckpointWriter& out) {
          mine.assign(static_cast<size_t>(dense_span(*t)), 0.0f);
          fill(mine.data());
          out.write_f32(names[k] + g.name, g.shape, mine.data(), t->ld);
        });
        continue;
      }
      assemble_and_write(names[k] + g.name, g, fill);
    }
  }
  write([&](CheckpointWriter& out) {
    for (int64_t l = 0; l < m.d.n_moe_blocks(); ++l)
      out.write_f32(bias_path(m.d, l), {m.d.E}, m.router_bias + l * m.d.E, m.d.E);
    out.commit();
  });
  // The file is complete (or abandoned) before any rank moves on, and every rank knows which.
  double failed = write_error.empty() ? 0.0 : 1.0;
  if (world) world->all_reduce_max(&failed, 1);
  if (failed > 0) {
    if (!write_error.empty()) throw UserError(write_error);
    user_error("rank 0 could not write it");
  }
}

int64_t data_batch_for_step(int64_t step, const std::vector<int64_t>& skipped_batches) {
  int64_t b = step;
  for (int64_t x : skipped_batches)
    if (x <= b) ++b;
  return b;
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
