#include "model/check.h"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace moe {

namespace {
// Process-wide identity for error messages only; written once at start-up.
int g_rank = -1;
int g_device = -1;
}  // namespace

std::string vstrprintf(const char* fmt, va_list ap) {
  va_list ap2;
  va_copy(ap2, ap);
  int n = std::vsnprintf(nullptr, 0, fmt, ap2);
  va_end(ap2);
  if (n <= 0) return std::string();
  std::vector<char> buf(static_cast<size_t>(n) + 1);
  std::vsnprintf(buf.data(), buf.size(), fmt, ap);
  return std::string(buf.data(), static_cast<size_t>(n));
}

std::string strprintf(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vstrprintf(fmt, ap);
  va_end(ap);
  return s;
}

void user_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vstrprintf(fmt, ap);
  va_end(ap);
  throw UserError(s);
}

void check_set_context(int rank, int device) {
  g_rank = rank;
  g_device = device;
}

void check_failed(const char* what, const char* file, int line, const std::string& msg) {
  std::fprintf(stderr, "[rank %d device %d] internal error at %s:%d: %s%s%s\n", g_rank, g_device,
               file, line, what, msg.empty() ? "" : ": ", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

std::string mpi_error_string(int rc) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, buf, &len) != MPI_SUCCESS) return strprintf("MPI error %d", rc);
  return std::string(buf, static_cast<size_t>(len));
}

}  // namespace moe
