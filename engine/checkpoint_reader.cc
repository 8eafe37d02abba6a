#include "engine/checkpoint_reader.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
#ifdef MADV_POPULATE_READ
constexpr int kMadvPopulateRead = MADV_POPULATE_READ;
#else
constexpr int kMadvPopulateRead = 22;  // Linux 5.14; older C libraries lack the name
#endif

template <typename From, typename To>
void ConvertTyped(const void* source, void* destination, int64_t n) {
  const From* in = static_cast<const From*>(source);
  To* out = static_cast<To*>(destination);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<To>(static_cast<float>(in[i]));
}

template <typename From>
void ConvertFrom(const void* source, void* destination, at::ScalarType to, int64_t n) {
  switch (to) {
    case at::kFloat: return ConvertTyped<From, float>(source, destination, n);
    case at::kHalf: return ConvertTyped<From, c10::Half>(source, destination, n);
    case at::kBFloat16: return ConvertTyped<From, c10::BFloat16>(source, destination, n);
    default: TORCH_CHECK(false, "ConvertElements: unsupported destination dtype ", to);
  }
}

// One unit of work: `numel` elements of piece `piece`, starting `start` elements into it.
struct Chunk {
  size_t piece;
  int64_t start;
  int64_t numel;
};

class Reader {
 public:
  Reader(const std::vector<ReadPiece>& pieces, const ReadOptions& options)
      : pieces_(pieces), options_(options) {}

  absl::Status Run() {
    RETURN_IF_ERROR(Plan());
    if (chunks_.empty()) {
      Report(/*force=*/true);
      return absl::OkStatus();
    }
    int threads = options_.threads > 0 ? options_.threads
                                       : static_cast<int>(std::thread::hardware_concurrency());
    threads = std::max(1, std::min<int>(threads, static_cast<int>(chunks_.size())));
    start_ = absl::Now();
    last_report_ = start_;
    std::vector<std::thread> workers;
    for (int i = 1; i < threads; ++i) workers.emplace_back([this] { Work(); });
    Work();
    for (std::thread& t : workers) t.join();
    for (auto& [path, fd] : fds_) ::close(fd);
    if (!error_.ok()) return error_;
    if (reported_bytes_ != bytes_done_) Report(/*force=*/true);  // the last file's report may be it
    return absl::OkStatus();
  }

