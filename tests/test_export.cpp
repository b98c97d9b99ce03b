// moetrain export: the safetensors writer and validating reader (io/safetensors.h), the
// strict JSON reader (io/json_lite.h), the DeepSeek-V3 name/shape plan (io/hf_export.h), and
// the `export` subcommand end to end against a trained checkpoint.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string_view>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "binary_harness.h"
#include "io/checkpoint_file.h"
#include "io/config.h"
#include "io/config_model.h"
#include "io/hf_export.h"
#include "io/json_lite.h"
#include "io/safetensors.h"
#include "model/check.h"
#include "model/fp8.h"
#include "model/model.h"

namespace {

namespace fs = std::filesystem;
using moe::StDtype;

// Per test: ctest runs tests as parallel processes, so a shared name would race.
fs::path temp_path(const std::string& name) {
  const ::testing::TestInfo* t = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string test = t ? std::string(t->test_suite_name()) + "." + t->name() : "none";
  return fs::path(::testing::TempDir()) / ("moetrain_export_" + test + "_" + name + "_" +
                                               std::to_string(::getpid()));
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int k = 0; k < 8; ++k) s[static_cast<size_t>(k)] = static_cast<char>((n >> (8 * k)) & 0xFF);
  return s;
}

uint32_t f32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float f32_from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// The message of the UserError that reading `bytes` as a safetensors file throws.
std::string reject(const std::string& bytes) {
  const fs::path p = temp_path("reject.safetensors");
  moe_test::write(p, bytes);
  try {
    moe::safetensors_read_header(p.string());
  } catch (const moe::UserError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    EXPECT_EQ(msg.rfind(p.string(), 0), 0u) << msg;  // names the file first
    return msg;
  }
  ADD_FAILURE() << "accepted: " << bytes.substr(0, 200);
  return "";
}

// A file with header `json` (not padded) and `data` bytes.
std::string st_file(const std::string& json, size_t data_bytes) {
  return le64(json.size()) + json + std::string(data_bytes, '\x11');
}

// ---------------------------------------------------------------------------------------
// JSON reader

TEST(SafetensorsJson, ParsesTheHeaderSubsetAndMore) {
  const moe::JsonValue v = moe::json_parse(
      " {\"a\": [1, -2, 9223372036854775807, -9223372036854775808], \"b\": \"x\\u00e9\\ud83d\\ude00\\n\","
      " \"c\": {\"d\": null, \"e\": true, \"f\": false, \"g\": 2.5e-3}}  ", "t");
  ASSERT_EQ(v.kind, moe::JsonValue::Kind::kObject);
  const moe::JsonValue* a = v.get("a");
  ASSERT_TRUE(a && a->items.size() == 4);
  EXPECT_EQ(a->items[1].i, -2);
  EXPECT_EQ(a->items[2].i, INT64_MAX);
  EXPECT_EQ(a->items[3].i, INT64_MIN);
  EXPECT_EQ(v.get("b")->s, "x\xC3\xA9\xF0\x9F\x98\x80\n");
  EXPECT_EQ(v.get("c")->get("d")->kind, moe::JsonValue::Kind::kNull);
  EXPECT_TRUE(v.get("c")->get("e")->b);
  EXPECT_EQ(v.get("c")->get("g")->kind, moe::JsonValue::Kind::kFloat);
  EXPECT_DOUBLE_EQ(v.get("c")->get("g")->f, 2.5e-3);
  EXPECT_EQ(moe::json_quote("a\"b\\c\x01"), "\"a\\\"b\\\\c\\u0001\"");
  EXPECT_EQ(moe::json_number(1e-6), "1e-06");
  EXPECT_EQ(moe::json_number(10000), "10000.0");
  EXPECT_EQ(moe::json_number(2.5), "2.5");
  EXPECT_EQ(moe::json_number(0.02), "0.02");
}

TEST(SafetensorsJson, RejectsWithOneLine) {
  const struct {
    const char* text;
    const char* why;
  } cases[] = {
      {"", "expected a value"},
      {"{\"a\": }", "expected a value"},
      {"{\"a\": 1,}", "expected a string key"},
      {"[1, 2", "expected ',' or ']'"},
      {"{\"a\": 1} x", "unexpected text"},
      {"{\"a\": 1, \"a\": 2}", "duplicate key"},
      {"[01]", "leading zero"},
      {"[9223372036854775808]", "integer out of range"},
      {"[-9223372036854775809]", "integer out of range"},
      {"[1e400]", "number out of range"},
      {"[NaN]", "expected a value"},
      {"\"a\x01\"", "control character"},
      {"\"\\x\"", "bad escape"},
      {"\"\\ud800\"", "unpaired high surrogate"},
      {"\"\\udc00\"", "unpaired low surrogate"},
      {"\"\xC0\xAF\"", "invalid UTF-8"},
      {"\"\xED\xA0\x80\"", "invalid UTF-8"},
      {"\"abc", "unterminated string"},
      {"tru", "expected a value"},
  };
  for (const auto& c : cases) {
    try {
      moe::json_parse(c.text, "doc.json");
      ADD_FAILURE() << "accepted: " << c.text;
    } catch (const moe::UserError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(c.why), std::string::npos) << c.text << " -> " << msg;
      EXPECT_EQ(msg.rfind("doc.json: JSON byte ", 0), 0u) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos);
    }
  }
  // Depth and value count are bounded.
  EXPECT_THROW(moe::json_parse(std::string(100, '[') + std::string(100, ']'), "d"), moe::UserError);
  EXPECT_NO_THROW(moe::json_parse(std::string(64, '[') + std::string(64, ']'), "d"));
  EXPECT_THROW(moe::json_parse("[1,2,3,4,5]", "d", 5), moe::UserError);
}

// ---------------------------------------------------------------------------------------
// safetensors writer and reader

