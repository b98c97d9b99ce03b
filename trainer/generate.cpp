#include "trainer/generate.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "model/check.h"
#include "model/rng.h"

namespace moe {

std::string generate_text(Model<float>& m, const std::string& prompt, int n_tokens,
                          double temperature, int top_k, uint64_t seed, uint64_t sample_index) {
  const ModelDims& d = m.d;
  model_quantize_weights(m);  // the master weights may have changed since the last step
  std::vector<int32_t> ctx;
  for (unsigned char c : prompt) ctx.push_back(static_cast<int32_t>(c) % static_cast<int32_t>(d.V));
  if (ctx.empty()) ctx.push_back('\n' % static_cast<int32_t>(d.V));
  std::string out;
  std::vector<double> p(static_cast<size_t>(d.V));
  std::vector<int64_t> order(static_cast<size_t>(d.V));
  std::vector<float> row(static_cast<size_t>(d.V));  // the last position's logits, on the host
  const uint64_t stream = rng_stream(RngPurpose::kSample, sample_index);
  for (int i = 0; i < n_tokens; ++i) {
    const int64_t T_ = std::min<int64_t>(static_cast<int64_t>(ctx.size()), d.T);
    model_forward<float>(m, ctx.data() + ctx.size() - static_cast<size_t>(T_), nullptr, 1, T_,
                         false);
    m.ops->download(row.data(), m.slots[0].logits + (T_ - 1) * d.V, row.size() * sizeof(float));
    const float* logits = row.data();
    // Candidates: the top_k most likely tokens (ties to the lower id), all when top_k = 0.
    for (int64_t v = 0; v < d.V; ++v) order[static_cast<size_t>(v)] = v;
    const int64_t k = top_k > 0 ? std::min<int64_t>(top_k, d.V) : d.V;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    int64_t tok = order[0];
    if (temperature > 0) {
      const double inv_t = 1.0 / temperature, mx = logits[order[0]];
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) {
        p[static_cast<size_t>(j)] = std::exp((logits[order[static_cast<size_t>(j)]] - mx) * inv_t);
        sum += p[static_cast<size_t>(j)];
      }
      double u = rng_uniform(seed, stream, static_cast<uint64_t>(i)) * sum;
      for (int64_t j = 0; j < k; ++j) {
        tok = order[static_cast<size_t>(j)];
        u -= p[static_cast<size_t>(j)];
        if (u <= 0) break;
      }
    }
    ctx.push_back(static_cast<int32_t>(tok));
    out.push_back(static_cast<char>(tok));
  }
  return out;
}

std::string printable_line(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') out += " / ";
    else if (c == '\t') out += ' ';
    else if (c < 0x20 || c >= 0x7f) out += '.';
    else out += static_cast<char>(c);
  }
  return out;
}

void print_samples(Model<float>& m, int samples, int sample_tokens, uint64_t seed, bool print) {
  static const char* kPrompts[] = {"The ", "Q: ", "A man ", "Love ", "It is "};
  for (int i = 0; i < samples; ++i) {
    const std::string prompt = kPrompts[i % 5];
    const std::string text =
        generate_text(m, prompt, sample_tokens, 0.8, 0, seed, static_cast<uint64_t>(i));
    if (print) std::printf("sample %d: %s\n", i + 1, printable_line(prompt + text).c_str());
  }
}

}  // namespace moe
