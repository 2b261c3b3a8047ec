// Memory checks of the CPU executor: every load and store of a kernel body is classified as
// a local (the thread's own stack), a shared-memory or a global access.
//   - Global: it must fall inside a tensor (or workspace) of the C call that launched the
//     kernel; anything else is an out-of-bounds access.
//   - Shared: it must fall inside one of the block's allocations, which have exactly their
//     declared size; and it is checked against a shadow byte by byte for
//       * races: conflicting accesses (one a write) by two threads with no __syncthreads
//         between them, nor a __syncwarp when both are lanes of one warp;
//       * reads of bytes nothing has written (the memory is poisoned with 0xff as well);
//       * accesses to bytes an in-flight cp.async (not yet waited for) fills.
//   - Global, within one launch: a byte one block writes must not be read or written by
//     another (nothing orders blocks; atomics may meet atomics), and a read-only (__ldg)
//     load must not read a byte the launch writes.
// The loads and stores reach these checks through the -fsanitize=thread instrumentation of
// the kernel translation units: this file defines the __tsan_* entry points the compiler
// calls, and no ThreadSanitizer runtime is linked.
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <utility>

#include "emu/state.h"

namespace llada {
namespace emu {

Executor& exec() {
  static thread_local Executor e;
  return e;
}

std::string where(const Thread* t) {
  const Executor& ex = exec();
  char buf[256];
  if (t == nullptr) {
    snprintf(buf, sizeof(buf), "kernel %s, block (%u,%u,%u)", ex.launch->name, ex.block->idx.x,
             ex.block->idx.y, ex.block->idx.z);
  } else {
    snprintf(buf, sizeof(buf), "kernel %s, block (%u,%u,%u), thread (%u,%u,%u) (warp %d lane %d)",
             ex.launch->name, ex.block->idx.x, ex.block->idx.y, ex.block->idx.z, t->idx.x, t->idx.y,
             t->idx.z, t->tid / 32, t->tid % 32);
  }
  return buf;
}

void leave_block() {
  Executor& ex = exec();
  Thread* t = ex.cur;
  if (t == nullptr) return;
  t->in_body = false;
  t->state = ThreadState::kExited;
  ex.cur = nullptr;
  fiber_switch(&t->fiber, &ex.scheduler);
  __builtin_unreachable();
}

void fail(const char* fmt, ...) {
  Executor& ex = exec();
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (!ex.launch->failed) {
    ex.launch->failed = true;
    ex.launch->report = "llada-emu: " + where(ex.cur) + ": " + msg;
    fprintf(stderr, "%s\n", ex.launch->report.c_str());
  }
  leave_block();
}

void reset_shadow(Region& r) {
  r.shadow.assign(r.bytes, Cell{0, 0, 0, 0, 0, 0, -1, 0});
  memset(r.base, 0xff, r.bytes);  // poison: NaN in every float type, -1 in every integer
}

namespace {

// True when the access (tid, bar, wsync) happens before anything the thread t does now.
inline bool ordered(uint16_t tid, uint32_t bar, uint32_t wsync, const Thread& t, const Block& b) {
  if (tid == t.tid) return true;
  if (bar < b.bar) return true;
  const int w = t.tid / 32;
  return tid / 32 == w && wsync < b.wsync[w];
}

const char* region_name(const Region& r) {
  static thread_local char buf[300];
  if (r.line == 0) return "the dynamic shared array";
  snprintf(buf, sizeof(buf), "the __shared__ array of %s:%d", r.file, r.line);
  return buf;
}

// "byte 12 (shared address 0x100c) of the dynamic shared array"
const char* shared_byte(const Region& r, size_t off) {
  static thread_local char buf[400];
  snprintf(buf, sizeof(buf), "byte %zu (shared address 0x%zx) of %s", off,
           static_cast<size_t>(r.addr) + off, region_name(r));
  return buf;
}

void race(const char* kind, const Region& r, size_t off, uint16_t other) {
  if (other == kManyReaders) {
    fail(
        "shared-memory race (%s) at %s: threads of several warps read it with no barrier "
        "before this write",
        kind, shared_byte(r, off));
  }
  fail(
      "shared-memory race (%s) at %s with thread %u (warp %u lane %u): no barrier between "
      "the two accesses",
      kind, shared_byte(r, off), other, other / 32, other % 32);
}

}  // namespace

void shared_access(Region& r, size_t off, size_t bytes, bool write, const Thread& t) {
  const Block& b = *exec().block;
  const int w = t.tid / 32;
  for (size_t i = off; i < off + bytes; ++i) {
    Cell& c = r.shadow[i];
    if (c.flags & kPending) {
      fail(
          "%s %s while a cp.async of thread %u that fills it is still in flight "
          "(no cp.async.wait_group has completed it)",
          write ? "writes" : "reads", shared_byte(r, i), c.w_tid);
    }
    if (write) {
      if ((c.flags & kWritten) && !ordered(c.w_tid, c.w_bar, c.w_wsync, t, b))
        race("write after write", r, i, c.w_tid);
      if ((c.flags & kRead) && c.r_bar == b.bar && c.r_tid != t.tid &&
          !(c.r_warp == w && c.r_wsync < b.wsync[w]))
        race("write after read", r, i, c.r_tid);
      c.w_tid = static_cast<uint16_t>(t.tid);
      c.w_bar = b.bar;
      c.w_wsync = b.wsync[w];
      c.flags = kWritten;
    } else {
      if (!(c.flags & kWritten))
        fail("reads %s, which nothing has written (uninitialised shared memory)",
             shared_byte(r, i));
      if (!ordered(c.w_tid, c.w_bar, c.w_wsync, t, b)) race("read after write", r, i, c.w_tid);
      // A new reader set starts at a barrier, or after a __syncwarp that ordered every
      // earlier reader (all of this warp) before this read.
      if (!(c.flags & kRead) || c.r_bar != b.bar || (c.r_warp == w && c.r_wsync < b.wsync[w])) {
        c.r_tid = static_cast<uint16_t>(t.tid);
        c.r_warp = static_cast<int16_t>(w);
        c.r_bar = b.bar;
        c.r_wsync = b.wsync[w];
        c.flags |= kRead;
      } else {
        if (c.r_tid != t.tid) c.r_tid = kManyReaders;
        if (c.r_warp != w) c.r_warp = -1;
        if (b.wsync[w] > c.r_wsync) c.r_wsync = b.wsync[w];
      }
    }
  }
}

void mark_pending(Region& r, size_t off, size_t bytes, const Thread& t) {
  for (size_t i = off; i < off + bytes; ++i) {
    r.shadow[i].flags |= kPending;
    r.shadow[i].w_tid = static_cast<uint16_t>(t.tid);
  }
}

void land_copy(const CpCopy& c, const Thread& t) {
  size_t off = 0;
  Region* r = resolve_shared(c.dst, 16, &off);
  const Block& b = *exec().block;
  for (size_t i = off; i < off + 16; ++i) {
    Cell& cell = r->shadow[i];
    cell.flags = kWritten;
    cell.w_tid = static_cast<uint16_t>(t.tid);
    cell.w_bar = b.bar;
    cell.w_wsync = b.wsync[t.tid / 32];
  }
  memcpy(r->base + off, c.data, 16);
}

Region* resolve_shared(uint32_t addr, size_t bytes, size_t* offset) {
  for (Region& r : exec().block->regions) {
    if (addr >= r.addr && addr < r.addr + r.bytes) {
      if (addr + bytes > r.addr + r.bytes) {
        fail("shared access of %zu bytes at offset %u of %s runs past its end (%zu bytes)", bytes,
             addr - r.addr, region_name(r), r.bytes);
      }
      *offset = addr - r.addr;
      return &r;
    }
  }
  fail("shared address 0x%x (%zu bytes) is outside every shared allocation of the block", addr,
       bytes);
  return nullptr;
}

namespace {

const char* op_name(GlobalOp op) {
  switch (op) {
    case GlobalOp::kRead: return "read";
    case GlobalOp::kReadOnly: return "read-only load";
    case GlobalOp::kWrite: return "write";
    default: return "atomic";
  }
}

// Orders global accesses between blocks: within one launch nothing orders two blocks, so a
// byte written by one block must not be read or written by another (atomics excepted among
// themselves), and a read-only (__ldg) load must not see a byte the launch writes.
void global_access(GlobalRange& g, size_t off, size_t bytes, GlobalOp op, const char* what) {
  const Executor& ex = exec();
  if (g.launch != ex.launch->id) {
    g.writer.assign(g.hi - g.lo, 0);
    g.reader.assign(g.hi - g.lo, 0);
    g.launch = ex.launch->id;
  }
  const uint32_t me = ex.block->id;
  for (size_t i = off; i < off + bytes; ++i) {
    const uint32_t w = g.writer[i], wb = w & ~kAtomic;
    const uint32_t r = g.reader[i];
    if (op == GlobalOp::kReadOnly && w != 0) {
      fail("%s: read-only load (__ldg) of byte %zu of '%s', which this launch writes", what, i,
           g.name);
    }
    if (w != 0 && wb != me && !(op == GlobalOp::kAtomic && (w & kAtomic))) {
      fail("%s: global race: %s of byte %zu of '%s', which block %u wrote in this launch", what,
           op_name(op), i, g.name, wb - 1);
    }
    if (op == GlobalOp::kWrite || op == GlobalOp::kAtomic) {
      if (r != 0 && r != me) {
        fail("%s: global race: %s of byte %zu of '%s', which %s read in this launch", what,
             op_name(op), i, g.name, r == kManyBlocks ? "other blocks" : "another block");
      }
      g.writer[i] = me | (op == GlobalOp::kAtomic ? kAtomic : 0u);
    } else {
      g.reader[i] = (r == 0 || r == me) ? me : kManyBlocks;
    }
  }
}

}  // namespace

void check_global(const void* p, size_t bytes, GlobalOp op, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const bool write = op == GlobalOp::kWrite || op == GlobalOp::kAtomic;
  const GlobalRange* near = nullptr;
  uintptr_t best = ~uintptr_t(0);
  for (GlobalRange& g : exec().globals) {
    if (a >= g.lo && a + bytes <= g.hi) {
      global_access(g, a - g.lo, bytes, op, what);
      return;
    }
    const uintptr_t d = a < g.lo ? g.lo - a : a - g.hi;
    if (d < best) {
      best = d;
      near = &g;
    }
  }
  if (near == nullptr) {
    fail("%s: %s of %zu bytes at %p, and the call passed no tensor", what, write ? "write" : "read",
         bytes, p);
  }
  const long long rel = static_cast<long long>(a) - static_cast<long long>(near->lo);
  fail("%s: out-of-bounds %s of %zu bytes at %p (byte %lld of '%s', which has %llu bytes)", what,
       write ? "write" : "read", bytes, p, rel, near->name,
       static_cast<unsigned long long>(near->hi - near->lo));
}

void check_access(const void* p, size_t bytes, bool write) {
  Executor& ex = exec();
  const Thread* t = ex.cur;
  const char* a = static_cast<const char*>(p);
  if (a >= t->stack.lo && a < t->stack.hi) return;  // the thread's own locals
  for (Region& r : ex.block->regions) {
    if (a >= r.base - kSharedMargin && a < r.base + r.bytes + kSharedMargin) {
      if (a < r.base || a + bytes > r.base + r.bytes) {
        fail("out-of-bounds %s of %zu bytes at byte %zd of %s, which has %zu bytes",
             write ? "write" : "read", bytes, a - r.base, region_name(r), r.bytes);
      }
      shared_access(r, static_cast<size_t>(a - r.base), bytes, write, *t);
      return;
    }
  }
  check_global(p, bytes, write ? GlobalOp::kWrite : GlobalOp::kRead, "global memory");
}

void begin_call() {
  exec().globals.clear();
}

void note_global(const void* base, size_t bytes, const char* name) {
  if (base == nullptr || bytes == 0) return;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(base);
  for (const GlobalRange& g : exec().globals)
    if (g.lo == lo && g.hi == lo + bytes) return;  // the same buffer twice (in-place calls)
  GlobalRange g;
  g.lo = lo;
  g.hi = lo + bytes;
  g.name = name;
  exec().globals.push_back(std::move(g));
}

}  // namespace emu
}  // namespace llada