TEST(SafetensorsFormat, RoundTripNamesShapesDtypesBytes) {
  // BF16 edge values: ties to even both ways, overflow to infinity, NaNs, -0, a subnormal.
  const std::vector<float> specials = {
      1.0f, f32_from_bits(0x3F808000u), f32_from_bits(0x3F818000u), f32_from_bits(0x3F80FFFFu),
      3.4028235e38f, -0.0f, f32_from_bits(0x7FC00000u), f32_from_bits(0x7F800001u),
      1e-40f, -2.75f, 65504.0f, f32_from_bits(0xFF800000u)};
  // Independent expectations for a few: round to nearest, ties to even.
  EXPECT_EQ(moe::bf16_from_float(specials[0]), 0x3F80);
  EXPECT_EQ(moe::bf16_from_float(specials[1]), 0x3F80);  // tie, even stays
  EXPECT_EQ(moe::bf16_from_float(specials[2]), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(moe::bf16_from_float(specials[3]), 0x3F81);
  EXPECT_EQ(moe::bf16_from_float(specials[4]), 0x7F80);  // rounds to infinity
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  std::vector<float> a(3 * 5), c(2 * 7);
  for (float& x : a) x = normal(rng);
  for (float& x : c) x = normal(rng);
  std::vector<uint16_t> b;
  for (float x : specials) b.push_back(moe::bf16_from_float(x));
  std::vector<uint16_t> d;
  for (float x : c) d.push_back(moe::bf16_from_float(x));

  const std::vector<moe::SafetensorsSpec> specs = {
      {"layer.a", StDtype::kF32, {3, 5}},
      {"b \"quoted\" \\ name", StDtype::kBF16, {12}},
      {"empty", StDtype::kF32, {0, 4}},
      {"d", StDtype::kBF16, {2, 7}},
      {"scalar", StDtype::kF32, {}}};
  const fs::path p = temp_path("roundtrip.safetensors");
  {
    moe::SafetensorsWriter w(p.string(), specs, {{"producer", "moetrain"}});
    w.append(a.data(), 20);  // in pieces of any size
    w.append(reinterpret_cast<const char*>(a.data()) + 20, a.size() * 4 - 20);
    w.append(b.data(), b.size() * 2);
    w.append(d.data(), d.size() * 2);
    const float s = 42.5f;
    w.append(&s, 4);
    w.finish();
  }
  const moe::SafetensorsHeader h = moe::safetensors_read_header(p.string());
  EXPECT_EQ(h.header_len % 8, 0u);
  EXPECT_EQ(h.data_start % 8, 0u);
  EXPECT_EQ(h.data_start + h.data_size, fs::file_size(p));
  ASSERT_EQ(h.tensors.size(), specs.size());
  ASSERT_EQ(h.metadata.size(), 2u);
  EXPECT_EQ(h.metadata[0], (std::pair<std::string, std::string>{"format", "pt"}));
  EXPECT_EQ(h.metadata[1], (std::pair<std::string, std::string>{"producer", "moetrain"}));
  for (const moe::SafetensorsSpec& s : specs) {
    const moe::SafetensorsTensor* t = h.find(s.name);
    ASSERT_NE(t, nullptr) << s.name;
    EXPECT_EQ(t->dtype, s.dtype);
    EXPECT_EQ(t->shape, s.shape);
    EXPECT_EQ(t->end - t->begin, s.bytes());
  }
  // The header text itself: padded with spaces, "__metadata__" first.
  const std::string raw = moe_test::slurp(p);
  EXPECT_EQ(raw.compare(8, 17, "{\"__metadata__\":{"), 0);
  EXPECT_EQ(raw[8 + h.header_len - 1] == ' ' || raw[8 + h.header_len - 1] == '}', true);
  auto bytes_of = [&](const std::string& name) {
    return moe::safetensors_read_bytes(p.string(), h, *h.find(name));
  };
  EXPECT_EQ(bytes_of("layer.a"), std::string(reinterpret_cast<const char*>(a.data()), a.size() * 4));
  const std::string bb = bytes_of("b \"quoted\" \\ name");
  ASSERT_EQ(bb.size(), specials.size() * 2);
  for (size_t i = 0; i < specials.size(); ++i) {
    uint16_t got;
    std::memcpy(&got, bb.data() + 2 * i, 2);
    EXPECT_EQ(got, moe::bf16_from_float(specials[i])) << i;
    EXPECT_EQ(static_cast<unsigned char>(bb[2 * i]), got & 0xFF);  // little-endian
  }
  EXPECT_EQ(bytes_of("empty"), "");
  EXPECT_EQ(bytes_of("d"), std::string(reinterpret_cast<const char*>(d.data()), d.size() * 2));
  const std::string sc = bytes_of("scalar");
  ASSERT_EQ(sc.size(), 4u);
  EXPECT_EQ(f32_bits(42.5f), static_cast<uint32_t>(static_cast<unsigned char>(sc[0])) |
                                 static_cast<uint32_t>(static_cast<unsigned char>(sc[1])) << 8 |
                                 static_cast<uint32_t>(static_cast<unsigned char>(sc[2])) << 16 |
                                 static_cast<uint32_t>(static_cast<unsigned char>(sc[3])) << 24);
}

TEST(SafetensorsFormat, HeaderPaddingForEveryLength) {
  for (size_t len = 1; len <= 16; ++len) {
    const std::string hdr =
        moe::safetensors_header_bytes({{std::string(len, 'n'), StDtype::kU8, {3}}});
    EXPECT_EQ(hdr.size() % 8, 0u) << len;
    const moe::SafetensorsHeader h = moe::safetensors_parse_header(hdr + "abc", hdr.size() + 3, "x");
    EXPECT_EQ(h.tensors.at(0).name, std::string(len, 'n'));
  }
}

TEST(SafetensorsFormat, WriterReportsDiskFullInOneLine) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full on this system";
  try {
    moe::SafetensorsWriter w("/dev/full", {{"a", StDtype::kF32, {4}}});
    const float x[4] = {1, 2, 3, 4};
    w.append(x, sizeof(x));
    w.finish();
    ADD_FAILURE() << "no error writing to /dev/full";
  } catch (const moe::UserError& e) {
    EXPECT_EQ(std::string(e.what()), "/dev/full: write failed (No space left on device)");
  }
}

TEST(SafetensorsReader, RejectsTruncatedFile) {
  EXPECT_NE(reject("").find("truncated: 0 bytes"), std::string::npos);
  EXPECT_NE(reject(std::string("\x10\0\0\0\0", 5)).find("truncated: 5 bytes"), std::string::npos);
  // The data section cut short: the tensor's end lies beyond it.
  const std::string json = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
  EXPECT_NE(reject(st_file(json, 10)).find("end beyond the data section (10 bytes)"),
            std::string::npos);
}

TEST(SafetensorsReader, RejectsHeaderLengthBeyondTheFile) {
  EXPECT_NE(reject(le64(1000) + "{}").find("header length 1000 exceeds the file (2 bytes"),
            std::string::npos);
  EXPECT_NE(reject(le64(UINT64_MAX) + "{}").find("exceeds the limit"), std::string::npos);
  EXPECT_NE(reject(le64(0) + "{}").find("does not start with '{'"), std::string::npos);
}

