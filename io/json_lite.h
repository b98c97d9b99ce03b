// A small, strict JSON reader and the two writing helpers moetrain's JSON files need
// (safetensors headers, model.safetensors.index.json, config.json).
//
// Strict RFC 8259: one value, optional surrounding whitespace, nothing else; UTF-8 checked;
// no comments, trailing commas, NaN or leading zeros; duplicate object keys are an error.
// Numbers without fraction or exponent are integers and must fit int64_t; the others are
// doubles. Nesting is bounded (kJsonMaxDepth) and so is the number of values (max_values),
// so no input can exhaust the stack, and memory stays proportional to the input.
//
// Errors are UserError with one line: "<where>: JSON byte <offset>: <what>".
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moe {

constexpr int kJsonMaxDepth = 64;

struct JsonValue {
  enum class Kind { kNull, kBool, kInt, kFloat, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool b = false;
  int64_t i = 0;   // kInt
  double f = 0;    // kFloat, and kInt's value as a double
  std::string s;   // kString
  std::vector<JsonValue> items;                            // kArray
  std::vector<std::pair<std::string, JsonValue>> members;  // kObject, in document order

  // NOTE: declared here, defaulted in json_lite.cpp: with an implicit one, clang (libstdc++'s
  // std::pair traits) needs JsonValue complete inside its own definition and fails to compile.
  JsonValue();

  // The member named `key` of an object, nullptr when absent (or not an object).
  const JsonValue* get(std::string_view key) const;
};

const char* to_string(JsonValue::Kind k);  // "an integer", "a string", ...

JsonValue json_parse(std::string_view text, const std::string& where,
                     size_t max_values = size_t(1) << 22);

// `s` as a JSON string literal, quotes included; bytes below 0x20, '"' and '\\' escaped.
std::string json_quote(std::string_view s);

// The shortest decimal text that reads back as exactly `v` ("1e-06", "0.02"); integral
// values keep one decimal ("10000.0", "-0.0") so that Python reads them as floats.
// CHECKs that v is finite (JSON has no NaN or infinity).
std::string json_number(double v);

}  // namespace moe
