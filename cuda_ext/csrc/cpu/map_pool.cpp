// Recycled pages for the CPU kernel's large outputs: see map_pool.h.
#include "map_pool.h"

#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace qrender {
namespace {

constexpr size_t kPage = 4096;

size_t page_rounded(size_t bytes) { return (bytes + kPage - 1) / kPage * kPage; }

int64_t budget_from_env() {
  const char* v = std::getenv("QSPLAT_MAP_CACHE_MB");
  if (v == nullptr || *v == '\0') return int64_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0,
              "QSPLAT_MAP_CACHE_MB must be a whole number of MiB >= 0 (0 turns recycling off), got '", v, "'");
  return int64_t(mb) << 20;
}

bool hugepages_from_env() {
  const char* v = std::getenv("QSPLAT_HUGEPAGES");
  return v && v[0] == '1';
}

// New pages straight from the OS (page aligned). With QSPLAT_HUGEPAGES=1 Linux is asked for
// transparent huge pages first: one fault per 2 MB instead of per 4 KB, measured 3.6x faster
// alone but 1.6x slower in a process that frees many 4 KB-page buffers (the kernel compacts
// memory on those faults), hence opt-in.
void* map_pages(size_t bytes) {
#if defined(__linux__)
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "q-splat CPU rasterizer: could not allocate ", bytes >> 20,
              " MiB for an output map (out of memory?)");
#if defined(MADV_HUGEPAGE)
  static const bool huge = hugepages_from_env();
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
#else
  void* p = std::aligned_alloc(kPage, bytes);
  TORCH_CHECK(p != nullptr, "q-splat CPU rasterizer: could not allocate ", bytes >> 20, " MiB");
  return p;
#endif
}

void unmap_pages(void* p, size_t bytes) {
#if defined(__linux__)
  munmap(p, bytes);
#else
  (void)bytes;
  std::free(p);
#endif
}

struct Block {
  void* ptr;
  size_t bytes;
};

// Idle blocks, oldest first. Never destroyed (a leaked singleton): a tensor freed at interpreter
// exit may return its block after static destructors have run.
class Pool {
 public:
  Pool() : budget_(budget_from_env()) {}

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = idle_.size(); i-- > 0;)
        if (idle_[i].bytes == bytes) {
          void* p = idle_[i].ptr;
          idle_.erase(idle_.begin() + i);
          idle_bytes_ -= bytes;
          return p;
        }
    }
    return map_pages(bytes);
  }

  void give(void* p, size_t bytes) {
    if (int64_t(bytes) > budget_) return unmap_pages(p, bytes);
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_.push_back({p, bytes});
      idle_bytes_ += bytes;
      while (idle_bytes_ > budget_) {  // the oldest go first
        evicted.push_back(idle_.front());
        idle_bytes_ -= idle_.front().bytes;
        idle_.erase(idle_.begin());
      }
    }
    for (const Block& b : evicted) unmap_pages(b.ptr, b.bytes);  // outside the lock
  }

  int64_t release() {
    std::vector<Block> all;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t released = 0;
    for (const Block& b : all) {
      unmap_pages(b.ptr, b.bytes);
      released += int64_t(b.bytes);
    }
    return released;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

  int64_t budget() const { return budget_; }

 private:
  std::mutex mutex_;
  std::vector<Block> idle_;
  int64_t idle_bytes_ = 0;
  const int64_t budget_;
};

Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

at::Tensor empty_recycled(at::IntArrayRef shape, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  const int64_t bytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  if (bytes < kRecycledMinBytes || pool().budget() == 0 || !opts.device().is_cpu())
    return at::empty(shape, opts);
  const size_t size = page_rounded(size_t(bytes));
  void* p = pool().take(size);
  return at::from_blob(
      p, shape, [size](void* q) { pool().give(q, size); }, opts);
}

int64_t release_recycled_maps() { return pool().release(); }
int64_t recycled_idle_bytes() { return pool().idle_bytes(); }
int64_t recycled_budget_bytes() { return pool().budget(); }

}  // namespace qrender
