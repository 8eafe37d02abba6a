#include "engine/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <limits>
#include <set>
#include <tuple>

#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

using nlohmann::json;

constexpr uint64_t kLengthFieldBytes = 8;
// Bounds what a hostile or corrupt length field can make us parse; real headers are kilobytes.
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
constexpr char kMetadataKey[] = "__metadata__";
constexpr char kSingleFileName[] = "model.safetensors";
constexpr char kIndexFileName[] = "model.safetensors.index.json";

struct DtypeInfo {
  const char* name;  // as spelled in the header
  at::ScalarType type;
};
constexpr DtypeInfo kDtypes[] = {
    {"F32", at::kFloat},
    {"F16", at::kHalf},
    {"BF16", at::kBFloat16},
};

const DtypeInfo* DtypeByName(const std::string& name) {
  for (const DtypeInfo& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

const DtypeInfo* DtypeByType(at::ScalarType type) {
  for (const DtypeInfo& d : kDtypes) {
    if (type == d.type) return &d;
  }
  return nullptr;
}

// Names come from untrusted files: escape control bytes and cap the length so an error message
// stays one readable line.
std::string Escaped(absl::string_view text) {
  constexpr size_t kMaxShown = 200;
  std::string shown = absl::Utf8SafeCHexEscape(text.substr(0, kMaxShown));
  if (text.size() > kMaxShown) shown += "...";
  return shown;
}

std::string Quote(absl::string_view name) { return absl::StrCat("'", Escaped(name), "'"); }

// A file whose bytes do not form a valid safetensors file.
absl::Status Corrupt(const std::string& path, absl::string_view what) {
  return absl::DataLossError(absl::StrCat("safetensors file ", path, ": ", what));
}

// Adds context in front of a status message while keeping its code.
absl::Status Prefixed(absl::string_view prefix, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Closes a file descriptor on every return path.
class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd() { Reset(); }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  int get() const { return fd_; }
  // close() can report a failed write-back (e.g. on NFS), so writers check its result.
  int Reset() {
    int rc = 0;
    if (fd_ >= 0) rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

absl::Status WriteAll(int fd, const void* data, size_t size, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("writing ", path));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Writes via `path`.tmp, fsync and rename: a crash or error leaves either the old file or the
// complete new one under `path`, never a prefix of it.
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::function<absl::Status(int fd)>& write_body) {
  const std::string tmp = path + ".tmp";
  ScopedFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) return absl::ErrnoToStatus(errno, absl::StrCat("creating ", tmp));
  absl::Status status = write_body(fd.get());
  if (status.ok() && ::fsync(fd.get()) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("syncing ", tmp));
  }
  if (fd.Reset() != 0 && status.ok()) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("closing ", tmp));
  }
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("renaming ", tmp, " to ", path));
  }
  if (!status.ok()) ::unlink(tmp.c_str());
  return status;
}

bool PathExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes) {
  ScopedFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path));
  std::string contents;
  char buffer[1 << 16];
  while (true) {
    ssize_t n = ::read(fd.get(), buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("reading ", path));
    }
    if (n == 0) break;
    contents.append(buffer, static_cast<size_t>(n));
    if (contents.size() > max_bytes) {
      return absl::DataLossError(
          absl::StrCat(path, " is larger than the ", max_bytes, "-byte limit"));
    }
  }
  return contents;
}