 private:
  absl::Status Plan() {
    std::map<std::string, size_t> file_index;
    for (size_t i = 0; i < pieces_.size(); ++i) {
      const ReadPiece& p = pieces_[i];
      if (p.numel == 0) continue;
      if (!p.destination.defined() || !p.destination.is_contiguous() ||
          p.destination_offset < 0 || p.destination_offset + p.numel > p.destination.numel()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "checkpoint tensor ", p.name, ": destination does not hold elements [",
            p.destination_offset, ", ", p.destination_offset + p.numel, ")"));
      }
      if (p.destination_maps_source &&
          (!p.destination.device().is_cpu() || p.destination.scalar_type() != p.source_dtype)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "checkpoint tensor ", p.name, ": a destination that maps the file must be a CPU tensor of ",
            "the file's dtype ", c10::toString(p.source_dtype)));
      }
      auto [it, inserted] = file_index.emplace(p.path, file_index.size());
      if (inserted) {
        const int fd = ::open(p.path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
          return absl::ErrnoToStatus(errno, absl::StrCat("cannot open checkpoint file ", p.path));
        }
        ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        fds_.emplace(p.path, fd);
        file_remaining_.push_back(0);
      }
      const int64_t source_bytes = p.numel * static_cast<int64_t>(c10::elementSize(p.source_dtype));
      file_remaining_[it->second] += source_bytes;
      bytes_total_ += source_bytes;
      piece_file_.resize(pieces_.size());
      piece_file_[i] = it->second;
      const int64_t per_chunk = std::max<int64_t>(
          1, options_.chunk_bytes / static_cast<int64_t>(c10::elementSize(p.source_dtype)));
      for (int64_t start = 0; start < p.numel; start += per_chunk) {
        chunks_.push_back({i, start, std::min(per_chunk, p.numel - start)});
      }
    }
    // Read each file front to back, files in the order they were named: the kernel's readahead
    // and page-cache eviction both work best on sequential access.
    std::stable_sort(chunks_.begin(), chunks_.end(), [this](const Chunk& a, const Chunk& b) {
      const size_t fa = piece_file_[a.piece], fb = piece_file_[b.piece];
      if (fa != fb) return fa < fb;
      return Offset(a) < Offset(b);
    });
    files_total_ = static_cast<int>(file_remaining_.size());
    for (int64_t remaining : file_remaining_) {
      if (remaining == 0) ++files_done_;
    }
    return absl::OkStatus();
  }

  uint64_t Offset(const Chunk& c) const {
    const ReadPiece& p = pieces_[c.piece];
    return p.file_offset + static_cast<uint64_t>(c.start) * c10::elementSize(p.source_dtype);
  }

  void Work() {
    std::vector<uint8_t> staging;  // source bytes, when they cannot be read in place
    at::Tensor pinned;             // destination-dtype bytes bound for another device
    while (!failed_.load(std::memory_order_relaxed)) {
      const size_t index = next_.fetch_add(1);
      if (index >= chunks_.size()) break;
      absl::Status status;
      try {
        status = ReadChunk(chunks_[index], staging, pinned);
      } catch (const c10::Error& e) {
        const std::string what = e.what_without_backtrace();
        const ReadPiece& p = pieces_[chunks_[index].piece];
        status = (what.find("out of memory") != std::string::npos ||
                  what.find("can't allocate") != std::string::npos)
                     ? absl::ResourceExhaustedError(absl::StrCat(
                           "out of memory copying checkpoint tensor ", p.name, " to ",
                           p.destination.device().str(), ": ", what))
                     : absl::InternalError(
                           absl::StrCat("copying checkpoint tensor ", p.name, ": ", what));
      }
      if (!status.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        if (error_.ok()) error_ = status;
        failed_.store(true);
        break;
      }
      const ReadPiece& p = pieces_[chunks_[index].piece];
      const int64_t bytes =
          chunks_[index].numel * static_cast<int64_t>(c10::elementSize(p.source_dtype));
      std::lock_guard<std::mutex> lock(mu_);
      bytes_done_ += bytes;
      const bool file_done = (file_remaining_[piece_file_[chunks_[index].piece]] -= bytes) == 0;
      if (file_done) ++files_done_;
      Report(/*force=*/file_done);
    }
  }

  // Faults in the pages of a destination that views the mapped file. MADV_POPULATE_READ (Linux
  // 5.14) maps them in one call and reports I/O errors as errno; older kernels get one read per
  // page.
  static absl::Status Populate(const Chunk& c, const ReadPiece& p) {
    const size_t element = c10::elementSize(p.source_dtype);
    const uint8_t* begin = static_cast<const uint8_t*>(p.destination.data_ptr()) +
                           static_cast<size_t>(p.destination_offset + c.start) * element;
    const size_t nbytes = static_cast<size_t>(c.numel) * element;
    static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t first = reinterpret_cast<uintptr_t>(begin) & ~(page - 1);
    const size_t length = reinterpret_cast<uintptr_t>(begin) + nbytes - first;
    while (::madvise(reinterpret_cast<void*>(first), length, kMadvPopulateRead) != 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == EINVAL || errno == ENOSYS) {  // a kernel without MADV_POPULATE_READ
        volatile uint8_t sink = 0;
        for (uintptr_t a = first; a < first + length; a += page) {
          sink = sink + *reinterpret_cast<const volatile uint8_t*>(a);
        }
        return absl::OkStatus();
      }
      if (errno == ENOMEM) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "out of memory mapping checkpoint tensor ", p.name, " from ", p.path));
      }
      return absl::DataLossError(absl::StrCat(
          "checkpoint tensor ", p.name, " could not be read from ", p.path, " (",
          std::strerror(errno), "): the file changed after it was opened, or the disk failed"));
    }
    return absl::OkStatus();
  }

  absl::Status ReadChunk(const Chunk& c, std::vector<uint8_t>& staging, at::Tensor& pinned) {
    const ReadPiece& p = pieces_[c.piece];
    if (p.destination_maps_source) return Populate(c, p);
    const at::ScalarType to = p.destination.scalar_type();
    const size_t source_bytes = static_cast<size_t>(c.numel) * c10::elementSize(p.source_dtype);
    const size_t destination_bytes = static_cast<size_t>(c.numel) * c10::elementSize(to);
    const bool on_cpu = p.destination.device().is_cpu();
    uint8_t* destination_address =
        on_cpu ? static_cast<uint8_t*>(p.destination.data_ptr()) +
                     static_cast<size_t>(p.destination_offset + c.start) * c10::elementSize(to)
               : nullptr;

    if (!on_cpu && (!pinned.defined() || static_cast<size_t>(pinned.numel()) < destination_bytes)) {
      pinned = at::empty({static_cast<int64_t>(std::max<size_t>(destination_bytes,
                                                                options_.chunk_bytes * 2))},
                         at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    }
    uint8_t* converted = on_cpu ? destination_address : static_cast<uint8_t*>(pinned.data_ptr());
    uint8_t* read_into = converted;
    if (p.source_dtype != to) {
      if (staging.size() < source_bytes) staging.resize(source_bytes);
      read_into = staging.data();
    }
    const int fd = fds_.at(p.path);
    RETURN_IF_ERROR(PreadAll(fd, read_into, source_bytes, Offset(c), p));
    if (options_.drop_page_cache) {
      ::posix_fadvise(fd, static_cast<off_t>(Offset(c)), static_cast<off_t>(source_bytes),
                      POSIX_FADV_DONTNEED);
    }
    if (p.source_dtype != to) ConvertElements(read_into, p.source_dtype, converted, to, c.numel);
    if (!on_cpu) {
      const at::Tensor host = at::from_blob(converted, {c.numel}, at::TensorOptions().dtype(to));
      p.destination.view({-1}).narrow(0, p.destination_offset + c.start, c.numel).copy_(host);
    }
    return absl::OkStatus();
  }

  static absl::Status PreadAll(int fd, uint8_t* buffer, size_t n, uint64_t offset,
                               const ReadPiece& piece) {
    while (n > 0) {
      const ssize_t got = ::pread(fd, buffer, std::min<size_t>(n, size_t{1} << 30),
                                  static_cast<off_t>(offset));
      if (got < 0) {
        if (errno == EINTR) continue;
        return absl::ErrnoToStatus(errno, absl::StrCat("reading checkpoint tensor ", piece.name,
                                                       " from ", piece.path, " at byte ", offset));
      }
      if (got == 0) {
        return absl::DataLossError(absl::StrCat(
            "checkpoint file ", piece.path, " ends at byte ", offset, " inside tensor ",
            piece.name, ": the file changed after it was opened (truncated while loading?)"));
      }
      buffer += got;
      offset += static_cast<uint64_t>(got);
      n -= static_cast<size_t>(got);
    }
    return absl::OkStatus();
  }

  // Caller holds mu_ (or is the only thread).
  void Report(bool force) {
    if (!options_.on_progress) return;
    const absl::Time now = absl::Now();
    if (!force && now - last_report_ < options_.progress_interval) return;
    last_report_ = now;
    reported_bytes_ = bytes_done_;
    ReadProgress progress;
    progress.bytes_done = bytes_done_;
    progress.bytes_total = bytes_total_;
    progress.files_done = files_done_;
    progress.files_total = files_total_;
    progress.elapsed = now - start_;
    options_.on_progress(progress);
  }

  const std::vector<ReadPiece>& pieces_;
  const ReadOptions& options_;
  std::vector<Chunk> chunks_;
  std::vector<size_t> piece_file_;
  std::map<std::string, int> fds_;
  std::atomic<size_t> next_{0};
  std::atomic<bool> failed_{false};

  std::mutex mu_;  // guards what follows
  absl::Status error_;
  std::vector<int64_t> file_remaining_;  // source bytes still to read, per file
  int64_t bytes_done_ = 0;
  int64_t reported_bytes_ = -1;
  int64_t bytes_total_ = 0;
  int files_done_ = 0;
  int files_total_ = 0;
  absl::Time start_ = absl::Now();
  absl::Time last_report_ = absl::Now();
};

}  // namespace

