# Runs a program (the nestcache binary, a check script) and checks its exit status and output.
#
#   cmake -DEXE=<program> "-DARGS=selftest memslots --json" -DEXIT=0
#         [-DMATCH1=<regex>] ... [-DMATCH9=<regex>] -P run_and_check.cmake
#
# EXIT is the exact expected status, or "nonzero". Each MATCHn must match the
# combined stdout and stderr. CTest alone cannot check both a status and the
# output of one run (PASS_REGULAR_EXPRESSION ignores the status, WILL_FAIL
# inverts the regex's verdict too), hence this script.
separate_arguments(args UNIX_COMMAND "${ARGS}")
execute_process(COMMAND "${EXE}" ${args}
                RESULT_VARIABLE status
                OUTPUT_VARIABLE out
                ERROR_VARIABLE err)
set(all "${out}${err}")
set(problems "")
if(EXIT STREQUAL "nonzero")
  if(status EQUAL 0)
    string(APPEND problems "expected a non-zero exit status, got 0\n")
  endif()
elseif(NOT status STREQUAL "${EXIT}")
  string(APPEND problems "expected exit status ${EXIT}, got ${status}\n")
endif()
foreach(n RANGE 1 9)
  if(DEFINED MATCH${n} AND NOT all MATCHES "${MATCH${n}}")
    string(APPEND problems "output does not match: ${MATCH${n}}\n")
  endif()
endforeach()
if(problems)
  message(FATAL_ERROR "${EXE} ${ARGS}\n${problems}--- output ---\n${all}")
endif()
message(STATUS "${EXE} ${ARGS}: exit ${status}, output as expected")
