// Reading and writing the TOML config through the key table in io/config_schema.
//
// Loading is three steps: the file's keys in file order, then each --set override in
// order, each typed on assignment (type errors point at the value); then one validation
// of the final values (range errors point at the key, see config_schema.cpp).
#include "io/config.h"
#include "io/quoted_string.h"

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <utility>

#include <toml++/toml.h>

#include "io/config_schema.h"
#include "model/check.h"

namespace moe {

namespace {

using config_schema::Betas;
using config_schema::config_fail;
using config_schema::FieldRef;
using config_schema::Key;
using config_schema::KeyOrigins;

// Overrides come after every line of the file.
constexpr int64_t kOverrideOrder = int64_t{1} << 62;

const char* type_name(toml::node_type t) {
  switch (t) {
    case toml::node_type::table: return "table";
    case toml::node_type::array: return "array";
    case toml::node_type::string: return "string";
    case toml::node_type::integer: return "integer";
    case toml::node_type::floating_point: return "float";
    case toml::node_type::boolean: return "boolean";
    case toml::node_type::date: return "date";
    case toml::node_type::time: return "time";
    case toml::node_type::date_time: return "date-time";
    default: return "nothing";
  }
}

// The shortest decimal that reads back as the same double, always spelled as a TOML float.
std::string toml_float(double v) {
  char buf[40];
  for (int prec = 15; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;
  if (s.find_first_of(".en") == std::string::npos) s += ".0";  // 'n': inf and nan
  return s;
}

std::string where_in_file(const std::string& source, const toml::source_position& pos) {
  if (pos.line == 0) return source;
  return strprintf("%s:%u:%u", source.c_str(), static_cast<unsigned>(pos.line),
                   static_cast<unsigned>(pos.column));
}

// Typed reads of one TOML value for `name` ("section.key"); errors are reported at `where`.
int64_t read_integer(const toml::node& n, const std::string& name, const std::string& where) {
  if (!n.is_integer())
    config_fail(where, "%s expects an integer, got %s", name.c_str(), type_name(n.type()));
  return n.as_integer()->get();
}

double read_float(const toml::node& n, const std::string& name, const std::string& where) {
  if (n.is_integer()) return static_cast<double>(n.as_integer()->get());
  if (!n.is_floating_point())
    config_fail(where, "%s expects a float, got %s", name.c_str(), type_name(n.type()));
  const double v = n.as_floating_point()->get();
  if (!std::isfinite(v)) config_fail(where, "%s expects a finite float, got %g", name.c_str(), v);
  return v;
}

const std::string& read_string(const toml::node& n, const std::string& name, const std::string& where) {
  if (!n.is_string()) config_fail(where, "%s expects a string, got %s", name.c_str(), type_name(n.type()));
  return n.as_string()->get();
}

template <class E>
E read_enum(const toml::node& n, const std::string& name, const std::string& where) {
  const auto names = config_schema::enum_names(static_cast<const E*>(nullptr));
  if (n.is_string())
    for (const auto& e : names)
      if (n.as_string()->get() == e.name) return e.value;
  std::string choices;
  for (const auto& e : names) choices += (choices.empty() ? "\"" : ", \"") + std::string(e.name) + "\"";
  const std::string got = n.is_string() ? quoted_string(n.as_string()->get()) : type_name(n.type());
  config_fail(where, "%s expects one of %s, got %s", name.c_str(), choices.c_str(), got.c_str());
}

// Stores `n` into the field `key` fills, checking its TOML type. `where` locates `n`;
// `source` is the file, for locating array elements.
void assign(Config& cfg, const Key& key, const toml::node& n, const std::string& where,
            const std::string* source) {
  const std::string name = std::string(key.section) + "." + key.name;
  // An array's elements are located in the file; an override's all point at the --set.
  auto element_at = [&](const toml::array& a, size_t i) {
    return source ? where_in_file(*source, a[i].source().begin) : where;
  };
  std::visit(
      [&](auto field) {
        using T = std::remove_pointer_t<decltype(field)>;
        if constexpr (std::is_same_v<decltype(field), Betas>) {
          const char* expected = "an array of two floats";
          const toml::array* a = n.as_array();
          if (!a) config_fail(where, "%s expects %s, got %s", name.c_str(), expected, type_name(n.type()));
          if (a->size() != 2)
            config_fail(where, "%s expects %s, got an array of %zu", name.c_str(), expected, a->size());
          *field.b1 = read_float((*a)[0], name + "[0]", element_at(*a, 0));
          *field.b2 = read_float((*a)[1], name + "[1]", element_at(*a, 1));
        } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
          const toml::array* a = n.as_array();
          if (!a)
            config_fail(where, "%s expects an array of integers, got %s", name.c_str(), type_name(n.type()));
          std::vector<int64_t> v;
          for (size_t i = 0; i < a->size(); ++i)
            v.push_back(read_integer((*a)[i], strprintf("%s[%zu]", name.c_str(), i), element_at(*a, i)));
          *field = std::move(v);
        } else if constexpr (std::is_same_v<T, bool>) {
          if (!n.is_boolean())
            config_fail(where, "%s expects a boolean, got %s", name.c_str(), type_name(n.type()));
          *field = n.as_boolean()->get();
        } else if constexpr (std::is_same_v<T, int>) {
          const int64_t v = read_integer(n, name, where);
          if (v < INT_MIN || v > INT_MAX)
            config_fail(where, "%s expects a 32-bit integer, got %" PRId64, name.c_str(), v);
          *field = static_cast<int>(v);
        } else if constexpr (std::is_same_v<T, int64_t>) {
          *field = read_integer(n, name, where);
        } else if constexpr (std::is_same_v<T, uint64_t>) {
          const int64_t v = read_integer(n, name, where);
          if (v < 0) config_fail(where, "%s expects a non-negative integer, got %" PRId64, name.c_str(), v);
          *field = static_cast<uint64_t>(v);
        } else if constexpr (std::is_same_v<T, double>) {
          *field = read_float(n, name, where);
        } else if constexpr (std::is_same_v<T, std::string>) {
          *field = read_string(n, name, where);
        } else {
          static_assert(std::is_enum_v<T>);
          *field = read_enum<T>(n, name, where);
        }
      },
      key.field(cfg));
}

// Applies the file's keys in file order, so the first problem reported is the first one in
// the file (toml++ iterates tables sorted by name).
void apply_file(Config& cfg, const toml::table& root, const std::string& source, KeyOrigins& origins) {
  struct Item {
    toml::source_position pos;  // where the key (or [section] header) starts
    std::string_view section;
    const toml::node* section_node;
    std::string_view key;        // empty for a section-level item
    const toml::node* value;
  };
  auto start = [](const toml::key& k, const toml::node& n) {
    // A [header]'s key starts after the '['; the table node starts at it.
    const auto a = k.source().begin, b = n.source().begin;
    return (b.line != 0 && b < a) ? b : a;
  };
  std::vector<Item> items;
  for (const auto& [sk, sn] : root) {
    const toml::table* t = sn.as_table();
    if (!t || !config_schema::config_section_known(sk.str())) {
      items.push_back({start(sk, sn), sk.str(), &sn, {}, nullptr});
      continue;
    }
    for (const auto& [k, v] : *t) items.push_back({start(k, v), sk.str(), &sn, k.str(), &v});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return std::tie(a.pos.line, a.pos.column) < std::tie(b.pos.line, b.pos.column);
  });
  for (const Item& it : items) {
    const std::string at = where_in_file(source, it.pos);
    const std::string sec(it.section);
    if (!config_schema::config_section_known(it.section))
      config_fail(at, "unknown section [%s]", sec.c_str());
    if (!it.value)
      config_fail(where_in_file(source, it.section_node->source().begin), "%s expects a table, got %s",
                  sec.c_str(), type_name(it.section_node->type()));
    const std::string name = sec + "." + std::string(it.key);
    const Key* key = config_schema::config_key_find(it.section, it.key);
    if (!key) config_fail(at, "unknown key %s", name.c_str());
    assign(cfg, *key, *it.value, where_in_file(source, it.value->source().begin), &source);
    origins[name] = {at, int64_t{it.pos.line} * (int64_t{1} << 24) + it.pos.column};
  }
}

std::string_view trim(std::string_view s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

// "section.key=value": the value is read as TOML, or failing that taken as a raw string
// (so --set data.train=foo.bin needs no quotes).
void apply_override(Config& cfg, const std::string& text, size_t index, KeyOrigins& origins) {
  const std::string where = "--set " + text;
  const size_t eq = text.find('=');
  const std::string_view path = trim(std::string_view(text).substr(0, eq == std::string::npos ? 0 : eq));
  const size_t dot = path.find('.');
  if (eq == std::string::npos || dot == std::string_view::npos || dot == 0 || dot + 1 == path.size())
    config_fail(where, "expected section.key=value");
  const std::string section(path.substr(0, dot)), name(path);
  if (!config_schema::config_section_known(section))
    config_fail(where, "unknown section [%s]", section.c_str());
  const Key* key = config_schema::config_key_find(section, path.substr(dot + 1));
  if (!key) config_fail(where, "unknown key %s", name.c_str());

  const std::string value = text.substr(eq + 1);
  toml::table doc;
  bool parsed = false;
  try {
    doc = toml::parse(std::string_view("v = " + value), std::string_view(where));
    parsed = doc.size() == 1 && doc.contains("v");
  } catch (const toml::parse_error&) {
  }
  // NOTE: a raw string must be UTF-8 like all TOML text, or config_to_toml's copy (stored in
  // every checkpoint) would not load again (found by tests/fuzz/fuzz_config).
  if (!parsed) {
    try {
      (void)toml::parse(std::string_view("v = " + quoted_string(value)), std::string_view(where));
    } catch (const toml::parse_error&) {
      config_fail(where, "%s must be UTF-8 text (as all TOML is)", name.c_str());
    }
  }
  const toml::value<std::string> raw(value);
  assign(cfg, *key, parsed ? *doc.get("v") : static_cast<const toml::node&>(raw), where, nullptr);
  origins[name] = {where, kOverrideOrder + static_cast<int64_t>(index)};
}

// The TOML spelling of one field's value.
std::string format_value(const FieldRef& field) {
  return std::visit(
      [](auto f) -> std::string {
        using T = std::remove_pointer_t<decltype(f)>;
        if constexpr (std::is_same_v<decltype(f), Betas>) {
          return "[" + toml_float(*f.b1) + ", " + toml_float(*f.b2) + "]";
        } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
          return config_schema::config_int_list(*f);
        } else if constexpr (std::is_same_v<T, bool>) {
          return *f ? "true" : "false";
        } else if constexpr (std::is_same_v<T, double>) {
          return toml_float(*f);
        } else if constexpr (std::is_same_v<T, std::string>) {
          return quoted_string(*f);
        } else if constexpr (std::is_enum_v<T>) {
          return quoted_string(to_string(*f));
        } else {
          // NOTE: a uint64 seed above INT64_MAX (only settable from code) does not re-parse.
          return std::to_string(*f);
        }
      },
      field);
}

}  // namespace

