// Quoting strings for the two text formats moetrain writes: TOML basic strings (the resolved
// config) and JSON strings (metrics). Their escape rules agree on everything used here.
#pragma once

#include <string>
#include <string_view>

namespace moe {

// `"` + s + `"` with quote, backslash and control characters (and DEL) escaped as
// \" \\ \b \t \n \f \r or \u00XX: valid as a TOML basic string and as a JSON string.
std::string quoted_string(std::string_view s);

}  // namespace moe
