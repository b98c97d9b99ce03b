#include "trainer/run_health.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <utility>

#include "model/check.h"

namespace moe {

SpikeGuard::SpikeGuard(double factor, int64_t window)
    : factor_(factor), window_(static_cast<size_t>(std::max<int64_t>(window, 1))) {}

double SpikeGuard::median() const {
  if (last_.empty()) return NAN;
  std::vector<double> v = last_;
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(mid), v.end());
  if (v.size() % 2 == 1) return v[mid];
  const double hi = v[mid];
  return 0.5 * (*std::max_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(mid)) + hi);
}

double SpikeGuard::limit() const {
  if (factor_ <= 0 || last_.size() < window_) return HUGE_VAL;
  return factor_ * median();
}

void SpikeGuard::accept(double loss) {
  if (!std::isfinite(loss)) return;
  if (last_.size() == window_) last_.erase(last_.begin());
  last_.push_back(loss);
}

std::string SpikeGuard::to_string() const {
  std::string s;
  char buf[32];
  for (double x : last_) {
    std::snprintf(buf, sizeof(buf), "%.17g", x);
    if (!s.empty()) s += ' ';
    s += buf;
  }
  return s;
}

bool SpikeGuard::from_string(const std::string& s) {
  std::vector<double> v;
  const char* p = s.c_str();
  while (*p) {
    char* end = nullptr;
    const double x = std::strtod(p, &end);
    if (end == p || !std::isfinite(x)) return false;
    v.push_back(x);
    p = end;
    while (*p == ' ') ++p;
  }
  if (v.size() > window_) v.erase(v.begin(), v.end() - static_cast<std::ptrdiff_t>(window_));
  last_ = std::move(v);
  return true;
}

ExpertWatch::ExpertWatch(int64_t n_blocks, int64_t E, int64_t collapse_steps,
                         double imbalance_warn)
    : n_blocks_(n_blocks), E_(E), collapse_steps_(collapse_steps),
      imbalance_warn_(imbalance_warn), idle_(static_cast<size_t>(n_blocks * E), 0) {}

void ExpertWatch::update(const int64_t* load, int64_t step,
                         const std::vector<std::string>& block_names,
                         std::vector<std::string>* warnings) {
  CHECK(static_cast<int64_t>(block_names.size()) == n_blocks_);
  char buf[256];
  for (int64_t b = 0; b < n_blocks_; ++b) {
    const int64_t* l = load + b * E_;
    int64_t total = 0, mx = 0;
    for (int64_t e = 0; e < E_; ++e) {
      total += l[e];
      mx = std::max(mx, l[e]);
      int64_t& idle = idle_[static_cast<size_t>(b * E_ + e)];
      idle = l[e] == 0 ? idle + 1 : 0;
      if (collapse_steps_ > 0 && idle > 0 && idle % collapse_steps_ == 0) {
        std::snprintf(buf, sizeof(buf),
                      "step %lld: expert %lld of %s has received no tokens for %lld steps",
                      static_cast<long long>(step), static_cast<long long>(e),
                      block_names[static_cast<size_t>(b)].c_str(), static_cast<long long>(idle));
        warnings->push_back(buf);
      }
    }
    if (imbalance_warn_ > 0 && total > 0) {
      const double ratio = static_cast<double>(mx) * static_cast<double>(E_) / static_cast<double>(total);
      if (ratio > imbalance_warn_) {
        std::snprintf(buf, sizeof(buf),
                      "step %lld: %s load imbalance %.2f (max / mean) > moe.imbalance_warn = %.2f",
                      static_cast<long long>(step), block_names[static_cast<size_t>(b)].c_str(),
                      ratio, imbalance_warn_);
        warnings->push_back(buf);
      }
    }
  }
}

RunHealth::RunHealth(const Config& cfg, int64_t n_blocks, int64_t E,
                     std::vector<std::string> block_names)
    : cfg_(cfg), spike_(cfg.training.spike_factor, cfg.training.spike_window),
      experts_(n_blocks, E, cfg.moe.collapse_steps, cfg.moe.imbalance_warn),
      block_names_(std::move(block_names)) {}

double RunHealth::loss_limit() const {
  return cfg_.training.on_spike == SpikeAction::kWarn ? HUGE_VAL : spike_.limit();
}

