# Sanitizer builds: -DACCELERATE_SANITIZE=address,undefined (any list GCC or Clang accepts after
# -fsanitize=; ON means address,undefined). The flags go on every target defined in this project
# (the library, the `accelerate` command, tests, workers, examples, benchmarks) and nowhere else:
# LibTorch and the other dependencies are prebuilt and stay as they are. scripts/sanitize.sh
# configures such a build and runs the test suite under it.
set(ACCELERATE_SANITIZE "" CACHE STRING
  "Sanitizers for our targets, as for -fsanitize= (e.g. address,undefined); empty for none")

set(ACCELERATE_SANITIZE_FLAGS "")
if(ACCELERATE_SANITIZE)
  # Also accept a plain ON (the option used to be a boolean).
  if(ACCELERATE_SANITIZE MATCHES "^(ON|On|on|TRUE|True|true|YES|Yes|yes|1)$")
    set(ACCELERATE_SANITIZE "address,undefined")
  endif()
  if(NOT ACCELERATE_SANITIZE MATCHES "^[a-z-]+(,[a-z-]+)*$")
    message(FATAL_ERROR "ACCELERATE_SANITIZE='${ACCELERATE_SANITIZE}': expected a comma-separated "
      "list such as address,undefined")
  endif()
  set(ACCELERATE_SANITIZE_FLAGS "-fsanitize=${ACCELERATE_SANITIZE}")
  message(STATUS "accelerate: building our targets with ${ACCELERATE_SANITIZE_FLAGS}")
  # Directory scope: every target created below this point in this project, and only those.
  add_compile_options(${ACCELERATE_SANITIZE_FLAGS} -fno-omit-frame-pointer)
  # GCC's instrumentation defeats its own flow analysis: -O2 -fsanitize=address,undefined gives
  # -Wmaybe-uninitialized false positives inside libstdc++ (<regex>'s std::function states) and
  # c10::optional (LBFGSParamState setters), none of them in our code.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    add_compile_options(-Wno-maybe-uninitialized)
  endif()
  add_link_options(${ACCELERATE_SANITIZE_FLAGS})
endif()

# A sanitized static library can only be linked into a program that links the sanitizer
# runtimes: the library passes the link flag on to whoever links it (an add_subdirectory
# consumer, or one that finds an installed sanitized build).
function(accelerate_sanitize_interface target)
  if(ACCELERATE_SANITIZE_FLAGS)
    target_link_options(${target} INTERFACE ${ACCELERATE_SANITIZE_FLAGS})
  endif()
endfunction()
