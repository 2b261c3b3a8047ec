// Internal state of the CPU executor, shared by executor.cpp (scheduling, collectives, PTX
// twins) and checker.cpp (memory checks and reports). Not seen by kernel code.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

#include "emu/emu.h"
#include "emu/fiber.h"

namespace llada {
namespace emu {

enum class ThreadState : uint8_t { kRunnable, kBarrier, kWarp, kExited };

// Warp collective kinds (the arrival of every lane in the mask completes one).
enum CollectiveOp : int { kOpSyncwarp = 1, kOpShfl, kOpLdmatrix, kOpMma };

struct CpCopy {
  uint32_t dst;      // shared address
  uint8_t data[16];  // what lands there (zeros for a zero-filling copy)
};

struct Thread {
  Fiber fiber;
  FiberStack stack;
  int tid = 0;  // linear thread index in the block
  uint3 idx{0, 0, 0};
  ThreadState state = ThreadState::kExited;
  bool in_body = false;
  const char* wait_file = "";
  int wait_line = 0;
  // cp.async: copies issued since the last commit, and committed groups, oldest first.
  std::vector<CpCopy> open;
  std::vector<std::vector<CpCopy>> groups;
  // Warp collective in progress: kind, mask, parameters, per-lane inputs and outputs.
  int op = 0;
  unsigned mask = 0;
  int arg = 0, width = 0, bytes = 0;
  uint32_t in[10];
  uint32_t out[4];
};

// Shadow of one byte of shared memory.
struct Cell {
  uint32_t w_bar, w_wsync;  // epochs of the last write (block barriers, its warp's syncs)
  uint32_t r_bar, r_wsync;  // epochs of the reads since (r_wsync: the latest of them)
  uint16_t w_tid, r_tid;    // last writer; the reader, or kManyReaders
  int16_t r_warp;           // warp of every reader, or -1 if they span warps
  uint8_t flags;            // kWritten, kRead, kPending
};
constexpr uint8_t kWritten = 1, kRead = 2, kPending = 4;
constexpr uint16_t kManyReaders = 0xffff;

// Bytes left unregistered around each shared allocation: an access that lands there is
// reported as running off that allocation.
constexpr size_t kSharedMargin = 256;

// One shared-memory allocation of a block: the dynamic array, or a static __shared__ array.
struct Region {
  char* mem = nullptr;  // allocation (with an unregistered margin around the region)
  char* base = nullptr;
  size_t bytes = 0;
  uint32_t addr = 0;          // first shared-window address
  const void* key = nullptr;  // the declaration (one per template instantiation); null: dynamic
  const char* file = nullptr;
  int line = 0;  // 0 for the dynamic array
  std::vector<Cell> shadow;
};

// A tensor (or workspace) of the current C call, with the shadow of the launch in progress:
// per byte, the block that wrote it (kAtomic set for atomics) and the block that read it
// (kManyBlocks when several did); 0 = none. Blocks are numbered from 1.
struct GlobalRange {
  uintptr_t lo, hi;
  const char* name;
  uint64_t launch = 0;  // the launch the shadow belongs to
  std::vector<uint32_t> writer, reader;
};
constexpr uint32_t kAtomic = 0x80000000u, kManyBlocks = 0x7fffffffu;
enum class GlobalOp { kRead, kReadOnly, kWrite, kAtomic };

// One block being run.
struct Block {
  uint3 idx{0, 0, 0};
  uint32_t id = 0;  // linear block index + 1
  int nthreads = 0;
  std::vector<Thread>* threads = nullptr;
  std::vector<Region> regions;
  size_t shared_total = 0;
  uint32_t next_addr = 0;
  uint32_t bar = 0;             // completed __syncthreads
  std::vector<uint32_t> wsync;  // completed __syncwarp per warp
};

// The launch in progress on this OS thread.
struct Launch {
  uint64_t id = 0;
  const char* name = "";
  dim3 grid, block;
  size_t smem = 0;
  Entry entry = nullptr;
  const void* ctx = nullptr;
  bool failed = false;
  std::string report;
};

// Per-OS-thread executor state.
struct Executor {
  Launch* launch = nullptr;
  Block* block = nullptr;
  Thread* cur = nullptr;  // the emulated thread running now (nullptr in the scheduler)
  Fiber scheduler;
  std::vector<GlobalRange> globals;  // tensors of the current C call
};
Executor& exec();

// ---- checker.cpp ----
// Records a failure of the running launch (the first one is kept) and, when called on a
// fiber, abandons the block: the thread never resumes.
[[gnu::format(printf, 1, 2)]] void fail(const char* fmt, ...);
void leave_block();  // switches the current fiber back to the scheduler for good
std::string where(const Thread* t);
void reset_shadow(Region& r);
// A checked access of `bytes` bytes at `p` by the current thread (kernel body only).
void check_access(const void* p, size_t bytes, bool write);
// The region and byte offset of a shared-window address range; fails if outside one.
Region* resolve_shared(uint32_t addr, size_t bytes, size_t* offset);
void shared_access(Region& r, size_t off, size_t bytes, bool write, const Thread& t);
void check_global(const void* p, size_t bytes, GlobalOp op, const char* what);
// cp.async bookkeeping on the shadow.
void mark_pending(Region& r, size_t off, size_t bytes, const Thread& t);
void land_copy(const CpCopy& c, const Thread& t);

}  // namespace emu
}  // namespace llada
