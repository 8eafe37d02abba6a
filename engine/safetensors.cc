#include "engine/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <tuple>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "engine/safetensors_internal.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

using nlohmann::json;

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

uint64_t SafetensorsFile::mapped_size() const { return mapping_->size; }

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

absl::StatusOr<at::Tensor> SafetensorsFile::ViewBytes(uint64_t file_offset, at::IntArrayRef shape,
                                                      at::ScalarType dtype) const {
  uint64_t nbytes = c10::elementSize(dtype);
  for (int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError("ViewBytes: negative dimension");
    nbytes *= static_cast<uint64_t>(d);
  }
  if (file_offset < data_start_ || file_offset > mapping_->size ||
      nbytes > mapping_->size - file_offset) {
    return absl::OutOfRangeError(absl::StrCat("bytes [", file_offset, ", ", file_offset + nbytes,
                                              ") are not inside the data of ", path_, " [",
                                              data_start_, ", ", mapping_->size, ")"));
  }
  const uint8_t* bytes = mapping_->data + file_offset;
  if (reinterpret_cast<uintptr_t>(bytes) % c10::elementSize(dtype) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("bytes at offset ", file_offset, " of ", path_, " are not aligned to ",
                     c10::elementSize(dtype), "-byte elements"));
  }
  std::shared_ptr<const Mapping> keep_mapped = mapping_;
  return at::from_blob(
      const_cast<uint8_t*>(bytes), shape, [keep_mapped](void*) { (void)keep_mapped; },
      at::TensorOptions().dtype(dtype).device(at::kCPU));
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

absl::StatusOr<CheckpointTensors::Location> CheckpointTensors::Locate(
    const std::string& name) const {
  auto it = file_of_.find(name);
  if (it == file_of_.end()) {
    return absl::NotFoundError(absl::StrCat("checkpoint has no tensor ", Quote(name)));
  }
  const SafetensorsFile& file = *it->second;
  const SafetensorsFile::Entry& entry = file.entries().at(name);
  return Location{&file.path(), file.data_offset() + entry.begin, entry.end - entry.begin,
                  entry.dtype, entry.shape};
}

absl::StatusOr<at::Tensor> CheckpointTensors::ViewBytes(const std::string& path,
                                                        uint64_t file_offset,
                                                        at::IntArrayRef shape,
                                                        at::ScalarType dtype) const {
  for (const auto& file : files_) {
    if (file->path() == path) return file->ViewBytes(file_offset, shape, dtype);
  }
  return absl::NotFoundError(absl::StrCat(path, " is not a file of this checkpoint"));
}

std::vector<std::pair<std::string, uint64_t>> CheckpointTensors::FileSizes() const {
  std::vector<std::pair<std::string, uint64_t>> sizes;
  for (const auto& file : files_) sizes.emplace_back(file->path(), file->mapped_size());
  return sizes;
}

}  // namespace remotelens
