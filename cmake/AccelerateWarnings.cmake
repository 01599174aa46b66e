# Warning flags for our own targets only (LibTorch's headers are included as system headers
# through its imported targets, so they do not drown our diagnostics).
function(accelerate_warnings target)
  # -Wmissing-field-initializers fires on every designated initializer that leaves a field at its
  # default, which is exactly how our options structs are meant to be used.
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wno-unused-parameter
    -Wno-missing-field-initializers)
  if(ACCELERATE_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
    # GCC 12's -Warray-bounds / -Wstringop-overflow misfire on inlined std::string concatenation
    # at -O2 (GCC bugs 105329, 105651): seen here on `std::string(a) + "/" + b`. They stay
    # warnings, not errors, so real ones are still printed.
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12)
      target_compile_options(${target} PRIVATE -Wno-error=array-bounds
        -Wno-error=stringop-overflow)
    endif()
  endif()
endfunction()
