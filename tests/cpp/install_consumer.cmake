# ctest install_consumer: `cmake --install` this build tree into a fresh prefix, then configure,
# build and run tests/consumer against that prefix with find_package(opencamp). Fails with
# FATAL_ERROR at the first step that does not succeed.
#
#   cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DWORK_DIR=... [-DGENERATOR=Ninja] [-DMAKE_PROGRAM=...]
#         [-DCXX_COMPILER=...] [-DBUILD_TYPE=Release] -P install_consumer.cmake

foreach(required BUILD_DIR SOURCE_DIR WORK_DIR)
  if(NOT ${required})
    message(FATAL_ERROR "install_consumer.cmake needs -D${required}=...")
  endif()
endforeach()

# The greedy continuation of tests/fixtures/tiny-llama (reference.safetensors: greedy_tokens[:4]).
set(EXPECTED_TOKENS "204 173 204 173")

set(prefix "${WORK_DIR}/prefix")
set(consumer_build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run_step name)
  execute_process(COMMAND ${ARGN}
    RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "install_consumer: step '${name}' failed (${result}):\n  ${ARGN}\n${output}")
  endif()
  message(STATUS "install_consumer: ${name}: ok")
  set(step_output "${output}" PARENT_SCOPE)
endfunction()

set(config_args)
if(BUILD_TYPE)
  set(config_args --config "${BUILD_TYPE}")
endif()

# 1. install
run_step(install "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}" ${config_args})
if(NOT EXISTS "${prefix}/include/opencamp/opencamp.h" OR NOT EXISTS "${prefix}/include/opencamp/version.h")
  message(FATAL_ERROR "install_consumer: headers missing under ${prefix}/include/opencamp")
endif()
file(GLOB_RECURSE package_config "${prefix}/*/opencampConfig.cmake")
if(NOT package_config)
  message(FATAL_ERROR "install_consumer: no opencampConfig.cmake under ${prefix}")
endif()

# 2. configure the consumer against the prefix only (no package registry, same toolchain)
set(configure_args -S "${SOURCE_DIR}/tests/consumer" -B "${consumer_build}"
  "-DCMAKE_PREFIX_PATH=${prefix}"
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
if(GENERATOR)
  list(APPEND configure_args -G "${GENERATOR}")
endif()
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(BUILD_TYPE)
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}")
endif()
run_step(configure "${CMAKE_COMMAND}" ${configure_args})
file(STRINGS "${consumer_build}/CMakeCache.txt" found_dir REGEX "^opencamp_DIR:")
string(FIND "${found_dir}" "${prefix}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "install_consumer: the consumer found opencamp outside the prefix: ${found_dir}")
endif()

# 3. build
run_step(build "${CMAKE_COMMAND}" --build "${consumer_build}" ${config_args})
file(GLOB_RECURSE consumer_exe "${consumer_build}/opencamp_consumer" "${consumer_build}/opencamp_consumer.exe")
if(NOT consumer_exe)
  message(FATAL_ERROR "install_consumer: opencamp_consumer was not built in ${consumer_build}")
endif()
list(GET consumer_exe 0 consumer_exe)

# 4. run on the tiny llama fixture
run_step(run "${consumer_exe}" "${SOURCE_DIR}/tests/fixtures/tiny-llama")
message(STATUS "install_consumer: consumer printed:\n${step_output}")
string(FIND "${step_output}" "tokens: ${EXPECTED_TOKENS}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "install_consumer: expected 'tokens: ${EXPECTED_TOKENS}' in the output:\n${step_output}")
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
message(STATUS "install_consumer: passed")
