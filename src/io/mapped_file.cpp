#include "io/mapped_file.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>

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

const char* file_type_words(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory, ";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe), ";
  if (S_ISSOCK(mode)) return "a socket, ";
  if (S_ISCHR(mode) || S_ISBLK(mode)) return "a device, ";
  return "";
}

[[noreturn]] void fail_errno(const char* what, const std::filesystem::path& path, int error) {
  fail(ErrorKind::InvalidModel, what, path.string(), ": ", std::strerror(error),
       error == ELOOP ? " (a symlink loop, or a chain of symlinks too long)" : "");
}

// A descriptor of the regular file at `path`, and its size. O_NONBLOCK: opening a FIFO for
// reading would otherwise wait for a writer forever; it is then refused as not regular.
int open_regular(const std::filesystem::path& path, size_t& size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail_errno("cannot open ", path, errno);
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const int saved = errno;
    ::close(fd);
    fail_errno("cannot stat ", path, saved);
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    fail(ErrorKind::InvalidModel, path.string(), " is ", file_type_words(info.st_mode),
         "not a regular file; model files must be regular files");
  }
  size = static_cast<size_t>(info.st_size);
  return fd;
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
  const int fd = open_regular(path, size_);
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
  size_t size = 0;
  const int fd = open_regular(path, size);
  std::string text;
  char chunk[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd, chunk, sizeof chunk);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int saved = errno;
      ::close(fd);
      fail_errno("cannot read ", path, saved);
    }
    if (got == 0) break;
    text.append(chunk, static_cast<size_t>(got));
  }
  ::close(fd);
  return text;
}

std::filesystem::file_type path_type(const std::filesystem::path& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) return std::filesystem::file_type::not_found;
    fail_errno("cannot access ", path, errno);
  }
  if (S_ISREG(info.st_mode)) return std::filesystem::file_type::regular;
  if (S_ISDIR(info.st_mode)) return std::filesystem::file_type::directory;
  if (S_ISFIFO(info.st_mode)) return std::filesystem::file_type::fifo;
  if (S_ISSOCK(info.st_mode)) return std::filesystem::file_type::socket;
  if (S_ISCHR(info.st_mode)) return std::filesystem::file_type::character;
  if (S_ISBLK(info.st_mode)) return std::filesystem::file_type::block;
  return std::filesystem::file_type::unknown;
}

}  // namespace opencamp
