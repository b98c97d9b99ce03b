#include "trainer/stop_signal.h"

#include <signal.h>
#include <unistd.h>

namespace moe {

namespace {
// Signal handlers can only talk to the program through process-wide flags.
volatile sig_atomic_t g_first_signal = 0;
volatile sig_atomic_t g_signal_count = 0;

void on_stop_signal(int sig) {
  if (g_first_signal == 0) g_first_signal = sig;
  g_signal_count = g_signal_count + 1;
  if (g_signal_count == 2) {
    static const char kMsg[] = "\nmoetrain: stop requested again; finishing the checkpoint "
                               "(a third signal exits at once)\n";
    (void)!write(STDERR_FILENO, kMsg, sizeof(kMsg) - 1);
  } else if (g_signal_count >= 3) {
    _exit(128 + sig);
  }
}
}  // namespace

void stop_signals_install() {
  struct sigaction sa = {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

int stop_signal_received() { return g_first_signal; }

}  // namespace moe
