// A read-only memory mapping of a whole file.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace opencamp {

class MappedFile {
 public:
  // Throws Error(InvalidModel) naming the file when it cannot be opened or mapped.
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

// The whole file as text; throws Error(InvalidModel) naming the file when unreadable.
std::string read_text_file(const std::filesystem::path& path);

}  // namespace opencamp