// The checks shared by both writers: everything that would make a file unreadable or
// ambiguous is refused before any byte is written.
absl::Status ValidateTensorsToWrite(
    const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::set<std::string> seen;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, tensor] = tensors[i];
    if (name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor #", i, " has an empty name"));
    }
    if (name == kMetadataKey) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor name ", kMetadataKey, " is reserved for file metadata"));
    }
    if (!seen.insert(name).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor name ", Quote(name), " repeats"));
    }
    if (!tensor.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", Quote(name), " is undefined"));
    }
    if (tensor.layout() != at::kStrided) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", Quote(name), " is not dense (layout ",
                       c10::str(tensor.layout()), ")"));
    }
    if (DtypeByType(tensor.scalar_type()) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", Quote(name), " has dtype ", c10::toString(tensor.scalar_type()),
                       "; supported: float32, float16, bfloat16"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// SafetensorsFile

struct SafetensorsFile::Mapping {
  Mapping(const uint8_t* data, size_t size) : data(data), size(size) {}
  ~Mapping() { ::munmap(const_cast<uint8_t*>(data), size); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  const uint8_t* data;
  size_t size;
};

SafetensorsFile::SafetensorsFile(std::string path, std::shared_ptr<const Mapping> mapping,
                                 uint64_t data_start, std::map<std::string, Entry> entries,
                                 std::map<std::string, std::string> metadata)
    : path_(std::move(path)),
      mapping_(std::move(mapping)),
      data_start_(data_start),
      entries_(std::move(entries)),
      metadata_(std::move(metadata)) {}

SafetensorsFile::~SafetensorsFile() = default;

namespace {

// Parses and validates one header entry against the data buffer's size.
absl::StatusOr<SafetensorsFile::Entry> ParseEntry(const std::string& path,
                                                  const std::string& name, const json& value,
                                                  uint64_t buffer_size) {
  const auto error = [&path](absl::string_view what) { return Corrupt(path, what); };
  const std::string tensor = absl::StrCat("tensor ", Quote(name));
  if (!value.is_object()) return error(absl::StrCat(tensor, " is not a JSON object"));

  auto dtype_it = value.find("dtype");
  if (dtype_it == value.end() || !dtype_it->is_string()) {
    return error(absl::StrCat(tensor, " has no \"dtype\" string"));
  }
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  const DtypeInfo* dtype = DtypeByName(dtype_name);
  if (dtype == nullptr) {
    // A well-formed file we choose not to serve, not a damaged one: INVALID_ARGUMENT.
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors file ", path, ": ", tensor, " has unsupported dtype ",
                     Escaped(dtype_name), "; supported: F32, F16, BF16"));
  }

  auto shape_it = value.find("shape");
  if (shape_it == value.end() || !shape_it->is_array()) {
    return error(absl::StrCat(tensor, " has no \"shape\" array"));
  }
  SafetensorsFile::Entry entry;
  entry.dtype = dtype->type;
  for (const json& dim : *shape_it) {
    if (dim.is_number_unsigned()) {
      uint64_t d = dim.get<uint64_t>();
      if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return error(absl::StrCat(tensor, " has dimension ", d, " too large for int64"));
      }
      entry.shape.push_back(static_cast<int64_t>(d));
    } else if (dim.is_number_integer()) {  // nlohmann stores only negative integers as signed
      return error(absl::StrCat(tensor, " has negative dimension ", dim.get<int64_t>(),
                                " in its shape"));
    } else {
      return error(absl::StrCat(tensor, " has a non-integer dimension in its shape"));
    }
  }

  auto offsets_it = value.find("data_offsets");
  if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
    return error(absl::StrCat(tensor,
                              " needs \"data_offsets\" as two non-negative integers [begin, end]"));
  }
  entry.begin = (*offsets_it)[0].get<uint64_t>();
  entry.end = (*offsets_it)[1].get<uint64_t>();
  if (entry.begin > entry.end) {
    return error(absl::StrCat(tensor, " has data_offsets [", entry.begin, ", ", entry.end,
                              "] with begin after end"));
  }
  if (entry.end > buffer_size) {
    return error(absl::StrCat(tensor, " has data_offsets [", entry.begin, ", ", entry.end,
                              "] beyond the end of the ", buffer_size,
                              "-byte data buffer (truncated file?)"));
  }

  // numel * itemsize in overflow-checked steps; a zero dimension makes the product zero however
  // large the others are, so it is settled first.
  const uint64_t kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  uint64_t nbytes = static_cast<uint64_t>(c10::elementSize(dtype->type));
  if (std::find(entry.shape.begin(), entry.shape.end(), 0) != entry.shape.end()) {
    nbytes = 0;
  } else {
    for (int64_t d : entry.shape) {
      if (nbytes > kMax / static_cast<uint64_t>(d)) {
        return error(absl::StrCat(tensor, " has shape ", ShapeString(entry.shape),
                                  " whose byte size overflows int64"));
      }
      nbytes *= static_cast<uint64_t>(d);
    }
  }
  if (entry.end - entry.begin != nbytes) {
    return error(absl::StrCat(tensor, " has data_offsets [", entry.begin, ", ", entry.end,
                              "] spanning ", entry.end - entry.begin, " bytes, but ", dtype_name,
                              " shape ", ShapeString(entry.shape), " needs ", nbytes));
  }
  return entry;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const auto error = [&path](absl::string_view what) { return Corrupt(path, what); };

  ScopedFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open safetensors file ", path));
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot stat safetensors file ", path));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("safetensors file ", path, " is not a regular file"));
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < kLengthFieldBytes) {
    return error(absl::StrCat("file is ", file_size, " bytes, shorter than the ",
                              kLengthFieldBytes, "-byte header length field (truncated file?)"));
  }

  void* addr = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (addr == MAP_FAILED) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot mmap safetensors file ", path));
  }
  // The mapping outlives the descriptor; from here on it is unmapped by whoever drops it last.
  auto mapping = std::make_shared<const Mapping>(static_cast<const uint8_t*>(addr), file_size);
  fd.Reset();

  uint64_t header_size = 0;
  for (int i = kLengthFieldBytes - 1; i >= 0; --i) {
    header_size = (header_size << 8) | mapping->data[i];
  }
  if (header_size > kMaxHeaderBytes) {
    return error(absl::StrCat("header length ", header_size, " exceeds the ", kMaxHeaderBytes,
                              "-byte limit (corrupt length field?)"));
  }
  if (header_size > file_size - kLengthFieldBytes) {
    return error(absl::StrCat("header length ", header_size, " exceeds the ",
                              file_size - kLengthFieldBytes,
                              " bytes that follow the length field (truncated file?)"));
  }
  const uint64_t data_start = kLengthFieldBytes + header_size;
  const uint64_t buffer_size = file_size - data_start;

  json root;
  try {
    const char* header = reinterpret_cast<const char*>(mapping->data + kLengthFieldBytes);
    root = json::parse(header, header + header_size);
  } catch (const json::exception& e) {
    return error(absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!root.is_object()) return error("header is not a JSON object");

  std::map<std::string, Entry> entries;
  std::map<std::string, std::string> metadata;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == kMetadataKey) {
      if (!it.value().is_object()) return error("__metadata__ is not a JSON object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string()) {
          return error(absl::StrCat("__metadata__ value for ", Quote(m.key()),
                                    " is not a string"));
        }
        metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (it.key().empty()) return error("a tensor has an empty name");
    ASSIGN_OR_RETURN(Entry entry, ParseEntry(path, it.key(), it.value(), buffer_size));
    entries.emplace(it.key(), std::move(entry));
  }

  // No writer lays two tensors over the same bytes; an overlap means the header was damaged, and
  // accepting it would silently give two weights the same values.
  std::vector<std::tuple<uint64_t, uint64_t, const std::string*>> spans;
  for (const auto& [name, entry] : entries) {
    if (entry.end > entry.begin) spans.emplace_back(entry.begin, entry.end, &name);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    const auto& [prev_begin, prev_end, prev_name] = spans[i - 1];
    const auto& [begin, end, name] = spans[i];
    if (begin < prev_end) {
      return error(absl::StrCat("tensors ", Quote(*prev_name), " [", prev_begin, ", ", prev_end,
                                ") and ", Quote(*name), " [", begin, ", ", end, ") overlap"));
    }
  }

  return std::unique_ptr<SafetensorsFile>(new SafetensorsFile(
      path, std::move(mapping), data_start, std::move(entries), std::move(metadata)));
}

