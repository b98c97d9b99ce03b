#include "io/json_lite.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "model/check.h"

namespace moe {

namespace {

// Offset of the first byte that does not start a well-formed UTF-8 sequence (overlong
// forms, surrogates and code points above U+10FFFF included), or npos.
size_t utf8_bad_offset(std::string_view t) {
  size_t i = 0;
  while (i < t.size()) {
    const unsigned char c = static_cast<unsigned char>(t[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return i;
    }
    if (t.size() - i < len) return i;
    for (size_t k = 1; k < len; ++k) {
      const unsigned char b = static_cast<unsigned char>(t[i + k]);
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

class Parser {
 public:
  Parser(std::string_view t, const std::string& where, size_t max_values)
      : t_(t), where_(where), budget_(max_values) {}

  JsonValue document() {
    if (const size_t bad = utf8_bad_offset(t_); bad != std::string_view::npos) {
      pos_ = bad;
      fail("invalid UTF-8");
    }
    skip_ws();
    JsonValue v = value(0);
    skip_ws();
    if (pos_ != t_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const char* what) const {
    user_error("%s: JSON byte %zu: %s", where_.c_str(), pos_, what);
  }
  bool at_end() const { return pos_ >= t_.size(); }
  char peek() const { return at_end() ? '\0' : t_[pos_]; }
  void skip_ws() {
    while (!at_end() && (t_[pos_] == ' ' || t_[pos_] == '\t' || t_[pos_] == '\n' || t_[pos_] == '\r'))
      ++pos_;
  }
  void expect(char c, const char* what) {
    if (peek() != c) fail(what);
    ++pos_;
  }

  JsonValue value(int depth) {
    if (budget_ == 0) fail("too many values");
    --budget_;
    if (at_end()) fail("unexpected end, expected a value");
    const char c = t_[pos_];
    JsonValue v;
    if (c == '{' || c == '[') {
      if (depth >= kJsonMaxDepth) fail("nested too deeply");
      if (c == '{') {
        object(v, depth);
      } else {
        array(v, depth);
      }
    } else if (c == '"') {
      v.kind = JsonValue::Kind::kString;
      v.s = string();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      number(v);
    } else if (literal("true")) {
      v.kind = JsonValue::Kind::kBool;
      v.b = true;
    } else if (literal("false")) {
      v.kind = JsonValue::Kind::kBool;
    } else if (!literal("null")) {
      fail("expected a value");
    }
    return v;
  }

  bool literal(std::string_view word) {
    if (t_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  void object(JsonValue& v, int depth) {
    v.kind = JsonValue::Kind::kObject;
    ++pos_;
    skip_ws();
    if (peek() == '}') {
      ++pos_;
      return;
    }
    std::vector<size_t> key_at;  // where each member's key starts, for the duplicate check
    for (;;) {
      skip_ws();
      if (peek() != '"') fail("expected a string key");
      key_at.push_back(pos_);
      std::string key = string();
      skip_ws();
      expect(':', "expected ':'");
      skip_ws();
      JsonValue member = value(depth + 1);
      v.members.emplace_back(std::move(key), std::move(member));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect('}', "expected ',' or '}'");
      break;
    }
    // Duplicate keys, in O(n log n) (a header may hold many thousands of tensors).
    std::vector<size_t> order(v.members.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::sort(order.begin(), order.end(), [&](size_t x, size_t y) {
      return v.members[x].first != v.members[y].first ? v.members[x].first < v.members[y].first : x < y;
    });
    for (size_t k = 1; k < order.size(); ++k)
      if (v.members[order[k]].first == v.members[order[k - 1]].first) {
        pos_ = key_at[order[k]];
        fail("duplicate key");
      }
  }

  void array(JsonValue& v, int depth) {
    v.kind = JsonValue::Kind::kArray;
    ++pos_;
    skip_ws();
    if (peek() == ']') {
      ++pos_;
      return;
    }
    for (;;) {
      skip_ws();
      v.items.push_back(value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect(']', "expected ',' or ']'");
      return;
    }
  }

  uint32_t hex4() {
    if (t_.size() - pos_ < 4) fail("truncated \\u escape");
    uint32_t cp = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = t_[pos_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') {
        cp |= static_cast<uint32_t>(h - '0');
      } else if (h >= 'a' && h <= 'f') {
        cp |= static_cast<uint32_t>(h - 'a' + 10);
      } else if (h >= 'A' && h <= 'F') {
        cp |= static_cast<uint32_t>(h - 'A' + 10);
      } else {
        --pos_;
        fail("bad hex digit in \\u escape");
      }
    }
    return cp;
  }

  std::string string() {
    ++pos_;  // the opening quote
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string");
      const char c = t_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') {
        out += c;
        ++pos_;
        continue;
      }
      ++pos_;
      if (at_end()) fail("unterminated string");
      const char e = t_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate in \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (t_.substr(pos_, 2) != "\\u") fail("unpaired high surrogate in \\u escape");
            pos_ += 2;
            const uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired high surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default:
          --pos_;
          fail("bad escape in a string");
      }
    }
  }

  void number(JsonValue& v) {
    const size_t start = pos_;
    auto digits = [&] {
      const size_t d0 = pos_;
      while (!at_end() && t_[pos_] >= '0' && t_[pos_] <= '9') ++pos_;
      return pos_ - d0;
    };
    if (peek() == '-') ++pos_;
    const size_t int_at = pos_;
    const size_t n_int = digits();
    if (n_int == 0) fail("expected a digit");
    if (n_int > 1 && t_[int_at] == '0') {
      pos_ = int_at;
      fail("leading zero in a number");
    }
    bool integer = true;
    if (peek() == '.') {
      ++pos_;
      integer = false;
      if (digits() == 0) fail("expected a digit after '.'");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      integer = false;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (digits() == 0) fail("expected a digit in the exponent");
    }
    const std::string text(t_.substr(start, pos_ - start));
    if (integer) {
      // Accumulate as a negative number, so INT64_MIN fits.
      const bool neg = text[0] == '-';
      int64_t acc = 0;
      for (size_t k = neg ? 1 : 0; k < text.size(); ++k) {
        const int d = text[k] - '0';
        if (acc < (std::numeric_limits<int64_t>::min() + d) / 10) {
          pos_ = start;
          fail("integer out of range");
        }
        acc = acc * 10 - d;
      }
      if (!neg && acc == std::numeric_limits<int64_t>::min()) {
        pos_ = start;
        fail("integer out of range");
      }
      v.kind = JsonValue::Kind::kInt;
      v.i = neg ? acc : -acc;
      v.f = static_cast<double>(v.i);
      return;
    }
    const double d = std::strtod(text.c_str(), nullptr);
    if (!std::isfinite(d)) {
      pos_ = start;
      fail("number out of range");
    }
    v.kind = JsonValue::Kind::kFloat;
    v.f = d;
  }

  std::string_view t_;
  const std::string& where_;
  size_t pos_ = 0;
  size_t budget_;
};

}  // namespace

JsonValue::JsonValue() = default;

const JsonValue* JsonValue::get(std::string_view key) const {
  for (const auto& m : members)
    if (m.first == key) return &m.second;
  return nullptr;
}

const char* to_string(JsonValue::Kind k) {
  switch (k) {
    case JsonValue::Kind::kNull: return "null";
    case JsonValue::Kind::kBool: return "a boolean";
    case JsonValue::Kind::kInt: return "an integer";
    case JsonValue::Kind::kFloat: return "a non-integer number";
    case JsonValue::Kind::kString: return "a string";
    case JsonValue::Kind::kArray: return "an array";
    case JsonValue::Kind::kObject: return "an object";
  }
  return "?";
}

JsonValue json_parse(std::string_view text, const std::string& where, size_t max_values) {
  return Parser(text, where, max_values).document();
}

std::string json_quote(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string json_number(double v) {
  CHECK(std::isfinite(v), "JSON has no NaN or infinity");
  char buf[40];
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    std::snprintf(buf, sizeof(buf), "%.1f", v);  // "10000.0": a float to Python, not an int
    return buf;
  }
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  // NOTE: an integral v in [1e15, 1e17) prints without an exponent ("9007199254740993"):
  // it keeps its decimal too (found by tests/fuzz/fuzz_safetensors).
  std::string s = buf;
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

}  // namespace moe
