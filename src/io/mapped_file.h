// A read-only memory mapping of a whole file, and the checked file-system queries the loaders
// use. Only regular files are opened (a FIFO or device would block or never end), and every
// failure is an Error(InvalidModel) naming the path, never a std::filesystem exception.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace opencamp {

class MappedFile {
 public:
  // Throws Error(InvalidModel) naming the file when it cannot be opened or mapped, or is not a
  // regular file.
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const unsigned char* data_ = nullptr;
  size_t size_ = 0;
};

// Drops this process's pages of [data, data + bytes) where that range lies inside a live
// MappedFile (whole pages only; anything else is left alone), so that weights copied out of a
// mapping stop counting twice in resident memory while a model loads. Reading the range again
// later is still correct: the pages fault back in from the file.
void release_file_pages(const void* data, size_t bytes);

// The whole file as text; throws Error(InvalidModel) naming the file when unreadable or not a
// regular file.
std::string read_text_file(const std::filesystem::path& path);

// What is at `path` (following symlinks): not_found when nothing is (or a parent is not a
// directory); throws Error(InvalidModel) naming the path for anything else the system refuses
// (a symlink loop, no permission), where std::filesystem would throw its own exception.
std::filesystem::file_type path_type(const std::filesystem::path& path);
inline bool path_exists(const std::filesystem::path& path) {
  return path_type(path) != std::filesystem::file_type::not_found;
}
inline bool is_directory_path(const std::filesystem::path& path) {
  return path_type(path) == std::filesystem::file_type::directory;
}
inline bool is_regular_path(const std::filesystem::path& path) {
  return path_type(path) == std::filesystem::file_type::regular;
}

}  // namespace opencamp
