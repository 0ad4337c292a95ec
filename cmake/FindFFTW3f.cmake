# Single-precision FFTW: the system library through pkg-config when it is there (SIMD build,
# e.g. Debian's libfftw3-dev), otherwise the static scalar build shipped by the
# pylib-fftw3f build requirement. Defines the imported target mltomo::fftw3f and
# MLTOMO_FFTW_SOURCE ("system" or "pylib-fftw3f"), which the extension reports.
set(MLTOMO_FFTW_SOURCE "")
option(MLTOMO_FORCE_BUNDLED_FFTW "Ignore a system FFTW and use pylib-fftw3f" OFF)

find_package(PkgConfig QUIET)
if(PkgConfig_FOUND AND NOT MLTOMO_FORCE_BUNDLED_FFTW)
  pkg_check_modules(FFTW3F QUIET IMPORTED_TARGET fftw3f)
endif()

if(FFTW3F_FOUND)
  add_library(mltomo::fftw3f INTERFACE IMPORTED)
  target_link_libraries(mltomo::fftw3f INTERFACE PkgConfig::FFTW3F)
  set(MLTOMO_FFTW_SOURCE "system")
  message(STATUS "mltomo: using system FFTW ${FFTW3F_VERSION} (${FFTW3F_LINK_LIBRARIES})")
else()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import os, pylib_fftw3f; print(os.path.dirname(pylib_fftw3f.__file__))"
    OUTPUT_VARIABLE _pylib_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_pylib_dir}/lib64/libfftw3f.a")
    message(FATAL_ERROR "mltomo: no single-precision FFTW found. Install libfftw3-dev "
                        "(apt-get install -y libfftw3-dev) or the pylib-fftw3f package.")
  endif()
  add_library(mltomo::fftw3f STATIC IMPORTED)
  set_target_properties(mltomo::fftw3f PROPERTIES
    IMPORTED_LOCATION "${_pylib_dir}/lib64/libfftw3f.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_pylib_dir}/include")
  set(MLTOMO_FFTW_SOURCE "pylib-fftw3f")
  message(STATUS "mltomo: system FFTW not found; using static scalar FFTW from ${_pylib_dir}")
endif()
