# Warnings every target of ours gets; -Wall -Wextra clean is a house rule.
function(opencamp_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra)
    # GCC's alone: clang does not know -Wshadow=local (an error under -Werror).
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      target_compile_options(${target} PRIVATE -Wshadow=local)
    endif()
    if(OPENCAMP_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  elseif(MSVC)
    target_compile_options(${target} PRIVATE /W4)
  endif()
endfunction()

if(OPENCAMP_SANITIZE AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer)
  add_link_options(-fsanitize=address,undefined)
endif()

# A sanitized library needs its consumers to link the sanitizer runtimes too.
function(opencamp_sanitizer_usage target)
  if(OPENCAMP_SANITIZE AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_link_options(${target} INTERFACE -fsanitize=address,undefined)
  endif()
endfunction()
