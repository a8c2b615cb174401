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

// The whole file as text; throws Error(InvalidModel) naming the file when unreadable.
std::string read_text_file(const std::filesystem::path& path);

}  // namespace opencamp
