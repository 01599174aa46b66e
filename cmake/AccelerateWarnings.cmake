# Warning flags for our own targets only (LibTorch's headers are included as system headers
# through its imported targets, so they do not drown our diagnostics).
function(accelerate_warnings target)
  # -Wmissing-field-initializers fires on every designated initializer that leaves a field at its
  # default, which is exactly how our options structs are meant to be used.
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wno-unused-parameter
    -Wno-missing-field-initializers)
  if(ACCELERATE_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