absl::StatusOr<at::Tensor> SafetensorsFile::Tensor(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(
        absl::StrCat("safetensors file ", path_, " has no tensor ", Quote(name)));
  }
  const Entry& entry = it->second;
  const at::TensorOptions options = at::TensorOptions().dtype(entry.dtype).device(at::kCPU);
  const uint8_t* bytes = mapping_->data + data_start_ + entry.begin;
  const size_t nbytes = entry.end - entry.begin;

  // An empty tensor has no bytes to view (its offset may even be the end of the mapping).
  if (nbytes == 0) return at::empty(entry.shape, options);
  // Kernels may assume element alignment, which a file from another writer need not give us.
  if (reinterpret_cast<uintptr_t>(bytes) % c10::elementSize(entry.dtype) != 0) {
    at::Tensor copy = at::empty(entry.shape, options);
    std::memcpy(copy.data_ptr(), bytes, nbytes);
    return copy;
  }
  // The deleter owns a reference to the mapping, so the view keeps it mapped after this object
  // (and the CheckpointTensors holding it) are gone.
  std::shared_ptr<const Mapping> keep_mapped = mapping_;
  return at::from_blob(
      const_cast<uint8_t*>(bytes), entry.shape, [keep_mapped](void*) { (void)keep_mapped; },
      options);
}

// ------------------------------------------------------------------------------------------------
// CheckpointTensors

