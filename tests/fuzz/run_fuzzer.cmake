# One fuzz CTest entry: copies the seed corpus SEEDS to WORK (a fresh folder, so the
# repository's corpus is never written), then runs FUZZER on WORK for SECONDS seconds.
# libFuzzer runs every seed first (the regress-* inputs included) and exits non-zero on a
# crash, a sanitizer report, a leak, an out-of-memory or a slow input (> 10 s); the input is
# saved beside WORK's parent as <fuzzer>-crash-<sha1> (or -leak-, -oom-, -timeout-).
#   cmake -DFUZZER=<exe> -DSEEDS=<dir> -DWORK=<dir> -DSECONDS=<n> [-DDICT=<file>]
#         [-DLSAN_SUPP=<file>] [-DASAN=<ASAN_OPTIONS>] -P run_fuzzer.cmake
foreach(var FUZZER SEEDS WORK SECONDS)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_fuzzer.cmake: -D${var}= is required")
  endif()
endforeach()

file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
file(GLOB seeds ${SEEDS}/*)
if(NOT seeds)
  message(FATAL_ERROR "run_fuzzer.cmake: no seed inputs in ${SEEDS}")
endif()
file(COPY ${seeds} DESTINATION ${WORK})

get_filename_component(name ${FUZZER} NAME)
get_filename_component(work_parent ${WORK} DIRECTORY)
set(args -max_total_time=${SECONDS} -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
    -artifact_prefix=${work_parent}/${name}-)
if(DEFINED DICT)
  list(APPEND args -dict=${DICT})
endif()

if(DEFINED LSAN_SUPP)
  set(ENV{LSAN_OPTIONS} "suppressions=${LSAN_SUPP}")
endif()
if(DEFINED ASAN)
  set(ENV{ASAN_OPTIONS} "${ASAN}")
endif()

message(STATUS "${FUZZER} ${args} ${WORK}")
execute_process(COMMAND ${FUZZER} ${args} ${WORK} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${name}: libFuzzer exited with ${rc}: a finding (see above; the input "
                      "is saved as ${work_parent}/${name}-*)")
endif()
