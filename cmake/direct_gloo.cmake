# Direct Gloo (src/detail/direct_gloo.cpp): collectives through Gloo's own API for latency and
# out-of-place reductions. It needs Gloo's headers (LibTorch's ProcessGroupGloo.hpp needs them
# too, so they are there wherever c10d is) and Gloo's symbols: Debian links LibTorch against a
# shared libgloo; other LibTorch builds link Gloo into libtorch_cpu. Without either, the library
# still builds and every collective goes through ProcessGroupGloo.
# Included from the top-level CMakeLists.txt right after the `accelerate` target is defined.
set(ACCELERATE_DIRECT_GLOO AUTO CACHE STRING "Talk to Gloo directly: AUTO, ON or OFF")
set_property(CACHE ACCELERATE_DIRECT_GLOO PROPERTY STRINGS AUTO ON OFF)

set(accelerate_direct_gloo_libs "")
set(accelerate_direct_gloo_ok OFF)
if(NOT ACCELERATE_DIRECT_GLOO STREQUAL "OFF")
  find_library(ACCELERATE_GLOO_LIBRARY NAMES gloo)
  set(accelerate_probe ${CMAKE_CURRENT_BINARY_DIR}/direct_gloo_probe.cpp)
  file(WRITE ${accelerate_probe}
    "#include <gloo/allreduce.h>\n#include <gloo/rendezvous/context.h>\n"
    "int main(int argc, char**) {\n"
    "  auto context = std::make_shared<gloo::rendezvous::Context>(0, 1);\n"
    "  gloo::AllreduceOptions opts(context);\n"
    "  if (argc > 5) gloo::allreduce(opts);\n  return 0;\n}\n")
  foreach(candidate IN ITEMS "${ACCELERATE_GLOO_LIBRARY}" "${TORCH_LIBRARIES}")
    if(candidate AND NOT accelerate_direct_gloo_ok)
      try_compile(accelerate_direct_gloo_links ${CMAKE_CURRENT_BINARY_DIR}/direct_gloo_probe
        SOURCES ${accelerate_probe}
        CMAKE_FLAGS "-DINCLUDE_DIRECTORIES=${TORCH_INCLUDE_DIRS}"
        LINK_LIBRARIES ${candidate}
        CXX_STANDARD 17)
      if(accelerate_direct_gloo_links)
        set(accelerate_direct_gloo_ok ON)
        if(candidate STREQUAL "${ACCELERATE_GLOO_LIBRARY}")
          set(accelerate_direct_gloo_libs ${ACCELERATE_GLOO_LIBRARY})
        endif()
      endif()
    endif()
  endforeach()
endif()

if(ACCELERATE_DIRECT_GLOO STREQUAL "ON" AND NOT accelerate_direct_gloo_ok)
  message(FATAL_ERROR "accelerate: ACCELERATE_DIRECT_GLOO=ON, but neither libgloo nor LibTorch "
    "provides Gloo's symbols (install libgloo-dev, or use AUTO)")
endif()
if(accelerate_direct_gloo_ok)
  message(STATUS "accelerate: direct Gloo collectives: on ${accelerate_direct_gloo_libs}")
  set(accelerate_direct_gloo_flag 1)
  target_link_libraries(accelerate PRIVATE ${accelerate_direct_gloo_libs})
else()
  message(STATUS "accelerate: direct Gloo collectives: off (collectives use ProcessGroupGloo)")
  set(accelerate_direct_gloo_flag 0)
endif()
# On the one file that uses it: a target-wide definition would differ from the one the shared
# precompiled header was built with, and every other target would refuse the header. That file
# needs none of torch/torch.h, so it skips the precompiled header.
set_source_files_properties(${CMAKE_CURRENT_SOURCE_DIR}/src/detail/direct_gloo.cpp PROPERTIES
  COMPILE_DEFINITIONS ACCELERATE_HAVE_DIRECT_GLOO=${accelerate_direct_gloo_flag}
  SKIP_PRECOMPILE_HEADERS ON)