TEST(SafetensorsReader, RejectsOverlappingGappedAndOutOfBoundsOffsets) {
  auto two = [](int b0, int e0, int b1, int e1) {
    return "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[" + std::to_string(b0) + "," +
           std::to_string(e0) + "]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[" +
           std::to_string(b1) + "," + std::to_string(e1) + "]}}";
  };
  EXPECT_NO_THROW(moe::safetensors_parse_header(st_file(two(8, 16, 0, 8), 16), 8 + two(8, 16, 0, 8).size() + 16, "ok"));
  const std::string overlap = reject(st_file(two(0, 8, 4, 12), 12));
  EXPECT_NE(overlap.find("tensor \"b\" begins at byte 4 of the data but the previous tensor \"a\" "
                         "ends at 8 (overlapping)"), std::string::npos) << overlap;
  const std::string gap = reject(st_file(two(0, 8, 12, 20), 20));
  EXPECT_NE(gap.find("(a gap)"), std::string::npos) << gap;
  const std::string first = reject(st_file(two(4, 12, 12, 20), 20));
  EXPECT_NE(first.find("tensor \"a\" begins at byte 4 of the data but the data section starts at 0"),
            std::string::npos) << first;
  const std::string oob = reject(st_file(two(0, 8, 8, 16), 12));
  EXPECT_NE(oob.find("tensor \"b\": data_offsets [8, 16] end beyond the data section (12 bytes)"),
            std::string::npos) << oob;
  const std::string trailing = reject(st_file(two(0, 8, 8, 16), 20));
  EXPECT_NE(trailing.find("holds 20 bytes but the tensors cover 16 (trailing bytes)"),
            std::string::npos) << trailing;
  const std::string reversed = reject(st_file(two(0, 8, 16, 8), 16));
  EXPECT_NE(reversed.find("data_offsets must be [begin, end]"), std::string::npos) << reversed;
}

