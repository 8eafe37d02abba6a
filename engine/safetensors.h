// Reading and writing safetensors files and Hugging Face checkpoint directories.
//
// The reader maps a file read-only and hands out CPU tensors that view the mapped bytes, so
// opening a multi-gigabyte checkpoint costs a header parse, not a copy. Every offset, shape and
// dtype in the header is validated in Open(), before any tensor is touched, so a truncated or
// corrupt file is a Status naming the file and the problem, never a crash.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<CheckpointTensors> weights,
//                    CheckpointTensors::Open("/models/Llama-3.1-8B"));
//   ASSIGN_OR_RETURN(at::Tensor embed, weights->Tensor("model.embed_tokens.weight"));
//   // embed: [d_vocab, d_model] bfloat16, a view of the mapped shard; copy it to the GPU.
//
//   RETURN_IF_ERROR(WriteSafetensors("/tmp/x.safetensors", {{"w", at::ones({2, 3})}},
//                                    {{"format", "pt"}}));
//
// File layout: an 8-byte little-endian u64 header length N, N bytes of UTF-8 JSON
//   {name: {"dtype": "F32"|"F16"|"BF16", "shape": [...], "data_offsets": [begin, end]},
//    "__metadata__": {string: string}}
// then the data buffer; offsets are relative to the buffer's start.
//
// Status codes: a missing file or directory is NOT_FOUND; a file whose bytes do not form a valid
// safetensors file (truncated, bad JSON, offsets that disagree with shapes) is DATA_LOSS; a valid
// file holding a dtype the engine does not serve (I64, F64, ...) is INVALID_ARGUMENT.
#ifndef REMOTELENS_ENGINE_SAFETENSORS_H_
#define REMOTELENS_ENGINE_SAFETENSORS_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace remotelens {

// One safetensors file, mapped read-only. All methods are const and safe to call from several
// threads at once.
//
// Tensors returned by Tensor() alias the read-only mapping: writing into them (in-place ops,
// copy_ into them) faults. Copy first (`.clone()`, `.to(device)`) if the bytes must change. The
// mapping is PROT_READ on purpose: a writable private mapping would let one caller's in-place op
// silently change the weights every other caller sees.
//
// Open() validates the file as it is then; truncating the file on disk while it is mapped makes
// later reads fault (SIGBUS), as with any mmap. Writers here replace files by rename, never in
// place, so they cannot cause that.
class SafetensorsFile {
 public:
  struct Entry {
    at::ScalarType dtype;        // at::kFloat, at::kHalf or at::kBFloat16
    std::vector<int64_t> shape;  // empty for a zero-dim (scalar) tensor
    uint64_t begin;              // byte offsets into the data buffer, [begin, end)
    uint64_t end;
  };

  // Maps `path` and validates its whole header against the file's size.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::map<std::string, Entry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }
  // File offset of the data buffer (8 + header length): entry bytes lie at
  // data_offset() + begin .. data_offset() + end. For readers that copy with pread() instead of
  // touching the mapping (see checkpoint_reader.h).
  uint64_t data_offset() const { return data_start_; }
  uint64_t mapped_size() const;  // the whole file's size in bytes

  // A CPU tensor viewing the mapped bytes without a copy. The tensor shares ownership of the
  // mapping, so it stays valid after this SafetensorsFile is destroyed. Two exceptions copy,
  // because a view would be wrong or useless there: a tensor whose bytes are not aligned to its
  // element size (possible in files written by other tools), and an empty tensor.
  // NOT_FOUND naming the tensor when the file has no such entry.
  absl::StatusOr<at::Tensor> Tensor(const std::string& name) const;

  // A CPU tensor of `shape` and `dtype` viewing the mapped bytes from absolute file offset
  // `file_offset` on; the bytes may span several adjacent entries (gate and up projections stored
  // side by side view as one fused tensor). Same ownership and read-only semantics as Tensor().
  // OUT_OF_RANGE when the bytes are not all inside the data buffer; FAILED_PRECONDITION when they
  // are not aligned to the element size (copy them instead).
  absl::StatusOr<at::Tensor> ViewBytes(uint64_t file_offset, at::IntArrayRef shape,
                                       at::ScalarType dtype) const;