// ---- the compiler's instrumentation entry points ------------------------------------------
namespace {
inline void hook(const void* p, size_t n, bool write) {
  llada::emu::Executor& ex = llada::emu::exec();
  if (ex.cur != nullptr && ex.cur->in_body) llada::emu::check_access(p, n, write);
}
}  // namespace

extern "C" {
#define LLADA_EMU_HOOKS(N)                           \
  void __tsan_read##N(void* p) {                     \
    hook(p, N, false);                               \
  }                                                  \
  void __tsan_write##N(void* p) {                    \
    hook(p, N, true);                                \
  }                                                  \
  void __tsan_unaligned_read##N(void* p) {           \
    hook(p, N, false);                               \
  }                                                  \
  void __tsan_unaligned_write##N(void* p) {          \
    hook(p, N, true);                                \
  }                                                  \
  void __tsan_volatile_read##N(void* p) {            \
    hook(p, N, false);                               \
  }                                                  \
  void __tsan_volatile_write##N(void* p) {           \
    hook(p, N, true);                                \
  }                                                  \
  void __tsan_unaligned_volatile_read##N(void* p) {  \
    hook(p, N, false);                               \
  }                                                  \
  void __tsan_unaligned_volatile_write##N(void* p) { \
    hook(p, N, true);                                \
  }
LLADA_EMU_HOOKS(1)
LLADA_EMU_HOOKS(2)
LLADA_EMU_HOOKS(4)
LLADA_EMU_HOOKS(8)
LLADA_EMU_HOOKS(16)
#undef LLADA_EMU_HOOKS
void __tsan_read_range(void* p, unsigned long n) {
  hook(p, n, false);
}
void __tsan_write_range(void* p, unsigned long n) {
  hook(p, n, true);
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_atomic_thread_fence(int) {}
void __tsan_atomic_signal_fence(int) {}
}
