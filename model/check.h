// Error reporting for all of moetrain.
//
// Two kinds of failure, kept apart on purpose:
//  - A user error (bad config, missing file, corrupted data) is thrown as UserError with
//    one line that says what and where; main() prints it and exits non-zero.
//  - A broken internal invariant is a bug: CHECK prints the statement, file:line and rank
//    and aborts. Every library return code goes through one macro per library.
#pragma once

#include <cstdarg>
#include <stdexcept>
#include <string>

namespace moe {

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// printf-style formatting into a std::string (g++ 12 has no std::format).
std::string strprintf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string vstrprintf(const char* fmt, va_list ap);

// Throws UserError with the formatted message.
[[noreturn]] void user_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// The one reporter every CHECK-family macro ends in. Prints and aborts.
[[noreturn]] void check_failed(const char* what, const char* file, int line, const std::string& msg);

// The rank and device printed with every internal error; set once at start-up.
void check_set_context(int rank, int device);

std::string mpi_error_string(int rc);

}  // namespace moe

namespace moe {
// The optional message of a CHECK: nothing, a plain string, or a printf format and its values.
inline std::string check_msg() { return std::string(); }
inline std::string check_msg(const char* s) { return std::string(s); }
template <typename Arg, typename... Rest>
std::string check_msg(const char* fmt, Arg arg, Rest... rest) {
  return strprintf(fmt, arg, rest...);
}
}  // namespace moe

#define MOE_CHECK_MSG(...) ::moe::check_msg(__VA_ARGS__)

// CHECK(cond) or CHECK(cond, "fmt", args...)
#define CHECK(cond, ...)                                                        \
  do {                                                                          \
    if (!(cond)) ::moe::check_failed(#cond, __FILE__, __LINE__, MOE_CHECK_MSG(__VA_ARGS__)); \
  } while (0)

#define MPI_CHECK(stmt)                                                         \
  do {                                                                          \
    int moe_mpi_rc_ = (stmt);                                                   \
    if (moe_mpi_rc_ != 0)                                                       \
      ::moe::check_failed(#stmt, __FILE__, __LINE__, ::moe::mpi_error_string(moe_mpi_rc_)); \
  } while (0)

// HDF5 calls return a negative herr_t/hid_t on failure.
#define H5_CHECK(stmt)                                                          \
  do {                                                                          \
    if ((stmt) < 0) ::moe::check_failed(#stmt, __FILE__, __LINE__, "HDF5 call failed"); \
  } while (0)