 private:
  struct Mapping;  // the mmap'd region; shared with every tensor viewing it

  SafetensorsFile(std::string path, std::shared_ptr<const Mapping> mapping, uint64_t data_start,
                  std::map<std::string, Entry> entries,
                  std::map<std::string, std::string> metadata);

  std::string path_;
  std::shared_ptr<const Mapping> mapping_;
  uint64_t data_start_;  // file offset of the data buffer: 8 + header length
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// The weights of a Hugging Face checkpoint directory: model.safetensors if present, otherwise
// model.safetensors.index.json ({"weight_map": {tensor name: shard file name}}) and its shards.
// Every shard is opened and validated in Open(), and every tensor the index names must be in the
// shard it points at. Tensors a shard holds but the index does not name are ignored, as in
// Hugging Face's own loader. All methods are const and thread-safe.
class CheckpointTensors {
 public:
  static absl::StatusOr<std::unique_ptr<CheckpointTensors>> Open(const std::string& model_dir);

  std::vector<std::string> Names() const;  // sorted
  absl::StatusOr<std::vector<int64_t>> Shape(const std::string& name) const;
  // Same view semantics as SafetensorsFile::Tensor(); NOT_FOUND naming an unknown tensor.
  absl::StatusOr<at::Tensor> Tensor(const std::string& name) const;

  // Where a tensor's bytes lie on disk, for copying them without the mapping.
  struct Location {
    const std::string* path;  // the shard; owned by this object
    uint64_t offset;          // absolute file offset of the first byte
    uint64_t nbytes;
    at::ScalarType dtype;
    std::vector<int64_t> shape;
  };
  absl::StatusOr<Location> Locate(const std::string& name) const;
  // SafetensorsFile::ViewBytes on the shard at `path` (a Location's path); NOT_FOUND for a path
  // that is not one of this checkpoint's files.
  absl::StatusOr<at::Tensor> ViewBytes(const std::string& path, uint64_t file_offset,
                                       at::IntArrayRef shape, at::ScalarType dtype) const;
  // Total bytes of the files that hold the named tensors (headers included), in open order.
  std::vector<std::pair<std::string, uint64_t>> FileSizes() const;

 private:
  CheckpointTensors(std::vector<std::unique_ptr<SafetensorsFile>> files,
                    std::map<std::string, const SafetensorsFile*> file_of);

  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> file_of_;  // tensor name -> file holding it
};

// Writes `tensors` to `path` in the order given, each contiguous and row-major; tensors on
// another device are copied to the CPU first. Dtypes must be float32, float16 or bfloat16 and
// names unique and non-empty (else INVALID_ARGUMENT, and nothing is written). The file is written
// to `path` + ".tmp" and renamed over `path`, so a reader never sees half a file. The header is
// padded so the data buffer starts 8-byte aligned; tensors follow each other without gaps, as
// the format's reference reader requires.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Writes a checkpoint directory (created if absent) that CheckpointTensors::Open reads back.
// num_shards == 1 writes model.safetensors. Otherwise the tensors are split in order into
// num_shards runs of near-equal count, written as model-00001-of-0000n.safetensors ..., and then
// model.safetensors.index.json with {"metadata": {"total_size": data bytes}, "weight_map": ...};
// the index goes last so a reader that finds it finds complete shards. A sharded write into a
// directory that already holds model.safetensors is FAILED_PRECONDITION, because readers would
// keep loading that file instead.
// Within each file the data are laid out as Hugging Face's writer lays them out (by element size,
// largest first, then by name), so tests see the layout of real checkpoints.
// Every file gets {"format": "pt"} metadata, which Hugging Face's Python loaders insist on.
absl::Status WriteCheckpoint(const std::string& model_dir,
                             const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                             int num_shards);

// WriteCheckpoint with each tensor made on demand by `make(i)` for names[i], one shard's tensors
// at a time: writes checkpoints larger than memory (tools/make_checkpoint's 8B-shaped one). An
// error from `make` stops the write and is returned.
absl::Status WriteCheckpointLazily(
    const std::string& model_dir, const std::vector<std::string>& names,
    const std::function<absl::StatusOr<at::Tensor>(size_t index)>& make, int num_shards);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_SAFETENSORS_H_
