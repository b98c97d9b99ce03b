// Internal to io/config*.cpp: the key table (what keys exist and which field each one
// fills) and the validation rules. config.cpp reads and writes TOML through this table;
// nothing outside io/config*.cpp includes this header.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <variant>
#include <vector>

#include "io/config.h"

namespace moe::config_schema {

template <class E>
struct EnumName {
  const char* name;  // the TOML spelling
  E value;
};

// Overloads picked by the field pointer's type, so a visitor can write enum_names(p).
std::span<const EnumName<Device>> enum_names(const Device*);
std::span<const EnumName<AttentionKind>> enum_names(const AttentionKind*);
std::span<const EnumName<ScoreFn>> enum_names(const ScoreFn*);
std::span<const EnumName<LrSchedule>> enum_names(const LrSchedule*);
std::span<const EnumName<PipeSchedule>> enum_names(const PipeSchedule*);
std::span<const EnumName<PrecisionMode>> enum_names(const PrecisionMode*);
std::span<const EnumName<StateDtype>> enum_names(const StateDtype*);
std::span<const EnumName<NonfiniteAction>> enum_names(const NonfiniteAction*);
std::span<const EnumName<SpikeAction>> enum_names(const SpikeAction*);
std::span<const EnumName<SaveErrorAction>> enum_names(const SaveErrorAction*);

// optim.betas = [b1, b2] fills two fields.
struct Betas {
  double* b1;
  double* b2;
};

// A typed pointer to the field one key fills.
using FieldRef = std::variant<int*, int64_t*, uint64_t*, double*, bool*, std::string*, Device*,
                              AttentionKind*, ScoreFn*, LrSchedule*, PipeSchedule*,
                              PrecisionMode*, StateDtype*, NonfiniteAction*, SpikeAction*,
                              SaveErrorAction*, Betas, std::vector<int64_t>*>;

struct Key {
  const char* section;
  const char* name;
  FieldRef (*field)(Config&);
};

// Every key, grouped by section in the order config_to_toml writes them.
std::span<const Key> config_keys();
const Key* config_key_find(std::string_view section, std::string_view name);
bool config_section_known(std::string_view section);

// Where a key was last set ("file:line:col" or "--set section.key=value") and when: a
// larger order means set later. Keys left at their defaults have no entry.
struct KeyOrigin {
  std::string where;
  int64_t order;
};
using KeyOrigins = std::unordered_map<std::string, KeyOrigin>;  // "section.key" -> origin

// Resolves model.head_dim and model.d_ff, then checks every range and combination.
// Throws UserError at the origin of the key that was set last among those involved
// (`source` alone when all of them are defaults).
void config_validate(Config& cfg, const KeyOrigins& origins, const std::string& source);

// An integer array as TOML writes it: "[2, 2, 2]", "[]".
std::string config_int_list(const std::vector<int64_t>& v);

// Throws UserError "<where>: <message>", with control characters escaped so the message
// is always one line.
[[noreturn]] void config_fail(const std::string& where, const char* fmt, ...)
    __attribute__((format(printf, 2, 3)));

}  // namespace moe::config_schema
