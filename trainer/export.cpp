#include "trainer/export.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "io/checkpoint_file.h"
#include "io/config.h"
#include "model/check.h"
#include "model/fp8.h"
#include "trainer/checkpoint_tools.h"
#include "trainer/train_checkpoint.h"

namespace moe {

namespace {

namespace fs = std::filesystem;

constexpr size_t kChunkFloats = size_t(16) << 20;  // 64 MiB of FP32 per read

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Every source of the plan is a float32 dataset of its shape, and every model tensor and
// router bias of the checkpoint goes somewhere (MTP ones excepted under --drop-mtp): an
// export that silently left weights behind would load as a different model.
void check_sources(const CheckpointReader& r, const std::vector<ExportTensor>& plan, bool drop_mtp) {
  std::map<std::string, CheckpointDataset> stored;
  for (CheckpointDataset& d : r.list()) stored.emplace(d.path, std::move(d));
  std::set<std::string> used;
  for (const ExportTensor& t : plan)
    for (const ExportSource& s : t.sources) {
      auto it = stored.find(s.path);
      if (it == stored.end())
        user_error("%s: %s: missing (needed for %s)", r.path().c_str(), s.path.c_str(), t.name.c_str());
      if (it->second.dtype != "float32" || it->second.shape != s.shape)
        user_error("%s: %s: stored as %s %s, the export expects float32 %s", r.path().c_str(),
                   s.path.c_str(), it->second.dtype.c_str(), shape_text(it->second.shape).c_str(),
                   shape_text(s.shape).c_str());
      used.insert(s.path);
    }
  for (const auto& [path, d] : stored) {
    const bool weight = path.rfind("/model/", 0) == 0 || path.rfind("/router/", 0) == 0;
    const bool mtp = path.rfind("/model/mtp/", 0) == 0 || path.rfind("/router/mtp/", 0) == 0;
    if (weight && !used.count(path) && !(drop_mtp && mtp))
      user_error("%s: %s has no Hugging Face name in this export (checkpoint and exporter out "
                 "of step?)", r.path().c_str(), path.c_str());
  }
}

// Reads tensor `t` in row chunks from its sources, converts and appends it to `w`.
void stream_tensor(const CheckpointReader& r, const ExportTensor& t, SafetensorsWriter& w,
                   std::vector<float>& buf, std::vector<uint16_t>& half) {
  const int64_t rows = t.shape.empty() ? 1 : t.shape[0];
  const int64_t cols = t.shape.size() == 2 ? t.shape[1] : 1;
  if (rows == 0 || cols == 0) return;
  const int64_t step = std::max<int64_t>(1, static_cast<int64_t>(kChunkFloats) / cols);
  for (int64_t a = 0; a < rows; a += step) {
    const int64_t n = std::min(step, rows - a);
    const size_t count = static_cast<size_t>(n) * static_cast<size_t>(cols);
    buf.resize(count);
    for (const ExportSource& s : t.sources) {
      const int64_t lo = std::max(a, s.row0), hi = std::min(a + n, s.row0 + s.shape[0]);
      if (lo >= hi) continue;
      r.read_f32_rows(s.path, lo - s.row0, hi - lo,
                      buf.data() + static_cast<size_t>(lo - a) * static_cast<size_t>(cols) +
                          static_cast<size_t>(s.col0),
                      cols);
    }
    if (t.dtype == StDtype::kBF16) {
      half.resize(count);
      for (size_t i = 0; i < count; ++i) half[i] = bf16_from_float(buf[i]);
      w.append(half.data(), count * sizeof(uint16_t));
    } else {
      CHECK(t.dtype == StDtype::kF32, "%s: dtype %s", t.name.c_str(), to_string(t.dtype));
      w.append(buf.data(), count * sizeof(float));
    }
  }
}

void write_text(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) user_error("%s: cannot create (%s)", path.c_str(), std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      ::close(fd);
      user_error("%s: write failed (%s)", path.c_str(), std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0) user_error("%s: cannot close (%s)", path.c_str(), std::strerror(errno));
}

// The temporary files of an export in progress: removed (with the output folder, when the
// export created it and nothing else is in it) unless the export completes.
struct TempFiles {
  std::vector<std::string> paths;
  std::string created_dir;
  bool done = false;
  ~TempFiles() {
    if (done) return;
    std::error_code ec;
    for (const std::string& p : paths) fs::remove(p, ec);
    if (!created_dir.empty() && fs::is_empty(created_dir, ec)) fs::remove(created_dir, ec);
  }
};

// model.safetensors, model.safetensors.index.json or model-NNNNN-of-NNNNN.safetensors.
bool is_export_file(const std::string& n) {
  if (n == "model.safetensors" || n == "model.safetensors.index.json") return true;
  static const std::string pattern = "model-#####-of-#####.safetensors";
  if (n.size() != pattern.size()) return false;
  for (size_t i = 0; i < n.size(); ++i)
    if (pattern[i] == '#' ? (n[i] < '0' || n[i] > '9') : n[i] != pattern[i]) return false;
  return true;
}

}  // namespace

int export_main(const ExportArgs& args) {
  if (args.format != "safetensors")
    user_error("export: --format %s is not supported (only safetensors)", args.format.c_str());
  if (!(args.opt.shard_mb > 0 && args.opt.shard_mb < 1e12))
    user_error("export: --shard-mb must be > 0, got %g", args.opt.shard_mb);
  const std::string path = resolve_checkpoint(args.checkpoint);
  const CheckpointInfo info = checkpoint_read_info(path);
  const Config cfg = config_parse(info.config_toml, path + " (saved config)", {});

  const std::vector<ExportTensor> plan = export_plan(cfg, args.opt);
  CheckpointReader reader(path);
  check_sources(reader, plan, args.opt.drop_mtp);
  const std::vector<ExportFile> files =
      export_files(plan, static_cast<uint64_t>(args.opt.shard_mb * (1 << 20)));

  const fs::path out(args.output);
  TempFiles temps;
  std::error_code ec;
  if (fs::exists(out, ec)) {
    if (!fs::is_directory(out, ec))
      user_error("%s: exists and is not a directory", args.output.c_str());
  } else {
    fs::create_directories(out, ec);
    if (ec) user_error("%s: cannot create the output folder (%s)", args.output.c_str(),
                       ec.message().c_str());
    temps.created_dir = out.string();
  }
  const std::string suffix = ".tmp." + std::to_string(::getpid());
  std::vector<std::pair<std::string, std::string>> renames;  // (temporary, final)
  auto stage = [&](const std::string& name) {
    const std::string final_path = (out / name).string();
    temps.paths.push_back(final_path + suffix);
    renames.emplace_back(final_path + suffix, final_path);
    return temps.paths.back();
  };

  std::vector<float> buf;
  std::vector<uint16_t> half;
  uint64_t params = 0, bytes = 0;
  for (const ExportFile& f : files) {
    std::vector<SafetensorsSpec> specs;
    for (size_t i = f.first; i < f.first + f.count; ++i)
      specs.push_back(SafetensorsSpec{plan[i].name, plan[i].dtype, plan[i].shape});
    SafetensorsWriter w(stage(f.name), specs);
    for (size_t i = f.first; i < f.first + f.count; ++i) {
      stream_tensor(reader, plan[i], w, buf, half);
      params += plan[i].numel();
    }
    w.finish();
    bytes += f.bytes;
  }
  buf = {};
  half = {};
  if (files.size() > 1) write_text(stage("model.safetensors.index.json"), export_index_json(plan, files));
  write_text(stage("config.json"), export_config_json(cfg, args.opt));
  for (const auto& [from, to] : renames) durable_rename(from, to);
  temps.done = true;

  // Leftovers of an earlier export into the same folder (best effort).
  std::set<std::string> ours;
  for (const auto& [from, to] : renames) ours.insert(fs::path(to).filename().string());
  std::vector<fs::path> stale;
  for (const fs::directory_entry& e : fs::directory_iterator(out, ec)) {
    const std::string n = e.path().filename().string();
    if (is_export_file(n) && !ours.count(n)) stale.push_back(e.path());
  }
  for (const fs::path& p : stale) fs::remove(p, ec);

  std::printf("exported %s (step %lld) to %s: %zu tensors, %llu parameters, %.1f MiB of %s in "
              "%zu file%s%s\n", path.c_str(), static_cast<long long>(info.pos.step),
              args.output.c_str(), plan.size(), static_cast<unsigned long long>(params),
              static_cast<double>(bytes) / (1 << 20), to_string(args.opt.dtype), files.size(),
              files.size() == 1 ? "" : "s",
              cfg.model.mtp_depth > 0 && args.opt.drop_mtp ? " (MTP modules dropped)" : "");
  // After the export, so that a failing one prints its error line alone.
  if (!export_is_deepseek_v3(cfg))
    std::fprintf(stderr, "warning: %s has attention.kind = \"%s\": exported with q_proj/k_proj/"
                 "v_proj/o_proj and head_dim, but only attention.kind = \"mla\" checkpoints load "
                 "as DeepSeek-V3\n", path.c_str(), to_string(cfg.attention.kind));
  return 0;
}

}  // namespace moe