CheckpointTensors::CheckpointTensors(std::vector<std::unique_ptr<SafetensorsFile>> files,
                                     std::map<std::string, const SafetensorsFile*> file_of)
    : files_(std::move(files)), file_of_(std::move(file_of)) {}

absl::StatusOr<std::unique_ptr<CheckpointTensors>> CheckpointTensors::Open(
    const std::string& model_dir) {
  const std::string single_path = absl::StrCat(model_dir, "/", kSingleFileName);
  const std::string index_path = absl::StrCat(model_dir, "/", kIndexFileName);
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, const SafetensorsFile*> file_of;

  // Hugging Face's loader prefers the single file when both exist; so do we.
  if (PathExists(single_path)) {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(single_path));
    for (const auto& entry : file->entries()) file_of.emplace(entry.first, file.get());
    files.push_back(std::move(file));
    return std::unique_ptr<CheckpointTensors>(
        new CheckpointTensors(std::move(files), std::move(file_of)));
  }
  if (!PathExists(index_path)) {
    return absl::NotFoundError(absl::StrCat(
        "checkpoint directory ", model_dir, PathExists(model_dir) ? "" : " (which does not exist)",
        " has neither ", kSingleFileName, " nor ", kIndexFileName));
  }

  const auto error = [&index_path](absl::string_view what) {
    return absl::DataLossError(absl::StrCat("checkpoint index ", index_path, ": ", what));
  };
  ASSIGN_OR_RETURN(std::string index_text, ReadSmallFile(index_path, kMaxHeaderBytes));
  json index;
  try {
    index = json::parse(index_text);
  } catch (const json::exception& e) {
    return error(absl::StrCat("not valid JSON: ", e.what()));
  }
  if (!index.is_object()) return error("not a JSON object");
  auto weight_map = index.find("weight_map");
  if (weight_map == index.end() || !weight_map->is_object()) {
    return error("has no \"weight_map\" object");
  }

  std::map<std::string, SafetensorsFile*> shards;  // shard file name -> opened shard
  for (auto it = weight_map->begin(); it != weight_map->end(); ++it) {
    const std::string& tensor = it.key();
    if (!it.value().is_string()) {
      return error(absl::StrCat("shard for tensor ", Quote(tensor), " is not a string"));
    }
    const std::string& shard = it.value().get_ref<const std::string&>();
    // Shards must sit in the checkpoint directory: a name that could climb out of it (or that a
    // NUL would silently shorten) is refused rather than opened.
    if (shard.empty() || shard.find('/') != std::string::npos ||
        shard.find("..") != std::string::npos || shard.find('\0') != std::string::npos) {
      return error(absl::StrCat("tensor ", Quote(tensor), " points at shard ", Quote(shard),
                                ", which is not a plain file name in the checkpoint directory"));
    }
    auto shard_it = shards.find(shard);
    if (shard_it == shards.end()) {
      auto opened = SafetensorsFile::Open(absl::StrCat(model_dir, "/", shard));
      if (!opened.ok()) {
        return Prefixed(absl::StrCat("checkpoint index ", index_path, " maps tensor ",
                                     Quote(tensor), " to shard ", Quote(shard), ": "),
                        opened.status());
      }
      files.push_back(std::move(opened).value());
      shard_it = shards.emplace(shard, files.back().get()).first;
    }
    if (shard_it->second->entries().count(tensor) == 0) {
      return error(absl::StrCat("maps tensor ", Quote(tensor), " to shard ", Quote(shard),
                                ", which has no such tensor"));
    }
    file_of.emplace(tensor, shard_it->second);
  }
  return std::unique_ptr<CheckpointTensors>(
      new CheckpointTensors(std::move(files), std::move(file_of)));
}

std::vector<std::string> CheckpointTensors::Names() const {
  std::vector<std::string> names;
  names.reserve(file_of_.size());
  for (const auto& entry : file_of_) names.push_back(entry.first);  // std::map: already sorted
  return names;
}

absl::StatusOr<std::vector<int64_t>> CheckpointTensors::Shape(const std::string& name) const {
  auto it = file_of_.find(name);
  if (it == file_of_.end()) {
    return absl::NotFoundError(absl::StrCat("checkpoint has no tensor ", Quote(name)));
  }
  return it->second->entries().at(name).shape;
}

absl::StatusOr<at::Tensor> CheckpointTensors::Tensor(const std::string& name) const {
  auto it = file_of_.find(name);
  if (it == file_of_.end()) {
    return absl::NotFoundError(absl::StrCat("checkpoint has no tensor ", Quote(name)));
  }
  return it->second->Tensor(name);
}