StepVerdict RunHealth::after_step(int64_t step, const StepStats& st, const int64_t* expert_load) {
  StepVerdict v;
  char buf[512];
  const long long n = static_cast<long long>(step + 1);
  const double limit = spike_.limit();
  if (st.nonfinite) {
    std::snprintf(buf, sizeof(buf), "step %lld: non-finite %s (loss %g, grad norm %g)%s%s", n,
                  st.first_bad.empty() ? "loss" : "gradients", st.loss, st.grad_norm,
                  st.first_bad.empty() ? "" : ", first in backward order: ",
                  st.first_bad.c_str());
    v.lines.push_back(buf);
    if (cfg_.training.on_nonfinite == NonfiniteAction::kAbort) {
      v.action = StepVerdict::Action::kAbort;
      return v;
    }
  } else if (st.loss > limit) {
    v.spike = true;
    const bool dropped = !st.applied;
    std::snprintf(buf, sizeof(buf),
                  "step %lld: loss spike %.4f > training.spike_factor %.2f x running median "
                  "%.4f%s", n, st.loss, cfg_.training.spike_factor, spike_.median(),
                  !dropped ? "" : cfg_.training.on_spike == SpikeAction::kRollback
                                      ? ": update dropped, rolling back to the last checkpoint"
                                      : ": update dropped");
    v.lines.push_back(buf);
    if (dropped && cfg_.training.on_spike == SpikeAction::kRollback)
      v.action = StepVerdict::Action::kRollback;
  }
  if (st.applied) {
    dropped_in_row_ = 0;
    spike_.accept(st.loss);
  } else if (++dropped_in_row_ >= cfg_.training.max_skipped_steps &&
             v.action == StepVerdict::Action::kContinue) {
    std::snprintf(buf, sizeof(buf),
                  "%lld steps in a row dropped their update (training.max_skipped_steps = %lld)",
                  static_cast<long long>(dropped_in_row_),
                  static_cast<long long>(cfg_.training.max_skipped_steps));
    v.lines.push_back(buf);
    v.action = StepVerdict::Action::kStop;
  }
  if (!block_names_.empty()) experts_.update(expert_load, step + 1, block_names_, &v.lines);
  return v;
}

std::string nonfinite_diagnostic(const Config& cfg, int64_t step, int64_t data_batch,
                                 double loss, double grad_norm, const std::string& first_bad) {
  std::ostringstream o;
  o << "moetrain non-finite step diagnostic\n";
  o << "config: " << cfg.source << "\n";
  o << "step: " << step << " (1-based; its update was not applied)\n";
  o << "loss: " << loss << "\n";
  o << "grad_norm: " << grad_norm << "\n";
  o << "first non-finite gradient (backward order): "
    << (first_bad.empty() ? "none (only the loss)" : first_bad) << "\n";
  o << "data: " << cfg.data.train << ", batch " << data_batch << " of seed " << cfg.run.seed
    << ": sequences 0.." << cfg.training.global_batch - 1 << " of the global batch, "
    << cfg.model.seq_len + 1 << " tokens each (io/dataset.h dataset_train_batch)\n";
  return o.str();
}

void nonfinite_abort(const Config& cfg, const ProcessGrid& grid, int64_t step, int64_t data_batch,
                     const StepStats& st) {
  const std::string diag = (std::filesystem::path(cfg.checkpoint.dir) /
                            strprintf("nonfinite-step-%08lld.txt", static_cast<long long>(step)))
                               .string();
  if (grid.is_root()) {
    std::filesystem::create_directories(cfg.checkpoint.dir);
    std::FILE* f = std::fopen(diag.c_str(), "w");
    if (f) {
      const std::string text =
          nonfinite_diagnostic(cfg, step, data_batch, st.loss, st.grad_norm, st.first_bad);
      std::fputs(text.c_str(), f);
      std::fclose(f);
    }
  }
  if (grid.world) grid.world->barrier();
  user_error("%s: non-finite %s at step %lld, update not applied; diagnostic in %s "
             "(training.on_nonfinite = \"abort\"; \"skip\" drops such steps and goes on)",
             cfg.source.c_str(), st.first_bad.empty() ? "loss" : "gradients",
             static_cast<long long>(step), diag.c_str());
}

}  // namespace moe
