# `cmake --install` puts the public headers, the library and opencampConfig.cmake in place so a
# consumer project can `find_package(opencamp)` and link `opencamp::opencamp`.
include(CMakePackageConfigHelpers)

install(TARGETS opencamp EXPORT opencampTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY include/opencamp DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/include/opencamp/version.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/opencamp)
install(EXPORT opencampTargets NAMESPACE opencamp::
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/opencamp)

configure_package_config_file(cmake/opencampConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/opencampConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/opencamp)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/opencampConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/opencampConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/opencampConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/opencamp)

if(OPENCAMP_BUILD_APPS)
  install(TARGETS opencamp-run RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
