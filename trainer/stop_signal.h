// Graceful preemption: SIGTERM / SIGINT ask the loop to finish the current step, save a
// checkpoint and exit 0 (what cluster schedulers expect before they kill a job). A second
// signal while saving is ignored, so the save completes; a third exits at once, which is
// still safe because a checkpoint only appears under its final name once complete.
#pragma once

namespace moe {

// Installs the handlers (idempotent).
void stop_signals_install();
// The first stop signal received so far, or 0.
int stop_signal_received();

}  // namespace moe
