# One fuzz CTest entry: copies the seed corpus SEEDS to WORK (a fresh folder, so the
# repository's corpus is never written), then runs FUZZER on WORK for SECONDS seconds.
# libFuzzer runs every seed first (the regress-* inputs included) and exits non-zero on a
# crash, a sanitizer report, a leak, an out-of-memory or a slow input (> 10 s); the input is
# saved beside WORK's parent as <fuzzer>-crash-<sha1> (or -leak-, -oom-, -timeout-).
#   cmake -DFUZZER=<exe> -DSEEDS=<dir> -DWORK=<dir> -DSECONDS=<n> -DSEED=<n> [-DDICT=<file>]
#         [-DLSAN_SUPP=<file>] [-DASAN=<ASAN_OPTIONS>] -P run_fuzzer.cmake
# SEED: libFuzzer's -seed; 0 draws one. A fixed seed makes a CI run's inputs the same on
# every machine (a finding replays with the same command), so a red fuzz stage is a bug to
# fix, not a draw; longer, seeded-at-random sessions are docs/FUZZING.md's.
# libFuzzer's own log goes to WORK/../<fuzzer>.log: on success only its final statistics are
# printed, on a finding the report (sanitizer, libFuzzer and target lines) and the log's last
# lines, so that the cause is in the few lines a CI summary shows.
foreach(var FUZZER SEEDS WORK SECONDS SEED)
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
set(log ${work_parent}/${name}.log)
set(args -max_total_time=${SECONDS} -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
    -seed=${SEED} -artifact_prefix=${work_parent}/${name}-)
if(DEFINED DICT)
  list(APPEND args -dict=${DICT})
endif()

# print_suppressions=0: suppressed leaks (checkpoint.lsan.supp) are expected, not news.
set(lsan "print_suppressions=0")
if(DEFINED LSAN_SUPP)
  string(APPEND lsan ":suppressions=${LSAN_SUPP}")
endif()
set(ENV{LSAN_OPTIONS} "${lsan}")
if(DEFINED ASAN)
  set(ENV{ASAN_OPTIONS} "${ASAN}")
endif()

message(STATUS "${FUZZER} ${args} ${WORK} (log: ${log})")
execute_process(COMMAND ${FUZZER} ${args} ${WORK} RESULT_VARIABLE rc OUTPUT_FILE ${log}
                ERROR_FILE ${log})
file(STRINGS ${log} lines)
if(rc EQUAL 0)
  foreach(line IN LISTS lines)
    if(line MATCHES "^(stat::|Done )")
      message(STATUS "${line}")
    endif()
  endforeach()
  return()
endif()
# The finding: every report line, then the log's tail.
foreach(line IN LISTS lines)
  if(line MATCHES "(ERROR|WARNING|SUMMARY|Test unit written|fuzz_[a-z_]+:|artifact_prefix|Seed:|#[0-9]+ 0x)")
    message("${line}")
  endif()
endforeach()
list(LENGTH lines n)
set(first 0)
if(n GREATER 40)
  math(EXPR first "${n} - 40")
endif()
message("---- last lines of ${log} ----")
if(n GREATER 0)
  math(EXPR last "${n} - 1")
  foreach(i RANGE ${first} ${last})
    list(GET lines ${i} line)
    message("${line}")
  endforeach()
endif()
message(FATAL_ERROR "${name}: libFuzzer exited with ${rc}: a finding (above; the input is "
                    "saved as ${work_parent}/${name}-*, replay: ${FUZZER} <that file>)")
