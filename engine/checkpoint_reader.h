// CheckpointReader: copies byte ranges of checkpoint files into preallocated tensors, in
// parallel, converting dtypes on the way, without mapping the files.
//
// Why not only the mapping: a weight that is a view of a mapped shard keeps its file pages
// resident beside any copy made from them (fused projections, dtype casts, device copies), so the
// weights sat in memory ~1.4 times. So the bytes of every weight that must be copied are read
// with pread() straight into their final tensor, never through the mapping; only weights used in
// place as views of the mapping are faulted in through it (in parallel, not 4 KiB at a time on the
// first forward's thread).
//
//   std::vector<ReadPiece> pieces = ...;          // tensor bytes -> (destination, element offset)
//   ReadOptions options;
//   options.on_progress = [](const ReadProgress& p) { ... };  // at most once a second, and at the end
//   RETURN_IF_ERROR(ReadPieces(pieces, options));
//
// Destinations may live on any device: CPU destinations are read into directly (or converted
// from a per-thread staging buffer when dtypes differ); other devices get the bytes through a
// pinned staging buffer per thread, so reading and host-to-device copies of different threads
// overlap. A CPU destination may also be a view of the mapped file itself
// (ReadPiece::destination_maps_source); its pages are then faulted in, not copied. The loader
// uses that for every CPU weight it can (see docs/decisions.md, "CPU weights stay in the page
// cache").
#ifndef REMOTELENS_ENGINE_CHECKPOINT_READER_H_
#define REMOTELENS_ENGINE_CHECKPOINT_READER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace remotelens {

// One source range and where its elements go.
struct ReadPiece {
  std::string name;            // for error messages (the checkpoint tensor's name)
  std::string path;            // file holding the bytes
  uint64_t file_offset = 0;    // absolute offset of the first byte
  at::ScalarType source_dtype = at::kFloat;  // float32, float16 or bfloat16
  int64_t numel = 0;
  at::Tensor destination;      // contiguous; float32, float16 or bfloat16; any device
  int64_t destination_offset = 0;  // in elements of `destination`
  // The destination already views these very bytes through a read-only mapping of the file (a
  // CPU weight used in place, see SafetensorsFile::ViewBytes). Reading then only faults the pages
  // in (MADV_POPULATE_READ, in parallel), so that the first forward does not, and counts them
  // toward progress. Requires a CPU destination of the source dtype.
  bool destination_maps_source = false;
};

struct ReadProgress {
  int64_t bytes_done = 0;
  int64_t bytes_total = 0;
  int files_done = 0;
  int files_total = 0;
  absl::Duration elapsed;
};

struct ReadOptions {
  int threads = 0;                        // 0: one per core
  int64_t chunk_bytes = int64_t{32} << 20;  // unit of work handed to a thread
  absl::Duration progress_interval = absl::Seconds(1);
  // Drop each range from the page cache once it is read (POSIX_FADV_DONTNEED). For loads whose
  // weights and checkpoint do not both fit in memory: reading marks consumed pages as recently
  // used, so without this the kernel evicts the pages still to be read, and the load re-reads
  // them from disk (5x the file-read time for an 8B checkpoint on a 24 GiB machine).
  bool drop_page_cache = false;
  // Called from reader threads (one at a time) at most once per progress_interval, whenever a
  // file completes, and once at the end.
  std::function<void(const ReadProgress&)> on_progress;
};

// Fills every piece. Errors: NOT_FOUND / PERMISSION_DENIED for files that cannot be opened,
// DATA_LOSS naming file and tensor when a file is shorter than its header promised (changed after
// it was validated), RESOURCE_EXHAUSTED when a staging buffer cannot be allocated. Pieces must
// not overlap in their destinations.
absl::Status ReadPieces(const std::vector<ReadPiece>& pieces, const ReadOptions& options);

// A CPU tensor in fresh anonymous memory that the kernel may back with transparent huge pages
// (2 MiB faults instead of 4 KiB ones: loading gigabytes spends far less time in page faults).
// Uninitialised, like at::empty. RESOURCE_EXHAUSTED-worthy failures throw c10::Error as at::empty
// does.
at::Tensor EmptyHostTensor(at::IntArrayRef shape, at::ScalarType dtype);

// Converts `n` elements between float32, float16 and bfloat16 (round to nearest even, as
// at::Tensor::to does).
void ConvertElements(const void* source, at::ScalarType source_dtype, void* destination,
                     at::ScalarType destination_dtype, int64_t n);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_CHECKPOINT_READER_H_
