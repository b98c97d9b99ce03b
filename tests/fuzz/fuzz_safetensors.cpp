// libFuzzer target: the safetensors reader's validation (io/safetensors.h
// safetensors_parse_header, which promises no undefined behaviour on any input) and the JSON
// parser under it (io/json_lite.h json_parse).
//
// Each input is used three ways:
//  1. as a whole safetensors file;
//  2. as the head of a longer file: the file size is the input's plus the count in its last
//     8 bytes (so the fuzzer reaches huge tensors, offsets and sizes without writing them),
//     whenever that satisfies the function's contract (the head holds 8 + N bytes);
//  3. as a JSON document.
// A UserError (one line) is the expected answer to bad bytes; anything else is a finding. What
// is accepted must hold up: a parsed header's tensors tile its data section, and writing them
// again (safetensors_header_bytes) parses back to the same header; a parsed JSON value written
// again (json_quote, json_number) parses back to the same value.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "io/json_lite.h"
#include "io/safetensors.h"
#include "model/check.h"

namespace {

using moe::JsonValue;

[[noreturn]] void finding(const char* what, const std::string& detail = "") {
  std::fprintf(stderr, "fuzz_safetensors: %s\n%s\n", what, detail.c_str());
  std::abort();
}

void check_one_line(const moe::UserError& e) {
  const std::string_view msg = e.what();
  if (msg.empty() || msg.find('\n') != std::string_view::npos)
    finding("an error message is not one line", std::string(msg));
}

uint64_t le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int k = 7; k >= 0; --k) v = (v << 8) | p[k];
  return v;
}

bool same_tensor(const moe::SafetensorsTensor& a, const moe::SafetensorsTensor& b) {
  return a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.begin == b.begin &&
         a.end == b.end;
}

// What a parsed header promises, then the write-and-parse-again round trip.
void check_header(const moe::SafetensorsHeader& h, uint64_t file_size) {
  if (h.data_start != 8 + h.header_len || h.data_start + h.data_size != file_size)
    finding("header_len / data_start / data_size do not add up to the file size");
  uint64_t at = 0;
  std::vector<moe::SafetensorsSpec> specs;
  for (const moe::SafetensorsTensor& t : h.tensors) {
    if (t.begin != at || t.end < t.begin) finding("tensors do not tile the data section", t.name);
    if (t.end - t.begin != moe::st_dtype_size(t.dtype) * t.numel())
      finding("a tensor's byte span is not dtype size x shape", t.name);
    if (h.find(t.name) != &t) finding("find() does not return the tensor", t.name);
    at = t.end;
    specs.push_back({t.name, t.dtype, t.shape});
  }
  if (at != h.data_size) finding("tensors do not cover the data section");

  const std::string again = moe::safetensors_header_bytes(specs, h.metadata);
  if (h.data_size > UINT64_MAX - again.size()) return;  // a file that size cannot exist
  moe::SafetensorsHeader h2;
  try {
    h2 = moe::safetensors_parse_header(again, again.size() + h.data_size, "rewritten");
  } catch (const moe::UserError& e) {
    finding("a header written from a parsed one does not parse", e.what());
  }
  bool has_format = false;
  for (const auto& [k, v] : h.metadata) has_format = has_format || k == "format";
  auto metadata = h.metadata;
  if (!has_format) metadata.insert(metadata.begin(), {"format", "pt"});
  if (h2.metadata != metadata) finding("metadata changed in the round trip");
  if (h2.tensors.size() != h.tensors.size()) finding("tensor count changed in the round trip");
  for (size_t i = 0; i < h.tensors.size(); ++i)
    if (!same_tensor(h.tensors[i], h2.tensors[i]))
      finding("a tensor changed in the round trip", h.tensors[i].name);
}

// JSON text for `v` through the library's writing helpers.
void write_json(const JsonValue& v, std::string& out) {
  switch (v.kind) {
    case JsonValue::Kind::kNull: out += "null"; break;
    case JsonValue::Kind::kBool: out += v.b ? "true" : "false"; break;
    case JsonValue::Kind::kInt: out += std::to_string(v.i); break;
    case JsonValue::Kind::kFloat: out += moe::json_number(v.f); break;
    case JsonValue::Kind::kString: out += moe::json_quote(v.s); break;
    case JsonValue::Kind::kArray:
      out += '[';
      for (size_t i = 0; i < v.items.size(); ++i) {
        if (i) out += ',';
        write_json(v.items[i], out);
      }
      out += ']';
      break;
    case JsonValue::Kind::kObject:
      out += '{';
      for (size_t i = 0; i < v.members.size(); ++i) {
        if (i) out += ',';
        out += moe::json_quote(v.members[i].first);
        out += ':';
        write_json(v.members[i].second, out);
      }
      out += '}';
      break;
  }
}

bool same_json(const JsonValue& a, const JsonValue& b) {
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case JsonValue::Kind::kNull: return true;
    case JsonValue::Kind::kBool: return a.b == b.b;
    case JsonValue::Kind::kInt: return a.i == b.i && a.f == b.f;
    case JsonValue::Kind::kFloat: return a.f == b.f;
    case JsonValue::Kind::kString: return a.s == b.s;
    case JsonValue::Kind::kArray:
      if (a.items.size() != b.items.size()) return false;
      for (size_t i = 0; i < a.items.size(); ++i)
        if (!same_json(a.items[i], b.items[i])) return false;
      return true;
    case JsonValue::Kind::kObject:
      if (a.members.size() != b.members.size()) return false;
      for (size_t i = 0; i < a.members.size(); ++i)
        if (a.members[i].first != b.members[i].first ||
            !same_json(a.members[i].second, b.members[i].second))
          return false;
      return true;
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);

  // 1. The input is the whole file.
  try {
    check_header(moe::safetensors_parse_header(in, size, "fuzz.safetensors"), size);
  } catch (const moe::UserError& e) {
    check_one_line(e);
  }

  // 2. The input is the head of a file `extra` bytes longer.
  if (size >= 16) {
    const uint64_t extra = le64(data + size - 8);
    const uint64_t n = le64(data);
    if (extra > 0 && extra <= UINT64_MAX - size) {
      const uint64_t file_size = size + extra;
      const bool rejected_early = n > moe::kSafetensorsMaxHeader || n > file_size - 8;
      if (rejected_early || 8 + n <= size) {
        try {
          check_header(moe::safetensors_parse_header(in, file_size, "fuzz.safetensors"),
                       file_size);
        } catch (const moe::UserError& e) {
          check_one_line(e);
        }
      }
    }
  }

  // 3. The input is a JSON document.
  try {
    const JsonValue v = moe::json_parse(in, "fuzz.json", size_t(1) << 16);
    std::string again;
    write_json(v, again);
    JsonValue v2;
    try {
      v2 = moe::json_parse(again, "rewritten.json");
    } catch (const moe::UserError& e) {
      finding("JSON written from a parsed value does not parse", std::string(e.what()) + "\n" + again);
    }
    if (!same_json(v, v2)) finding("JSON changed in the round trip", again);
  } catch (const moe::UserError& e) {
    check_one_line(e);
  }
  return 0;
}
