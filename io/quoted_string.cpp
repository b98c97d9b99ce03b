#include "io/quoted_string.h"

#include "model/check.h"

namespace moe {

std::string quoted_string(std::string_view s) {
  std::string out = "\"";
  out.reserve(s.size() + 2);
  for (unsigned char ch : s) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      case '\f': out += "\\f"; break;
      case '\r': out += "\\r"; break;
      default:
        if (ch < 0x20 || ch == 0x7f) out += strprintf("\\u%04x", ch);
        else out += static_cast<char>(ch);
    }
  }
  return out + "\"";
}

}  // namespace moe
