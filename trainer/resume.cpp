#include "trainer/resume.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <sstream>

#include "io/checkpoint_file.h"
#include "model/check.h"

namespace moe {

namespace {

// "section.key" -> value text, from the canonical TOML that config_to_toml writes.
std::map<std::string, std::string> flatten(const Config& cfg) {
  std::map<std::string, std::string> out;
  std::istringstream in(config_to_toml(cfg));
  std::string line, section;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    if (line[0] == '[') {
      section = line.substr(1, line.find(']') - 1);
      continue;
    }
    const size_t eq = line.find(" = ");
    if (eq == std::string::npos) continue;
    out[section + "." + line.substr(0, eq)] = line.substr(eq + 3);
  }
  return out;
}

// Keys whose change would make the saved tensors mean something else.
bool changes_the_model(const std::string& key) {
  static const char* kSafeModelKeys[] = {"model.init_std", "model.mtp_loss_weight"};
  for (const char* k : kSafeModelKeys)
    if (key == k) return false;
  if (key.rfind("model.", 0) == 0 || key.rfind("attention.", 0) == 0) return true;
  static const char* kMoeShape[] = {"moe.num_experts", "moe.num_shared_experts", "moe.top_k",
                                    "moe.d_expert", "moe.score", "moe.route_scale",
                                    "moe.num_groups", "moe.topk_groups"};
  for (const char* k : kMoeShape)
    if (key == k) return true;
  return false;
}

std::vector<std::string> checkpoints_in(const std::string& dir) {
  CheckpointDir cd{dir};
  std::vector<std::string> out;
  const std::string latest = cd.latest();
  if (!latest.empty()) out.push_back((std::filesystem::path(dir) / latest).string());
  for (const std::string& p : cd.list_newest_first())
    if (std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  return out;
}

}  // namespace

std::vector<std::string> config_resume_changes(const Config& saved, const Config& now,
                                               const std::string& ckpt_path) {
  const auto a = flatten(saved), b = flatten(now);
  std::vector<std::string> allowed;
  for (const auto& [key, value] : b) {
    auto it = a.find(key);
    const std::string old = it == a.end() ? "(absent)" : it->second;
    if (old == value) continue;
    if (changes_the_model(key))
      user_error("%s: was written with %s = %s but the config says %s = %s; a resumed run "
                 "cannot change the model's shape",
                 ckpt_path.c_str(), key.c_str(), old.c_str(), key.c_str(), value.c_str());
    allowed.push_back(key + ": " + old + " -> " + value);
  }
  return allowed;
}

std::vector<std::string> resume_candidates(const Config& cfg) {
  const std::string& r = cfg.checkpoint.resume;
  if (r == "none") {
    const std::vector<std::string> existing = checkpoints_in(cfg.checkpoint.dir);
    if (!existing.empty())
      user_error("%s: holds checkpoints of an earlier run (%s); resume it with --resume "
                 "(checkpoint.resume = \"auto\"), or choose another checkpoint.dir",
                 cfg.checkpoint.dir.c_str(), existing.front().c_str());
    return {};
  }
  if (r == "auto") return checkpoints_in(cfg.checkpoint.dir);
  if (std::filesystem::is_directory(r)) {
    std::vector<std::string> found = checkpoints_in(r);
    if (found.empty()) user_error("%s: checkpoint.resume names a folder with no checkpoints", r.c_str());
    return found;
  }
  if (!std::filesystem::exists(r)) user_error("%s: checkpoint.resume: no such file", r.c_str());
  return {r};
}

}  // namespace moe