Config config_parse(const std::string& toml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides) {
  Config cfg;
  cfg.source = source_name;
  toml::table root;
  try {
    root = toml::parse(std::string_view(toml_text), std::string_view(source_name));
  } catch (const toml::parse_error& e) {
    config_fail(where_in_file(source_name, e.source().begin), "%s", std::string(e.description()).c_str());
  }
  KeyOrigins origins;
  apply_file(cfg, root, source_name, origins);
  for (size_t i = 0; i < overrides.size(); ++i) apply_override(cfg, overrides[i], i, origins);
  config_schema::config_validate(cfg, origins, source_name);
  return cfg;
}

namespace {

// True when `text` holds nothing but blank lines and comments.
bool no_settings(const std::string& text) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    const std::string_view t = trim(line);
    if (!t.empty() && t != "\r" && t.front() != '#') return false;
  }
  return true;
}

}  // namespace

Config config_load(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  // NOTE: an ifstream opens a folder without error and reads it as empty.
  if (std::filesystem::is_directory(st)) config_fail(path, "is a folder, not a TOML config file");
  std::ifstream in(path, std::ios::binary);
  if (!in) config_fail(path, "cannot open config file: %s", std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) config_fail(path, "cannot read config file");
  // Every key has a default, but a config file without a single one is a mistake (an empty
  // or truncated copy), not a request for the defaults.
  if (no_settings(text.str()))
    config_fail(path, "config file is empty (no sections or keys); start from configs/tiny.toml");
  return config_parse(text.str(), path, overrides);
}

std::string config_to_toml(const Config& cfg) {
  Config c = cfg;  // the key table hands out mutable field pointers
  std::string out;
  std::string_view section;
  for (const Key& k : config_schema::config_keys()) {
    if (section != k.section) {
      out += strprintf("%s[%s]\n", section.empty() ? "" : "\n", k.section);
      section = k.section;
    }
    out += std::string(k.name) + " = " + format_value(k.field(c)) + "\n";
  }
  return out;
}

uint64_t text_hash(std::string_view text) {
  uint64_t h = 14695981039346656037ull;  // FNV-1a 64 offset basis
  for (unsigned char ch : text) {
    h ^= ch;
    h *= 1099511628211ull;  // FNV prime
  }
  return h;
}

uint64_t config_hash(const Config& cfg) { return text_hash(config_to_toml(cfg)); }

}  // namespace moe