void ConvertElements(const void* source, at::ScalarType source_dtype, void* destination,
                     at::ScalarType destination_dtype, int64_t n) {
  if (source_dtype == destination_dtype) {
    std::memcpy(destination, source, static_cast<size_t>(n) * c10::elementSize(source_dtype));
    return;
  }
  switch (source_dtype) {
    case at::kFloat: return ConvertFrom<float>(source, destination, destination_dtype, n);
    case at::kHalf: return ConvertFrom<c10::Half>(source, destination, destination_dtype, n);
    case at::kBFloat16:
      return ConvertFrom<c10::BFloat16>(source, destination, destination_dtype, n);
    default: TORCH_CHECK(false, "ConvertElements: unsupported source dtype ", source_dtype);
  }
}

at::Tensor EmptyHostTensor(at::IntArrayRef shape, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  // Small tensors are not worth a mapping of their own.
  if (nbytes < kHugePage) return at::empty(shape, at::TensorOptions().dtype(dtype));
  // Over-allocate by one huge page so the tensor can start on a 2 MiB boundary, which transparent
  // huge pages need.
  const size_t mapped = nbytes + kHugePage;
  void* base = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(base != MAP_FAILED, "out of memory: can't allocate ", nbytes,
              " bytes of host memory for a weight tensor (", std::strerror(errno), ")");
  const uintptr_t aligned =
      (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(uintptr_t{kHugePage} - 1);
  ::madvise(reinterpret_cast<void*>(aligned), nbytes, MADV_HUGEPAGE);  // advice: may be ignored
  return at::from_blob(
      reinterpret_cast<void*>(aligned), shape,
      [base, mapped](void*) { ::munmap(base, mapped); }, at::TensorOptions().dtype(dtype));
}

absl::Status ReadPieces(const std::vector<ReadPiece>& pieces, const ReadOptions& options) {
  for (const ReadPiece& p : pieces) {
    for (at::ScalarType t : {p.source_dtype, p.destination.defined() ? p.destination.scalar_type()
                                                                     : at::kFloat}) {
      if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16) {
        return absl::InvalidArgumentError(absl::StrCat("checkpoint tensor ", p.name, ": dtype ",
                                                       c10::toString(t),
                                                       " is not one of float32, float16, bfloat16"));
      }
    }
  }
  Reader reader(pieces, options);
  return reader.Run();
}

}  // namespace remotelens
