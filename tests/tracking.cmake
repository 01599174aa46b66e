# Points the tracking tests at the independent TensorBoard reader (tools/read_tfevents.py) and at
# the Python module cmake/tracking.cmake generates from proto/tensorboard_event.proto.
# Included at the end of tests/CMakeLists.txt.
if(TARGET accelerate_unit_tests AND TARGET accelerate_tracking_python)
  add_dependencies(accelerate_unit_tests accelerate_tracking_python)
  target_compile_definitions(accelerate_unit_tests PRIVATE
    ACCELERATE_READ_TFEVENTS="${CMAKE_CURRENT_LIST_DIR}/tools/read_tfevents.py"
    ACCELERATE_TRACKING_PYTHONPATH="${ACCELERATE_TRACKING_PYTHONPATH}"
    ACCELERATE_PYTHON3="/usr/bin/python3")
endif()
