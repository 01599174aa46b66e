# Tests that another CMake project can use accelerate-cpp, both ways the README describes
# (fmt's model): included from tests/CMakeLists.txt.
#   consumer.package       installs this build into a scratch prefix and builds tests/consumer/
#                          against it with find_package(accelerate) (~40 s: one file against
#                          LibTorch).
#   consumer.subdirectory  builds tests/consumer/ with add_subdirectory(<this source tree>): the
#                          library again, in its own build directory (minutes on a clean tree,
#                          incremental after that). Label `subproject`: `ctest -LE subproject`
#                          leaves it out.
#   consumer.no_tools      configures this source tree with ACCELERATE_BUILD_TOOLS=OFF and CLI11 /
#                          yaml-cpp made unfindable: the library alone does not need them.
set(ACCELERATE_CONSUMER_SCRIPT ${CMAKE_CURRENT_LIST_DIR}/run.sh)
# The consumer is built with the same generator, compiler and build type as this build.
set(ACCELERATE_CONSUMER_ENV "CONSUMER_GENERATOR=${CMAKE_GENERATOR}"
  "CONSUMER_CXX_COMPILER=${CMAKE_CXX_COMPILER}" "CONSUMER_BUILD_TYPE=${CMAKE_BUILD_TYPE}")

add_test(NAME consumer.package
  COMMAND ${ACCELERATE_CONSUMER_SCRIPT} package ${PROJECT_BINARY_DIR}
          ${CMAKE_CURRENT_BINARY_DIR}/consumer-package)
add_test(NAME consumer.subdirectory
  COMMAND ${ACCELERATE_CONSUMER_SCRIPT} subdirectory ${PROJECT_SOURCE_DIR}
          ${CMAKE_CURRENT_BINARY_DIR}/consumer-subdirectory)
add_test(NAME consumer.no_tools
  COMMAND ${ACCELERATE_CONSUMER_SCRIPT} no-tools ${PROJECT_SOURCE_DIR}
          ${CMAKE_CURRENT_BINARY_DIR}/consumer-no-tools)
set_tests_properties(consumer.no_tools PROPERTIES LABELS consumer TIMEOUT 300
  ENVIRONMENT "${ACCELERATE_CONSUMER_ENV}")
set_tests_properties(consumer.package PROPERTIES LABELS consumer TIMEOUT 900
  ENVIRONMENT "${ACCELERATE_CONSUMER_ENV}")
set_tests_properties(consumer.subdirectory PROPERTIES LABELS "consumer;subproject" TIMEOUT 2400
  ENVIRONMENT "${ACCELERATE_CONSUMER_ENV}")