TEST(SafetensorsReader, RejectsShapeDtypeSizeMismatch) {
  const std::string msg = reject(
      st_file("{\"w\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,8]}}", 8));
  EXPECT_NE(msg.find("tensor \"w\": data_offsets [0, 8] hold 8 bytes but BF16 [2, 3] needs 12"),
            std::string::npos) << msg;
  const std::string huge = reject(st_file(
      "{\"w\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8));
  EXPECT_NE(huge.find("is too large"), std::string::npos) << huge;
}

TEST(SafetensorsReader, RejectsBadJsonAndBadEntries) {
  const struct {
    std::string json;
    const char* why;
  } cases[] = {
      {"{\"w\": }", "header: JSON byte 6: expected a value"},
      {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", "expected ',' or '}'"},
      {"{\"w\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,4]}}", "unknown dtype \"F7\""},
      {"{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", "missing \"shape\""},
      {"{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", "non-negative integers"},
      {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", "non-negative integers"},
      {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", "unknown key \"x\""},
      {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", "data_offsets must be"},
      {"{\"w\":[1]}", "tensor \"w\": expected an object, got an array"},
      {"{\"__metadata__\":{\"format\":1}}", "__metadata__ \"format\" must be a string"},
      {"{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
       "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", "duplicate key"},
      {"{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "empty name"},
  };
  for (const auto& c : cases) {
    const std::string msg = reject(st_file(c.json, 4));
    EXPECT_NE(msg.find(c.why), std::string::npos) << c.json << " -> " << msg;
  }
}

// No input may crash the reader: every mutation of a valid file parses or is one UserError.
// (Run under the sanitizer build, this catches undefined behaviour too.)
TEST(SafetensorsReader, MutatedFilesParseOrFailCleanly) {
  const std::vector<moe::SafetensorsSpec> specs = {
      {"a", StDtype::kF32, {2, 3}}, {"b", StDtype::kBF16, {5}}, {"c", StDtype::kU8, {0}}};
  uint64_t data = 0;
  for (const auto& s : specs) data += s.bytes();
  const std::string_view alphabet = "{}[],:\"0123456789-e. \\u";
  const std::string valid = moe::safetensors_header_bytes(specs) + std::string(data, '\x5A');
  std::mt19937_64 rng(1234);
  int accepted = 0;
  for (int it = 0; it < 4000; ++it) {
    std::string f = valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % (f.size() + 1);
      switch (rng() % 4) {
        case 0: if (at < f.size()) f[at] = static_cast<char>(rng()); break;
        case 1: f.insert(at, 1, alphabet[rng() % alphabet.size()]); break;
        case 2: if (at < f.size()) f.erase(at, 1 + rng() % 8); break;
        default: f.resize(at); break;
      }
    }
    try {
      const moe::SafetensorsHeader h = moe::safetensors_parse_header(f, f.size(), "fuzz");
      uint64_t end = 0;
      for (const auto& t : h.tensors) end = std::max(end, t.end);
      EXPECT_EQ(end, h.data_size);
      ++accepted;
    } catch (const moe::UserError&) {
    }
  }
  EXPECT_LT(accepted, 4000);  // mutations were mostly caught, and none crashed
}

// ---------------------------------------------------------------------------------------
// The plan

moe::Config tiny_mha_config() {
  return moe::config_parse(
      "[model]\nd_model = 32\nn_layers = 3\nn_heads = 4\nn_kv_heads = 2\nseq_len = 16\n"
      "dense_layers = 1\n[moe]\nnum_experts = 4\ntop_k = 2\nd_expert = 8\nnum_shared_experts = 3\n",
      "tiny.toml", {});
}

// DeepSeek-V3 as released (config.json of deepseek-ai/DeepSeek-V3), built directly.
moe::Config deepseek_v3_config() {
  moe::Config c;
  c.model.vocab_size = 129280;
  c.model.d_model = 7168;
  c.model.n_layers = 61;
  c.model.n_heads = 128;
  c.model.n_kv_heads = 128;
  c.model.head_dim = 56;
  c.model.seq_len = 4096;
  c.model.dense_layers = 3;
  c.model.d_ff = 18432;
  c.model.mtp_depth = 1;
  c.attention.kind = moe::AttentionKind::kMla;
  c.attention.q_lora_rank = 1536;
  c.attention.kv_lora_rank = 512;
  c.attention.qk_nope_head_dim = 128;
  c.attention.qk_rope_head_dim = 64;
  c.attention.v_head_dim = 128;
  c.moe.num_experts = 256;
  c.moe.num_shared_experts = 1;
  c.moe.top_k = 8;
  c.moe.d_expert = 2048;
  c.moe.score = moe::ScoreFn::kSigmoid;
  c.moe.route_scale = 2.5;
  c.moe.num_groups = 8;
  c.moe.topk_groups = 4;
  c.moe.aux_loss_alpha = 0.001;
  return c;
}

// Sources tile their tensor exactly: inside it, covering every element once.
void expect_tiled(const moe::ExportTensor& t) {
  const int64_t rows = t.shape.empty() ? 1 : t.shape[0];
  const int64_t cols = t.shape.size() == 2 ? t.shape[1] : 1;
  std::vector<int> hits(static_cast<size_t>(rows * cols), 0);
  for (const moe::ExportSource& s : t.sources) {
    const int64_t sr = s.shape.at(0), sc = s.shape.size() == 2 ? s.shape[1] : 1;
    ASSERT_EQ(s.shape.size(), t.shape.size()) << t.name;
    ASSERT_TRUE(s.row0 >= 0 && s.col0 >= 0 && s.row0 + sr <= rows && s.col0 + sc <= cols) << t.name;
    for (int64_t r = 0; r < sr; ++r)
      for (int64_t c = 0; c < sc; ++c) ++hits[static_cast<size_t>((s.row0 + r) * cols + s.col0 + c)];
  }
  for (int h : hits) ASSERT_EQ(h, 1) << t.name;
}

// The plan reads exactly the tensors the model stores: each logical tensor and router bias once.
void expect_plan_matches_model(const moe::Config& cfg) {
  const moe::ModelDims d = moe::config_model_dims(cfg);
  std::multiset<std::string> want, got;
  for (const moe::LogicalTensor& t : moe::model_logical_tensors(d)) want.insert("/model/" + t.name);
  for (int64_t l = d.dense_layers; l < d.L; ++l)
    want.insert("/router/layers/" + std::to_string(l) + "/bias");
  if (cfg.model.tie_embeddings) want.insert("/model/embed/wte");  // the head, from the embedding
  for (int64_t k = 0; k < d.mtp; ++k) {
    if (d.mtp_moe()) want.insert("/router/mtp/" + std::to_string(k) + "/bias");
    // HF's MTP layers carry their own copies of the shared embedding and head.
    want.insert("/model/embed/wte");
    want.insert(cfg.model.tie_embeddings ? "/model/embed/wte" : "/model/lm_head");
  }
  for (const moe::ExportTensor& t : moe::export_plan(cfg, {})) {
    expect_tiled(t);
    for (const moe::ExportSource& s : t.sources) got.insert(s.path);
  }
  EXPECT_EQ(got, want);
}

TEST(ExportPlan, MhaReadsEveryModelTensorOnce) {
  const moe::Config cfg = tiny_mha_config();
  expect_plan_matches_model(cfg);
  const std::vector<moe::ExportTensor> plan = moe::export_plan(cfg, {});
  std::map<std::string, const moe::ExportTensor*> by_name;
  for (const auto& t : plan) EXPECT_TRUE(by_name.emplace(t.name, &t).second) << t.name;
  const moe::ExportTensor& k = *by_name.at("model.layers.0.self_attn.k_proj.weight");
  EXPECT_EQ(k.shape, (std::vector<int64_t>{16, 32}));
  const moe::ExportTensor& down = *by_name.at("model.layers.2.mlp.shared_experts.down_proj.weight");
  EXPECT_EQ(down.shape, (std::vector<int64_t>{32, 24}));
  ASSERT_EQ(down.sources.size(), 3u);
  EXPECT_EQ(down.sources[2].path, "/model/layers/2/moe/shared/2/w_down");
  EXPECT_EQ(down.sources[2].col0, 16);
  const moe::ExportTensor& up = *by_name.at("model.layers.1.mlp.shared_experts.up_proj.weight");
  EXPECT_EQ(up.sources[1].row0, 8);
  const moe::ExportTensor& bias = *by_name.at("model.layers.1.mlp.gate.e_score_correction_bias");
  EXPECT_EQ(bias.dtype, StDtype::kF32);  // F32 under bf16, as released
  EXPECT_EQ(bias.sources[0].path, "/router/layers/1/bias");
  EXPECT_EQ(by_name.count("model.layers.0.mlp.gate.weight"), 0u);
  EXPECT_EQ(by_name.at("model.layers.0.mlp.down_proj.weight")->shape,
            (std::vector<int64_t>{32, cfg.model.d_ff}));

  // Tied: lm_head.weight is written, from the embedding.
  moe::Config tied = cfg;
  tied.model.tie_embeddings = true;
  expect_plan_matches_model(tied);
}

TEST(ExportPlan, MlaReadsEveryModelTensorOnce) {
  moe::Config cfg = tiny_mha_config();
  cfg.attention.kind = moe::AttentionKind::kMla;
  cfg.attention.q_lora_rank = 12;
  cfg.attention.kv_lora_rank = 10;
  cfg.attention.qk_nope_head_dim = 6;
  cfg.attention.qk_rope_head_dim = 4;
  cfg.attention.v_head_dim = 5;
  bool model_has_mla = false;
  for (const auto& t : moe::model_logical_tensors(moe::config_model_dims(cfg)))
    model_has_mla = model_has_mla || t.name.find("attn/wkv_a") != std::string::npos;
  if (!model_has_mla) GTEST_SKIP() << "model_logical_tensors does not list MLA tensors yet";
  expect_plan_matches_model(cfg);
  cfg.attention.q_lora_rank = 0;
  expect_plan_matches_model(cfg);
}

// The MTP modules' names are the model's own (mtp/{k}/...), dense and MoE, MLA and standard.
TEST(ExportPlan, MtpReadsEveryModelTensorOnce) {
  moe::Config cfg = tiny_mha_config();
  cfg.model.mtp_depth = 2;
  expect_plan_matches_model(cfg);
  cfg.attention.kind = moe::AttentionKind::kMla;
  cfg.attention.q_lora_rank = 12;
  cfg.attention.kv_lora_rank = 10;
  cfg.attention.qk_nope_head_dim = 6;
  cfg.attention.qk_rope_head_dim = 4;
  cfg.attention.v_head_dim = 5;
  expect_plan_matches_model(cfg);
  cfg.model.dense_layers = cfg.model.n_layers;  // all dense: the MTP blocks are dense too
  expect_plan_matches_model(cfg);
}

TEST(ExportPlan, DeepSeekV3NamesShapesAndParameterCount) {
  const moe::Config cfg = deepseek_v3_config();
  const std::vector<moe::ExportTensor> plan = moe::export_plan(cfg, {});
  std::map<std::string, const moe::ExportTensor*> by_name;
  for (const auto& t : plan) ASSERT_TRUE(by_name.emplace(t.name, &t).second) << t.name;
  const std::map<std::string, std::vector<int64_t>> release = {
      {"model.embed_tokens.weight", {129280, 7168}},
      {"model.norm.weight", {7168}},
      {"lm_head.weight", {129280, 7168}},
      {"model.layers.0.input_layernorm.weight", {7168}},
      {"model.layers.0.self_attn.q_a_proj.weight", {1536, 7168}},
      {"model.layers.0.self_attn.q_a_layernorm.weight", {1536}},
      {"model.layers.0.self_attn.q_b_proj.weight", {24576, 1536}},
      {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight", {576, 7168}},
      {"model.layers.0.self_attn.kv_a_layernorm.weight", {512}},
      {"model.layers.0.self_attn.kv_b_proj.weight", {32768, 512}},
      {"model.layers.0.self_attn.o_proj.weight", {7168, 16384}},
      {"model.layers.0.mlp.gate_proj.weight", {18432, 7168}},
      {"model.layers.2.mlp.down_proj.weight", {7168, 18432}},
      {"model.layers.3.mlp.gate.weight", {256, 7168}},
      {"model.layers.3.mlp.gate.e_score_correction_bias", {256}},
      {"model.layers.3.mlp.experts.255.down_proj.weight", {7168, 2048}},
      {"model.layers.60.mlp.experts.0.gate_proj.weight", {2048, 7168}},
      {"model.layers.3.mlp.shared_experts.gate_proj.weight", {2048, 7168}},
      {"model.layers.3.mlp.shared_experts.down_proj.weight", {7168, 2048}},
      {"model.layers.61.embed_tokens.weight", {129280, 7168}},
      {"model.layers.61.enorm.weight", {7168}},
      {"model.layers.61.hnorm.weight", {7168}},
      {"model.layers.61.eh_proj.weight", {7168, 14336}},
      {"model.layers.61.shared_head.norm.weight", {7168}},
      {"model.layers.61.shared_head.head.weight", {129280, 7168}},
      {"model.layers.61.self_attn.kv_b_proj.weight", {32768, 512}},
      {"model.layers.61.mlp.experts.255.up_proj.weight", {2048, 7168}},
      {"model.layers.61.mlp.gate.e_score_correction_bias", {256}},
  };
  for (const auto& [name, shape] : release) {
    ASSERT_TRUE(by_name.count(name)) << name;
    EXPECT_EQ(by_name.at(name)->shape, shape) << name;
  }
  for (const char* absent : {"model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.gate.weight",
                             "model.layers.3.mlp.gate_proj.weight", "model.layers.62.enorm.weight",
                             "model.layers.3.mlp.experts.256.up_proj.weight"})
    EXPECT_EQ(by_name.count(absent), 0u) << absent;
  EXPECT_EQ(by_name.at("model.layers.61.shared_head.norm.weight")->sources[0].path, "/model/mtp/0/final_norm");
  EXPECT_EQ(by_name.at("model.layers.61.shared_head.head.weight")->sources[0].path, "/model/lm_head");
  EXPECT_EQ(by_name.at("model.layers.61.embed_tokens.weight")->sources[0].path, "/model/embed/wte");
  EXPECT_EQ(by_name.at("model.layers.61.mlp.gate.e_score_correction_bias")->sources[0].path,
            "/router/mtp/0/bias");
  EXPECT_EQ(by_name.at("model.layers.61.self_attn.q_b_proj.weight")->sources[0].path,
            "/model/mtp/0/attn/wq_b");

  // Parameter count from the shapes. Per MLA attention: q_a 1536x7168 + 1536 + q_b 24576x1536
  // + kv_a 576x7168 + 512 + kv_b 32768x512 + o 7168x16384 = 187,107,328; norms 2 x 7168;
  // dense FFN 3 x 18432 x 7168; MoE FFN (256 + 1) x 3 x 2048 x 7168 + router 256 x 7168 + bias
  // 256. Main model = 3 dense + 58 MoE layers + embedding + head + norm = 671,026,419,200 (the
  // release's 671B); MTP = one MoE layer + enorm, hnorm, eh_proj 7168 x 14336, shared_head.norm
  // + embedding and head copies = 13,463,426,304 (11.6B unique + 2 x 0.93B), 685B in all.
  const int64_t attn = 1536LL * 7168 + 1536 + 24576LL * 1536 + 576LL * 7168 + 512 + 32768LL * 512 +
                       7168LL * 16384;
  ASSERT_EQ(attn, 187107328);
  const int64_t moe_ffn = 257LL * 3 * 2048 * 7168 + 256LL * 7168 + 256;
  const int64_t dense_layer = attn + 2 * 7168 + 3LL * 18432 * 7168;
  const int64_t moe_layer = attn + 2 * 7168 + moe_ffn;
  const int64_t emb = 129280LL * 7168;
  const int64_t main_model = 3 * dense_layer + 58 * moe_layer + 2 * emb + 7168;
  const int64_t mtp = moe_layer + 3 * 7168 + 7168LL * 14336 + 2 * emb;
  EXPECT_EQ(main_model, 671026419200);
  EXPECT_EQ(mtp, 13463426304);
  uint64_t total = 0, main_total = 0;
  for (const auto& t : plan) total += t.numel();
  for (const auto& t : moe::export_plan(cfg, moe::ExportOptions{moe::ExportDtype::kBf16, true}))
    main_total += t.numel();
  EXPECT_EQ(total, 684489845504u);
  EXPECT_EQ(total, static_cast<uint64_t>(main_model + mtp));
  EXPECT_EQ(main_total, static_cast<uint64_t>(main_model));
  // Tensors: embedding, norm, head; dense layer 2 norms + 7 attention + 3 FFN; MoE layer
  // 2 + 7 + gate + bias + 256 x 3 + 3 shared = 782; MTP adds 6 around its MoE block.
  EXPECT_EQ(plan.size(), 3u + 3 * 12 + 58 * 782 + 6 + 782);

  // config.json: the release's values.
  const moe::JsonValue j = moe::json_parse(moe::export_config_json(cfg, {}), "config.json");
  auto num = [&](const char* k) {
    const moe::JsonValue* v = j.get(k);
    EXPECT_TRUE(v != nullptr) << k;
    return v ? v->f : -1.0;
  };
  EXPECT_EQ(j.get("architectures")->items.at(0).s, "DeepseekV3ForCausalLM");
  EXPECT_EQ(j.get("model_type")->s, "deepseek_v3");
  EXPECT_EQ(num("vocab_size"), 129280);
  EXPECT_EQ(num("hidden_size"), 7168);
  EXPECT_EQ(num("intermediate_size"), 18432);
  EXPECT_EQ(num("moe_intermediate_size"), 2048);
  EXPECT_EQ(num("num_hidden_layers"), 61);
  EXPECT_EQ(num("num_nextn_predict_layers"), 1);
  EXPECT_EQ(num("num_attention_heads"), 128);
  EXPECT_EQ(num("num_key_value_heads"), 128);
  EXPECT_EQ(num("n_shared_experts"), 1);
  EXPECT_EQ(num("n_routed_experts"), 256);
  EXPECT_EQ(num("num_experts_per_tok"), 8);
  EXPECT_EQ(num("routed_scaling_factor"), 2.5);
  EXPECT_EQ(num("n_group"), 8);
  EXPECT_EQ(num("topk_group"), 4);
  EXPECT_EQ(num("first_k_dense_replace"), 3);
  EXPECT_EQ(num("kv_lora_rank"), 512);
  EXPECT_EQ(num("q_lora_rank"), 1536);
  EXPECT_EQ(num("qk_nope_head_dim"), 128);
  EXPECT_EQ(num("qk_rope_head_dim"), 64);
  EXPECT_EQ(num("v_head_dim"), 128);
  EXPECT_EQ(num("rms_norm_eps"), 1e-6);
  EXPECT_EQ(num("rope_theta"), 10000);
  EXPECT_EQ(num("aux_loss_alpha"), 0.001);
  EXPECT_EQ(j.get("scoring_func")->s, "sigmoid");
  EXPECT_EQ(j.get("topk_method")->s, "noaux_tc");
  EXPECT_EQ(j.get("hidden_act")->s, "silu");
  EXPECT_EQ(j.get("torch_dtype")->s, "bfloat16");
  EXPECT_TRUE(j.get("norm_topk_prob")->b);
  EXPECT_FALSE(j.get("tie_word_embeddings")->b);
  EXPECT_FALSE(j.get("attention_bias")->b);
  EXPECT_EQ(j.get("head_dim"), nullptr);
  const moe::JsonValue dropped =
      moe::json_parse(moe::export_config_json(cfg, moe::ExportOptions{moe::ExportDtype::kFp32, true}), "c");
  EXPECT_EQ(dropped.get("num_nextn_predict_layers")->i, 0);
  EXPECT_EQ(dropped.get("torch_dtype")->s, "float32");
  moe::Config no_q_lora = cfg;
  no_q_lora.attention.q_lora_rank = 0;
  EXPECT_EQ(moe::json_parse(moe::export_config_json(no_q_lora, {}), "c").get("q_lora_rank")->kind,
            moe::JsonValue::Kind::kNull);
  bool q_proj = false;
  for (const auto& t : moe::export_plan(no_q_lora, {}))
    if (t.name == "model.layers.0.self_attn.q_proj.weight") q_proj = t.shape == std::vector<int64_t>{24576, 7168};
  EXPECT_TRUE(q_proj);
}

TEST(ExportPlan, ShardsCoverThePlanAndTheIndexIsRight) {
  const std::vector<moe::ExportTensor> plan = moe::export_plan(deepseek_v3_config(), {});
  const uint64_t max = static_cast<uint64_t>(moe::kExportDefaultShardMb * (1 << 20));
  const std::vector<moe::ExportFile> files = moe::export_files(plan, max);
  uint64_t total = 0;
  for (const auto& t : plan) total += t.bytes();
  EXPECT_EQ(total, 684489845504u * 2 + 59 * 256 * 2);  // BF16; the 59 router biases in F32
  ASSERT_GT(files.size(), 250u);
  size_t next = 0;
  for (size_t f = 0; f < files.size(); ++f) {
    EXPECT_EQ(files[f].first, next);
    EXPECT_GT(files[f].count, 0u);
    EXPECT_TRUE(files[f].bytes <= max || files[f].count == 1);
    char want[64];
    std::snprintf(want, sizeof(want), "model-%05zu-of-%05zu.safetensors", f + 1, files.size());
    EXPECT_EQ(files[f].name, want);
    next += files[f].count;
  }
  EXPECT_EQ(next, plan.size());
  const moe::JsonValue idx = moe::json_parse(moe::export_index_json(plan, files), "index");
  EXPECT_EQ(static_cast<uint64_t>(idx.get("metadata")->get("total_size")->i), total);
  EXPECT_EQ(idx.get("weight_map")->members.size(), plan.size());
  // Everything fits: one file, no index.
  const auto one = moe::export_files(plan, total);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].name, "model.safetensors");
  EXPECT_EQ(one[0].count, plan.size());
}

// ---------------------------------------------------------------------------------------
// End to end through the binary

struct Stored {
  std::vector<int64_t> shape;
  std::vector<float> v;
};

Stored read_ckpt(const moe::CheckpointReader& r, const std::string& path) {
  Stored s;
  s.shape = r.shape(path);
  int64_t n = 1;
  for (int64_t d : s.shape) n *= d;
  s.v.resize(static_cast<size_t>(n));
  r.read_f32(path, s.shape, s.v.data(), s.shape.back());
  return s;
}

// The Hugging Face tensors an MHA checkpoint must export to, built here from the checkpoint
// with explicit loops (independently of io/hf_export.cpp).
std::map<std::string, Stored> expected_hf(const moe::CheckpointReader& r, const moe::Config& cfg) {
  std::map<std::string, Stored> out;
  auto put = [&](const std::string& name, const std::string& path) { out[name] = read_ckpt(r, path); };
  put("model.embed_tokens.weight", "/model/embed/wte");
  put("model.norm.weight", "/model/final_norm");
  put("lm_head.weight", cfg.model.tie_embeddings ? "/model/embed/wte" : "/model/lm_head");
  const int64_t NS = cfg.moe.num_shared_experts, FE = cfg.moe.d_expert, C = cfg.model.d_model;
  for (int l = 0; l < cfg.model.n_layers; ++l) {
    const std::string P = "model.layers." + std::to_string(l) + ".";
    const std::string Q = "/model/layers/" + std::to_string(l) + "/";
    put(P + "input_layernorm.weight", Q + "attn_norm");
    put(P + "post_attention_layernorm.weight", Q + "ffn_norm");
    put(P + "self_attn.q_proj.weight", Q + "attn/wq");
    put(P + "self_attn.k_proj.weight", Q + "attn/wk");
    put(P + "self_attn.v_proj.weight", Q + "attn/wv");
    put(P + "self_attn.o_proj.weight", Q + "attn/wo");
    if (l < cfg.model.dense_layers) {
      put(P + "mlp.gate_proj.weight", Q + "mlp/w_gate");
      put(P + "mlp.up_proj.weight", Q + "mlp/w_up");
      put(P + "mlp.down_proj.weight", Q + "mlp/w_down");
      continue;
    }
    put(P + "mlp.gate.weight", Q + "moe/router");
    put(P + "mlp.gate.e_score_correction_bias", "/router/layers/" + std::to_string(l) + "/bias");
    for (int e = 0; e < cfg.moe.num_experts; ++e) {
      const std::string pe = P + "mlp.experts." + std::to_string(e) + ".";
      const std::string qe = Q + "moe/experts/" + std::to_string(e) + "/";
      put(pe + "gate_proj.weight", qe + "w_gate");
      put(pe + "up_proj.weight", qe + "w_up");
      put(pe + "down_proj.weight", qe + "w_down");
    }
    Stored gate{{NS * FE, C}, std::vector<float>(static_cast<size_t>(NS * FE * C))};
    Stored up = gate;
    Stored down{{C, NS * FE}, std::vector<float>(static_cast<size_t>(NS * FE * C))};
    for (int64_t s = 0; s < NS; ++s) {
      const std::string qs = Q + "moe/shared/" + std::to_string(s) + "/";
      const Stored g = read_ckpt(r, qs + "w_gate"), u = read_ckpt(r, qs + "w_up"),
                   d = read_ckpt(r, qs + "w_down");
      for (int64_t i = 0; i < FE; ++i)
        for (int64_t c = 0; c < C; ++c) {
          gate.v[static_cast<size_t>((s * FE + i) * C + c)] = g.v[static_cast<size_t>(i * C + c)];
          up.v[static_cast<size_t>((s * FE + i) * C + c)] = u.v[static_cast<size_t>(i * C + c)];
          down.v[static_cast<size_t>(c * NS * FE + s * FE + i)] = d.v[static_cast<size_t>(c * FE + i)];
        }
    }
    out[P + "mlp.shared_experts.gate_proj.weight"] = gate;
    out[P + "mlp.shared_experts.up_proj.weight"] = up;
    out[P + "mlp.shared_experts.down_proj.weight"] = down;
  }
  return out;
}

struct Exported {
  fs::path file;
  moe::SafetensorsHeader header;
  moe::SafetensorsTensor tensor;
};

// Every tensor of an export folder, through the validating reader (and the index when
// sharded: its weight_map must name every tensor exactly once, in the file holding it).
std::map<std::string, Exported> read_export(const fs::path& dir, size_t* n_files) {
  std::map<std::string, Exported> out;
  std::vector<std::string> files;
  const fs::path index = dir / "model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;
  int64_t total_size = -1;
  if (fs::exists(index)) {
    EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
    const moe::JsonValue j = moe::json_parse(moe_test::slurp(index), index.string());
    total_size = j.get("metadata")->get("total_size")->i;
    for (const auto& [name, file] : j.get("weight_map")->members) {
      weight_map[name] = file.s;
      if (std::find(files.begin(), files.end(), file.s) == files.end()) files.push_back(file.s);
    }
  } else {
    files.push_back("model.safetensors");
  }
  int64_t bytes = 0;
  for (const std::string& f : files) {
    const moe::SafetensorsHeader h = moe::safetensors_read_header((dir / f).string());
    EXPECT_EQ(h.data_start % 8, 0u);
    for (const moe::SafetensorsTensor& t : h.tensors) {
      EXPECT_TRUE(out.emplace(t.name, Exported{dir / f, h, t}).second) << t.name << " twice";
      if (total_size >= 0) {
        EXPECT_EQ(weight_map[t.name], f) << t.name;
      }
      bytes += static_cast<int64_t>(t.end - t.begin);
    }
  }
  if (total_size >= 0) {
    EXPECT_EQ(weight_map.size(), out.size());
    EXPECT_EQ(total_size, bytes);
  }
  *n_files = files.size();
  return out;
}

// Compares an export with the checkpoint, tensor by tensor, bit for bit.
void expect_export_matches(const fs::path& dir, const fs::path& ckpt, bool bf16, size_t* n_files) {
  moe::CheckpointReader r(ckpt.string());
  const moe::Config cfg = moe::config_parse(r.attr_str("/meta", "config_toml"), "saved", {});
  const std::map<std::string, Stored> want = expected_hf(r, cfg);
  const std::map<std::string, Exported> got = read_export(dir, n_files);
  ASSERT_EQ(got.size(), want.size());
  bool bias_nonzero = false, shared_nonzero = false;
  for (const auto& [name, w] : want) {
    ASSERT_TRUE(got.count(name)) << name;
    const Exported& e = got.at(name);
    EXPECT_EQ(e.tensor.shape, w.shape) << name;
    const bool bias = name.find("e_score_correction_bias") != std::string::npos;
    const StDtype dt = bf16 && !bias ? StDtype::kBF16 : StDtype::kF32;
    ASSERT_EQ(e.tensor.dtype, dt) << name;
    const std::string bytes = moe::safetensors_read_bytes(e.file.string(), e.header, e.tensor);
    ASSERT_EQ(bytes.size(), w.v.size() * (dt == StDtype::kBF16 ? 2 : 4)) << name;
    for (size_t i = 0; i < w.v.size(); ++i) {
      if (dt == StDtype::kBF16) {
        uint16_t h;
        std::memcpy(&h, bytes.data() + 2 * i, 2);
        ASSERT_EQ(h, moe::bf16_from_float(w.v[i])) << name << " [" << i << "]";
      } else {
        uint32_t u;
        std::memcpy(&u, bytes.data() + 4 * i, 4);
        ASSERT_EQ(u, f32_bits(w.v[i])) << name << " [" << i << "]";
      }
      if (bias) bias_nonzero = bias_nonzero || w.v[i] != 0;
      if (name.find("shared_experts") != std::string::npos) shared_nonzero = shared_nonzero || w.v[i] != 0;
    }
  }
  EXPECT_TRUE(bias_nonzero);  // trained router biases, not the zero init
  EXPECT_TRUE(shared_nonzero);
}

std::vector<std::string> folder_names(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

TEST(ExportBinary, Fp32AndShardedBf16MatchTheCheckpoint) {
  const fs::path d = moe_test::make_run("export");
  // Three steps: the router biases move by +-bias_update_speed per step, so after an odd
  // number of steps they cannot all be back at zero (unless a load were exactly the mean).
  ASSERT_EQ(moe_test::run(d, "train --config c.toml --set training.steps=3 --set moe.num_shared_experts=2"), 0)
      << moe_test::slurp(d / "err.txt");
  const fs::path ckpt = d / "ckpt" / "step-00000003.h5";
  ASSERT_TRUE(fs::exists(ckpt));

  ASSERT_EQ(moe_test::run(d, "export --checkpoint ckpt --format safetensors --output hf32 --dtype fp32"), 0)
      << moe_test::slurp(d / "err.txt");
  size_t n_files = 0;
  expect_export_matches(d / "hf32", ckpt, false, &n_files);
  EXPECT_EQ(n_files, 1u);
  EXPECT_EQ(folder_names(d / "hf32"), (std::vector<std::string>{"config.json", "model.safetensors"}));
  // One warning line: MHA does not load as DeepSeek-V3.
  const std::string err = moe_test::slurp(d / "err.txt");
  EXPECT_NE(err.find("warning: ckpt/step-00000003.h5 has attention.kind = \"mha\""), std::string::npos) << err;
  EXPECT_NE(moe_test::slurp(d / "log.txt").find("exported ckpt/step-00000003.h5 (step 3) to hf32"),
            std::string::npos);

  // config.json
  const moe::JsonValue j = moe::json_parse(moe_test::slurp(d / "hf32" / "config.json"), "config.json");
  auto i64 = [&](const char* k) {
    const moe::JsonValue* v = j.get(k);
    EXPECT_TRUE(v && v->kind == moe::JsonValue::Kind::kInt) << k;
    return v ? v->i : -1;
  };
  EXPECT_EQ(j.get("architectures")->items.at(0).s, "DeepseekV3ForCausalLM");
  EXPECT_EQ(j.get("model_type")->s, "deepseek_v3");
  EXPECT_EQ(i64("vocab_size"), 256);
  EXPECT_EQ(i64("hidden_size"), 32);
  EXPECT_EQ(i64("num_hidden_layers"), 2);
  EXPECT_EQ(i64("num_attention_heads"), 2);
  EXPECT_EQ(i64("num_key_value_heads"), 2);
  EXPECT_EQ(i64("head_dim"), 16);
  EXPECT_EQ(i64("intermediate_size"), (2 + 2) * 32);
  EXPECT_EQ(i64("moe_intermediate_size"), 32);
  EXPECT_EQ(i64("n_routed_experts"), 4);
  EXPECT_EQ(i64("n_shared_experts"), 2);
  EXPECT_EQ(i64("num_experts_per_tok"), 2);
  EXPECT_EQ(i64("first_k_dense_replace"), 1);
  EXPECT_EQ(i64("max_position_embeddings"), 32);
  EXPECT_EQ(i64("num_nextn_predict_layers"), 0);
  EXPECT_EQ(j.get("torch_dtype")->s, "float32");
  EXPECT_EQ(j.get("scoring_func")->s, "sigmoid");
  EXPECT_EQ(j.get("rms_norm_eps")->f, 1e-6);
  EXPECT_EQ(j.get("rope_theta")->f, 10000.0);
  EXPECT_EQ(j.get("routed_scaling_factor")->f, 1.0);
  EXPECT_EQ(j.get("q_lora_rank")->kind, moe::JsonValue::Kind::kNull);
  EXPECT_FALSE(j.get("tie_word_embeddings")->b);

  // BF16, sharded by a tiny --shard-mb: an index covering every tensor once.
  ASSERT_EQ(moe_test::run(d, "export --checkpoint ckpt --output hf16 --shard-mb 0.03"), 0)
      << moe_test::slurp(d / "err.txt");
  expect_export_matches(d / "hf16", ckpt, true, &n_files);
  EXPECT_GE(n_files, 3u);
  for (const std::string& n : folder_names(d / "hf16")) EXPECT_EQ(n.find(".tmp."), std::string::npos) << n;
  EXPECT_EQ(moe::json_parse(moe_test::slurp(d / "hf16" / "config.json"), "c").get("torch_dtype")->s,
            "bfloat16");

  // Exporting again into the same folder, unsharded, leaves no file of the old export.
  ASSERT_EQ(moe_test::run(d, "export --checkpoint ckpt/step-00000003.h5 --output hf16"), 0);
  EXPECT_EQ(folder_names(d / "hf16"), (std::vector<std::string>{"config.json", "model.safetensors"}));
  expect_export_matches(d / "hf16", ckpt, true, &n_files);
}

TEST(ExportBinary, TiedEmbeddingsWriteTheHeadFromTheEmbedding) {
  const fs::path d = moe_test::make_run("export_tied");
  ASSERT_EQ(moe_test::run(d, "train --config c.toml --set training.steps=3 --set model.tie_embeddings=true"), 0)
      << moe_test::slurp(d / "err.txt");
  ASSERT_EQ(moe_test::run(d, "export --checkpoint ckpt --output hf --drop-mtp"), 0)
      << moe_test::slurp(d / "err.txt");
  size_t n_files = 0;
  expect_export_matches(d / "hf", d / "ckpt" / "step-00000003.h5", true, &n_files);
  const moe::JsonValue j = moe::json_parse(moe_test::slurp(d / "hf" / "config.json"), "c");
  EXPECT_TRUE(j.get("tie_word_embeddings")->b);
}

// A failure after files were started (here a corrupted tensor, caught by its checksum while
// streaming) removes every temporary file, and the output folder if the export made it; an
// earlier export in the folder stays as it was.
TEST(ExportBinary, FailureMidwayLeavesNothingHalfWritten) {
  const fs::path d = moe_test::make_run("export_midway");
  ASSERT_EQ(moe_test::run(d, "train --config c.toml --set training.steps=1"), 0);
  const fs::path good = d / "ckpt" / "step-00000001.h5";
  ASSERT_EQ(moe_test::run(d, "export --checkpoint " + good.string() + " --output prev"), 0);
  const std::string prev_model = moe_test::slurp(d / "prev" / "model.safetensors");
  // Flip a byte inside lm_head's first row (exported last but one, after every layer).
  std::vector<float> head(256 * 32);
  {
    moe::CheckpointReader r(good.string());
    r.read_f32("/model/lm_head", {256, 32}, head.data(), 32);
  }
  std::string bytes = moe_test::slurp(good);
  const std::string row(reinterpret_cast<const char*>(head.data()), 32 * sizeof(float));
  const size_t at = bytes.find(row);
  ASSERT_NE(at, std::string::npos) << "lm_head's first row is not stored as raw floats";
  bytes[at + 5] = static_cast<char>(bytes[at + 5] ^ 0x40);
  moe_test::write(d / "bad.h5", bytes);

  EXPECT_NE(moe_test::run(d, "export --checkpoint bad.h5 --output fresh"), 0);
  std::string err = moe_test::slurp(d / "err.txt");
  err.pop_back();
  const std::string last = err.substr(err.rfind('\n') + 1);
  EXPECT_EQ(last.rfind("error: bad.h5: /model/lm_head", 0), 0u) << last;
  EXPECT_FALSE(fs::exists(d / "fresh"));
  EXPECT_NE(moe_test::run(d, "export --checkpoint bad.h5 --output prev"), 0);
  EXPECT_EQ(folder_names(d / "prev"), (std::vector<std::string>{"config.json", "model.safetensors"}));
  EXPECT_EQ(moe_test::slurp(d / "prev" / "model.safetensors"), prev_model);
}

TEST(ExportBinary, ErrorsAreOneLineAndLeaveNothing) {
  const fs::path d = moe_test::make_run("export_errors");
  ASSERT_EQ(moe_test::run(d, "train --config c.toml --set training.steps=1"), 0);
  auto last_error = [&] {
    std::string err = moe_test::slurp(d / "err.txt");
    while (!err.empty() && err.back() == '\n') err.pop_back();
    return err.substr(err.rfind('\n') + 1);
  };
  EXPECT_NE(moe_test::run(d, "export --checkpoint nowhere --output out"), 0);
  EXPECT_EQ(last_error(), "error: nowhere: no such checkpoint file or folder");
  moe_test::write(d / "junk.h5", "not hdf5 at all");
  EXPECT_NE(moe_test::run(d, "export --checkpoint junk.h5 --output out"), 0);
  EXPECT_NE(last_error().find("junk.h5: not a moetrain checkpoint"), std::string::npos) << last_error();
  EXPECT_FALSE(fs::exists(d / "out"));
  moe_test::write(d / "afile", "x");
  EXPECT_NE(moe_test::run(d, "export --checkpoint ckpt --output afile"), 0);
  EXPECT_EQ(last_error(), "error: afile: exists and is not a directory");
  EXPECT_EQ(moe_test::slurp(d / "afile"), "x");
  EXPECT_NE(moe_test::run(d, "export --checkpoint ckpt --output out --dtype fp16"), 0);
  EXPECT_NE(moe_test::run(d, "export --checkpoint ckpt --output out --format gguf"), 0);
  EXPECT_NE(moe_test::run(d, "export --checkpoint ckpt --output out --shard-mb 0"), 0);
  EXPECT_FALSE(fs::exists(d / "out"));
}

}  // namespace
