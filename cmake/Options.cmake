# Build options. A plain `cmake -S . -B build` builds the library, the apps and the C++ tests.
include(GNUInstallDirs)

option(OPENCAMP_BUILD_TESTS "Build the C++ tests (ctest)" ON)
option(OPENCAMP_BUILD_APPS "Build the C++ programs in apps/" ON)
option(OPENCAMP_PYTHON "Build the Python extension opencamp._core" OFF)
option(OPENCAMP_INSTALL "Install headers, library and the CMake package" ON)
option(OPENCAMP_WERROR "Treat compiler warnings as errors" OFF)
option(OPENCAMP_SANITIZE "Build with AddressSanitizer and UndefinedBehaviorSanitizer" OFF)

if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()
