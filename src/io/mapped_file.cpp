#include "io/mapped_file.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "opencamp/error.h"

namespace opencamp {
namespace {

// Live mappings by start address: release_file_pages only ever advises pages of a file mapping
// (MADV_DONTNEED on anonymous memory would zero it).
std::mutex mappings_mutex;
std::map<const unsigned char*, size_t>& live_mappings() {
  static std::map<const unsigned char*, size_t> mappings;
  return mappings;
}

}  // namespace

void release_file_pages(const void* data, size_t bytes) {
  const auto* begin = static_cast<const unsigned char*>(data);
  {
    std::lock_guard<std::mutex> lock(mappings_mutex);
    const auto& mappings = live_mappings();
    auto it = mappings.upper_bound(begin);
    if (it == mappings.begin()) return;
    --it;
    if (begin + bytes > it->first + it->second) return;  // not (wholly) inside this mapping
  }
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t first = (reinterpret_cast<uintptr_t>(begin) + page - 1) / page * page;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(begin) + bytes) / page * page;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

MappedFile::MappedFile(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fail(ErrorKind::InvalidModel, "cannot open ", path.string(), ": ", std::strerror(errno));
  }
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    fail(ErrorKind::InvalidModel, path.string(), " is not a regular file");
  }
  size_ = static_cast<size_t>(info.st_size);
  if (size_ > 0) {
    void* mapping = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapping == MAP_FAILED) {
      const int saved = errno;
      ::close(fd);
      fail(ErrorKind::InvalidModel, "cannot map ", path.string(), ": ", std::strerror(saved));
    }
    data_ = static_cast<const unsigned char*>(mapping);
    std::lock_guard<std::mutex> lock(mappings_mutex);
    live_mappings()[data_] = size_;
  }
  ::close(fd);  // the mapping keeps the file alive
}

MappedFile::~MappedFile() {
  if (data_ == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(mappings_mutex);
    live_mappings().erase(data_);
  }
  ::munmap(const_cast<unsigned char*>(data_), size_);
}

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ErrorKind::InvalidModel, "cannot read ", path.string());
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace opencamp
