# Experiment tracking: the TensorBoard writer encodes TensorBoard's Event messages with protobuf.
# Included from the top-level CMakeLists.txt right after the `accelerate` target is defined.
#
# protobuf stays a private dependency (no protobuf type appears in a public header), but the
# library is static, so an installed package must still find it: its config file needs
# find_dependency(Protobuf).
find_package(Protobuf REQUIRED)

set(ACCELERATE_PROTO_SOURCE ${CMAKE_CURRENT_LIST_DIR}/../proto/tensorboard_event.proto)
get_filename_component(ACCELERATE_PROTO_SOURCE ${ACCELERATE_PROTO_SOURCE} ABSOLUTE)
get_filename_component(ACCELERATE_PROTO_DIR ${ACCELERATE_PROTO_SOURCE} DIRECTORY)
set(ACCELERATE_PROTO_OUT ${CMAKE_CURRENT_BINARY_DIR}/generated)
file(MAKE_DIRECTORY ${ACCELERATE_PROTO_OUT})

protobuf_generate(TARGET accelerate LANGUAGE cpp OUT_VAR ACCELERATE_PROTO_GENERATED
  PROTOS ${ACCELERATE_PROTO_SOURCE} IMPORT_DIRS ${ACCELERATE_PROTO_DIR}
  PROTOC_OUT_DIR ${ACCELERATE_PROTO_OUT})
# Generated code is not ours to keep warning-free, and needs none of LibTorch's headers.
set_source_files_properties(${ACCELERATE_PROTO_GENERATED} PROPERTIES
  SKIP_PRECOMPILE_HEADERS ON COMPILE_OPTIONS "-w")
# Sources include "proto/tensorboard_event.pb.h". SYSTEM: the generated header's own warnings
# stay out of src/tracking.cpp's.
target_include_directories(accelerate SYSTEM PRIVATE ${ACCELERATE_PROTO_OUT}
  ${Protobuf_INCLUDE_DIRS})
# The messages are declared LITE_RUNTIME: the lite library is all they need.
target_link_libraries(accelerate PRIVATE protobuf::libprotobuf-lite)

# The tests read our event files back with Python's protobuf, from a module generated from the
# same .proto (tests/tracking.cmake points the tests at it).
if(ACCELERATE_BUILD_TESTS)
  set(ACCELERATE_TRACKING_PYTHONPATH ${CMAKE_CURRENT_BINARY_DIR}/generated/python)
  add_custom_command(
    OUTPUT ${ACCELERATE_TRACKING_PYTHONPATH}/tensorboard_event_pb2.py
    COMMAND ${CMAKE_COMMAND} -E make_directory ${ACCELERATE_TRACKING_PYTHONPATH}
    COMMAND protobuf::protoc --proto_path=${ACCELERATE_PROTO_DIR}
            --python_out=${ACCELERATE_TRACKING_PYTHONPATH} ${ACCELERATE_PROTO_SOURCE}
    DEPENDS ${ACCELERATE_PROTO_SOURCE} protobuf::protoc
    COMMENT "Generating the Python module for tensorboard_event.proto"
    VERBATIM)
  add_custom_target(accelerate_tracking_python
    DEPENDS ${ACCELERATE_TRACKING_PYTHONPATH}/tensorboard_event_pb2.py)
endif()