// ------------------------------------------------------------------------------------------------
// Writers

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  RETURN_IF_ERROR(ValidateTensorsToWrite(tensors));

  // ordered_json keeps the header in the order the data is laid out, which makes files easy to
  // inspect by eye; readers do not depend on it.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    contiguous.push_back(tensor.to(at::kCPU).contiguous());
    const at::Tensor& t = contiguous.back();
    const uint64_t nbytes = t.nbytes();
    header[name] = {
        {"dtype", DtypeByType(t.scalar_type())->name},
        {"shape", t.sizes().vec()},
        {"data_offsets", {offset, offset + nbytes}},
    };
    offset += nbytes;
  }

  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    // dump() refuses strings that are not UTF-8, which the format requires.
    return absl::InvalidArgumentError(
        absl::StrCat("tensor names and metadata must be UTF-8: ", e.what()));
  }
  // Spaces are JSON whitespace: padding here puts the data buffer, and so every float32 tensor
  // that follows only 4-byte multiples, on an aligned address once mapped.
  while ((kLengthFieldBytes + header_text.size()) % 8 != 0) header_text.push_back(' ');
  if (header_text.size() > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("header would be ", header_text.size(),
                                                   " bytes, over the reader's ",
                                                   kMaxHeaderBytes, "-byte limit"));
  }
  uint8_t length_field[kLengthFieldBytes];
  for (uint64_t i = 0, n = header_text.size(); i < kLengthFieldBytes; ++i, n >>= 8) {
    length_field[i] = static_cast<uint8_t>(n & 0xff);
  }

  return WriteFileAtomically(path, [&](int fd) -> absl::Status {
    RETURN_IF_ERROR(WriteAll(fd, length_field, sizeof(length_field), path));
    RETURN_IF_ERROR(WriteAll(fd, header_text.data(), header_text.size(), path));
    for (const at::Tensor& t : contiguous) {
      RETURN_IF_ERROR(WriteAll(fd, t.data_ptr(), t.nbytes(), path));
    }
    return absl::OkStatus();
  });
}

absl::Status WriteCheckpoint(const std::string& model_dir,
                             const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                             int num_shards) {
  if (num_shards < 1 || num_shards > 99999) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_shards must be in [1, 99999], got ", num_shards));
  }
  // Validate across all shards up front: a name repeated in two shards would pass each shard's
  // own check, and a failure after some shards are written would leave a partial directory.
  RETURN_IF_ERROR(ValidateTensorsToWrite(tensors));
  if (::mkdir(model_dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::ErrnoToStatus(errno, absl::StrCat("creating checkpoint directory ", model_dir));
  }
  // Hugging Face's loaders check that shards declare themselves PyTorch-format.
  const std::map<std::string, std::string> shard_metadata = {{"format", "pt"}};
  const std::string single_path = absl::StrCat(model_dir, "/", kSingleFileName);
  if (num_shards == 1) return WriteSafetensors(single_path, tensors, shard_metadata);
  if (PathExists(single_path)) {
    return absl::FailedPreconditionError(
        absl::StrCat(single_path, " exists and readers would load it instead of the ",
                     num_shards, " shards; remove it first"));
  }

  json weight_map = json::object();
  uint64_t total_size = 0;
  const size_t n = tensors.size();
  for (int s = 0; s < num_shards; ++s) {
    const size_t first = n * s / num_shards;
    const size_t last = n * (s + 1) / num_shards;
    const std::string shard = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, num_shards);
    std::vector<std::pair<std::string, at::Tensor>> shard_tensors(tensors.begin() + first,
                                                                  tensors.begin() + last);
    RETURN_IF_ERROR(
        WriteSafetensors(absl::StrCat(model_dir, "/", shard), shard_tensors, shard_metadata));
    for (const auto& [name, tensor] : shard_tensors) {
      weight_map[name] = shard;
      total_size += tensor.nbytes();
    }
  }
  json index = {{"metadata", {{"total_size", total_size}}}, {"weight_map", weight_map}};
  std::string index_text;
  try {
    index_text = index.dump(2) + "\n";
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("tensor names must be UTF-8: ", e.what()));
  }
  const std::string index_path = absl::StrCat(model_dir, "/", kIndexFileName);
  return WriteFileAtomically(index_path, [&](int fd) {
    return WriteAll(fd, index_text.data(), index_text.size(), index_path);
  });
}

}  // namespace remotelens
