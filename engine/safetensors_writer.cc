// The safetensors writers declared in engine/safetensors.h.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <functional>
#include <set>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/safetensors.h"
#include "engine/safetensors_internal.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

using nlohmann::json;

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
  // Validate across all shards up front: a name repeated in two shards would pass each shard's
  // own check, and a failure after some shards are written would leave a partial directory.
  RETURN_IF_ERROR(ValidateTensorsToWrite(tensors));
  std::vector<std::string> names;
  for (const auto& entry : tensors) names.push_back(entry.first);
  return WriteCheckpointLazily(
      model_dir, names,
      [&tensors](size_t i) -> absl::StatusOr<at::Tensor> { return tensors[i].second; },
      num_shards);
}

absl::Status WriteCheckpointLazily(
    const std::string& model_dir, const std::vector<std::string>& names,
    const std::function<absl::StatusOr<at::Tensor>(size_t index)>& make, int num_shards) {
  if (num_shards < 1 || num_shards > 99999) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_shards must be in [1, 99999], got ", num_shards));
  }
  if (std::set<std::string>(names.begin(), names.end()).size() != names.size()) {
    return absl::InvalidArgumentError("checkpoint tensor names must be unique");
  }
  if (::mkdir(model_dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::ErrnoToStatus(errno, absl::StrCat("creating checkpoint directory ", model_dir));
  }
  // Hugging Face's loaders check that shards declare themselves PyTorch-format.
  const std::map<std::string, std::string> shard_metadata = {{"format", "pt"}};
  const std::string single_path = absl::StrCat(model_dir, "/", kSingleFileName);
  auto make_range = [&](size_t first, size_t last)
      -> absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> {
    std::vector<std::pair<std::string, at::Tensor>> made;
    for (size_t i = first; i < last; ++i) {
      ASSIGN_OR_RETURN(at::Tensor t, make(i));
      made.emplace_back(names[i], std::move(t));
    }
    // Lay each file out as Hugging Face's writer does (the safetensors library sorts a file's
    // tensors by element size, largest first, then by name), so that loaders are tested on the
    // layout real checkpoints have: q/k/v projections not adjacent, gate/up adjacent.
    std::stable_sort(made.begin(), made.end(), [](const auto& a, const auto& b) {
      const size_t ea = a.second.element_size(), eb = b.second.element_size();
      return ea != eb ? ea > eb : a.first < b.first;
    });
    return made;
  };
  if (num_shards == 1) {
    ASSIGN_OR_RETURN(auto all, make_range(0, names.size()));
    return WriteSafetensors(single_path, all, shard_metadata);
  }
  if (PathExists(single_path)) {
    return absl::FailedPreconditionError(
        absl::StrCat(single_path, " exists and readers would load it instead of the ",
                     num_shards, " shards; remove it first"));
  }

  // One shard's tensors exist at a time, so a checkpoint larger than memory can be written.
  json weight_map = json::object();
  uint64_t total_size = 0;
  const size_t n = names.size();
  for (int s = 0; s < num_shards; ++s) {
    const size_t first = n * s / num_shards;
    const size_t last = n * (s + 1) / num_shards;
    const std::string shard = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, num_shards);
    ASSIGN_OR_RETURN(auto shard_tensors, make_range(first, last));
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
