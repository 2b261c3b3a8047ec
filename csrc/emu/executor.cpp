// The CPU executor of the CUDA kernels: runs a grid block by block; the threads of a block
// are fibers (emu/fiber.h) that a round-robin scheduler resumes until each blocks at a
// barrier or a warp collective, or exits.
//   __syncthreads  completes when every thread of the block waits at it, all at one source
//                  line; threads at other lines, or that exited first, are reported as barrier
//                  divergence (with where each thread waits) instead of hanging.
//   warp collectives (__syncwarp, shuffles, ldmatrix, mma.sync) complete when every live lane
//                  of the mask has arrived at the same instruction with the same mask; exited
//                  lanes are left out (ldmatrix and mma.sync need all 32), a lane waiting
//                  elsewhere is reported.
//   cp.async       copies are held per thread, grouped at each commit, and land in shared
//                  memory when a cp.async.wait_group lets their group complete; until then
//                  the checker reports any access to their bytes.
// Memory accesses are checked by checker.cpp. Fragment maps come from emu/lane_maps.h.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "emu/lane_maps.h"
#include "emu/state.h"

namespace llada {
namespace emu {

namespace {

constexpr size_t kStackBytes = 256 * 1024;

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;
// cudaFuncSetAttribute limits, per kernel, shared by every host thread (as on a device).
std::mutex g_attr_mutex;
std::map<const void*, int> g_max_dynamic_shared;

void set_max_dynamic_shared(const void* func, int value) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  g_max_dynamic_shared[func] = value;
}

int max_dynamic_shared(const void* func) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  auto it = g_max_dynamic_shared.find(func);
  return it == g_max_dynamic_shared.end() ? kDefaultSharedBytes : it->second;
}

struct StackPool {
  std::vector<FiberStack> stacks;
  ~StackPool() {
    for (FiberStack& s : stacks) fiber_stack_free(s);
  }
  FiberStack get(size_t i) {
    while (stacks.size() <= i) stacks.push_back(fiber_stack_alloc(kStackBytes));
    return stacks[i];
  }
};
thread_local StackPool t_stacks;

Thread& current() {
  Thread* t = exec().cur;
  if (t == nullptr) {
    fprintf(stderr, "llada-emu: a device function was called outside a kernel\n");
    abort();
  }
  return *t;
}

void fiber_main(void* /*thread*/) {
  const Launch& l = *exec().launch;
  l.entry(l.ctx);
  leave_block();
}

bool complete_after_exits(Block& b);  // below, with the warp collectives

// Switches from the current fiber to the scheduler until this thread is runnable again.
void block_here() {
  Executor& ex = exec();
  Thread* t = ex.cur;
  ex.cur = nullptr;
  fiber_switch(&t->fiber, &ex.scheduler);
  ex.cur = t;
}

Region& add_region(Block& b, size_t bytes, const char* file, int line) {
  b.shared_total += bytes;
  const size_t limit = static_cast<size_t>(kMaxSharedBytesOptin);  // static + dynamic, per block
  if (b.shared_total > limit) {
    fail("the block uses %zu bytes of shared memory, more than the device's %zu", b.shared_total,
         limit);
  }
  Region r;
  r.mem = static_cast<char*>(malloc(bytes + 2 * kSharedMargin));
  r.base = r.mem + kSharedMargin;
  r.bytes = bytes;
  r.addr = b.next_addr;
  r.file = file;
  r.line = line;
  b.next_addr += static_cast<uint32_t>((bytes + 1023) / 1024 * 1024 + 1024);
  reset_shadow(r);
  b.regions.push_back(std::move(r));
  return b.regions.back();
}

void free_regions(Block& b) {
  for (Region& r : b.regions) free(r.mem);
  b.regions.clear();
}

std::string waits_summary(const Block& b) {
  std::map<std::string, int> sites;
  for (int i = 0; i < b.nthreads; ++i) {
    const Thread& t = (*b.threads)[i];
    if (t.state == ThreadState::kExited) {
      sites["exited"]++;
      continue;
    }
    char buf[300];
    snprintf(buf, sizeof(buf), "%s at %s:%d",
             t.state == ThreadState::kBarrier ? "__syncthreads" : "a warp collective", t.wait_file,
             t.wait_line);
    sites[buf]++;
  }
  std::string s;
  for (const auto& kv : sites) {
    if (!s.empty()) s += "; ";
    s += std::to_string(kv.second) + " thread(s) " + kv.first;
  }
  return s;
}

// Completes the barrier if every thread of the block waits at it. A thread that exited
// before it never will: __syncthreads must be reached by the whole block (the CUDA
// programming guide), so that is reported like any other divergence.
void try_release_barrier(Block& b) {
  const char* file = nullptr;
  int line = 0;
  int exited = 0;
  for (int i = 0; i < b.nthreads; ++i) {
    const Thread& t = (*b.threads)[i];
    if (t.state == ThreadState::kExited) {
      ++exited;
      continue;
    }
    if (t.state != ThreadState::kBarrier) return;
    if (file == nullptr) {
      file = t.wait_file;
      line = t.wait_line;
    } else if (line != t.wait_line || strcmp(file, t.wait_file) != 0) {
      fail("barrier divergence: threads wait at different __syncthreads (%s)",
           waits_summary(b).c_str());
      return;
    }
  }
  if (file == nullptr) return;
  if (exited > 0) {
    fail(
        "barrier divergence: threads wait at the __syncthreads of %s:%d that exited threads "
        "never reach (%s)",
        file, line, waits_summary(b).c_str());
    return;
  }
  ++b.bar;
  for (int i = 0; i < b.nthreads; ++i) {
    Thread& t = (*b.threads)[i];
    if (t.state == ThreadState::kBarrier) t.state = ThreadState::kRunnable;
  }
}

void run_block(Launch& l, Block& b, std::vector<Thread>& threads) {
  Executor& ex = exec();
  ex.block = &b;
  b.bar = 0;
  b.wsync.assign((b.nthreads + 31) / 32, 0);
  b.shared_total = 0;
  b.next_addr = 0x1000;
  if (l.smem > 0) add_region(b, l.smem, nullptr, 0);
  for (int i = 0; i < b.nthreads; ++i) {
    Thread& t = threads[i];
    t.tid = i;
    t.idx = uint3{static_cast<unsigned>(i % l.block.x),
                  static_cast<unsigned>((i / l.block.x) % l.block.y),
                  static_cast<unsigned>(i / (l.block.x * l.block.y))};
    t.state = ThreadState::kRunnable;
    t.in_body = false;
    t.open.clear();
    t.groups.clear();
    t.stack = t_stacks.get(i);
    fiber_init(&t.fiber, t.stack, &fiber_main, &t);
  }
  for (;;) {
    bool ran = false;
    for (int i = 0; i < b.nthreads && !l.failed; ++i) {
      Thread& t = threads[i];
      if (t.state != ThreadState::kRunnable) continue;
      ran = true;
      ex.cur = &t;
      fiber_switch(&ex.scheduler, &t.fiber);
      ex.cur = nullptr;
    }
    if (l.failed) break;
    if (ran) continue;
    bool all_exited = true;
    for (int i = 0; i < b.nthreads; ++i) all_exited &= threads[i].state == ThreadState::kExited;
    if (all_exited) break;
    try_release_barrier(b);
    if (!l.failed) complete_after_exits(b);
    bool runnable = false;
    for (int i = 0; i < b.nthreads; ++i) runnable |= threads[i].state == ThreadState::kRunnable;
    if (l.failed) break;
    if (!runnable) {
      fail("deadlock (barrier or warp divergence): %s", waits_summary(b).c_str());
      break;
    }
  }
  free_regions(b);
  ex.block = nullptr;
}

cudaError_t config_error(const std::string& msg) {
  t_last_error = cudaErrorInvalidConfiguration;
  t_last_message = "llada-emu: " + msg;
  return t_last_error;
}

// ---- warp collectives ------------------------------------------------------------------

uint16_t b16(const char* p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}

float to_f32(uint16_t v, bool bf16) {
  return bf16 ? bf16_to_float(v) : fp16_to_float(v);
}

void complete_ldmatrix(Thread* lanes[32]) {
  const int count = lanes[0]->arg;
  const bool trans = lanes[0]->width != 0;
  uint16_t m[4][8][8];
  for (int mat = 0; mat < count; ++mat) {
    for (int row = 0; row < 8; ++row) {
      Thread& src = *lanes[ldmatrix_row_lane(mat, row)];
      const uint32_t addr = src.in[0];
      if (addr % 16 != 0)
        fail("ldmatrix row address 0x%x of lane %d is not 16-byte aligned", addr, src.tid % 32);
      size_t off = 0;
      Region* r = resolve_shared(addr, 16, &off);
      shared_access(*r, off, 16, false, src);
      for (int c = 0; c < 8; ++c) m[mat][row][c] = b16(r->base + off + 2 * c);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int mat = 0; mat < count; ++mat) {
      uint32_t reg = 0;
      for (int h = 0; h < 2; ++h) {
        const RowCol rc = ldmatrix_dst_elem(lane, h, trans);
        reg |= static_cast<uint32_t>(m[mat][rc.row][rc.col]) << (16 * h);
      }
      lanes[lane]->out[mat] = reg;
    }
  }
}

void complete_mma(Thread* lanes[32]) {
  const bool bf16 = lanes[0]->arg != 0;
  double A[16][16], B[16][8];
  float C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* in = lanes[lane]->in;
    for (int reg = 0; reg < 4; ++reg) {
      for (int h = 0; h < 2; ++h) {
        const RowCol rc = mma_a_elem(lane, reg, h);
        A[rc.row][rc.col] = to_f32(static_cast<uint16_t>(in[reg] >> (16 * h)), bf16);
      }
    }
    for (int reg = 0; reg < 2; ++reg) {
      for (int h = 0; h < 2; ++h) {
        const RowCol rc = mma_b_elem(lane, reg, h);
        B[rc.row][rc.col] = to_f32(static_cast<uint16_t>(in[4 + reg] >> (16 * h)), bf16);
      }
    }
    for (int reg = 0; reg < 4; ++reg) {
      const RowCol rc = mma_c_elem(lane, reg);
      memcpy(&C[rc.row][rc.col], &in[6 + reg], 4);
    }
  }
  // Products of 16-bit floats are exact in double; the sum is rounded to float once.
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg) {
      const RowCol rc = mma_c_elem(lane, reg);
      double acc = C[rc.row][rc.col];
      for (int k = 0; k < 16; ++k) acc += A[rc.row][k] * B[k][rc.col];
      const float d = static_cast<float>(acc);
      memcpy(&lanes[lane]->out[reg], &d, 4);
    }
  }
}

void complete_shfl(Thread* lanes[32], unsigned mask) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    Thread& t = *lanes[lane];
    const int w = t.width;
    const int seg = lane & ~(w - 1);
    int src = lane;
    switch (t.op == kOpShfl ? t.bytes >> 8 : 0) {
      case kShflXor:  // a later segment cannot be read: the lane keeps its own value
        src = lane ^ t.arg;
        if (src >= seg + w) src = lane;
        break;
      case kShflIdx: src = seg + (t.arg & (w - 1)); break;
      case kShflDown: src = (lane - seg) + t.arg < w ? lane + t.arg : lane; break;
      case kShflUp: src = (lane - seg) - t.arg >= 0 ? lane - t.arg : lane; break;
      default: break;
    }
    if (src < 0 || src > 31 || !(mask >> src & 1u)) {
      fail("shuffle: lane %d reads lane %d, which is not in the mask 0x%x or has exited", lane, src,
           t.mask);
    }
    t.out[0] = lanes[src]->in[0];
    t.out[1] = lanes[src]->in[1];
  }
}

// Completes the collective lane `t` waits at once every live lane of its mask has arrived
// (lanes that exited are left out, as on the device: only non-exited threads named in the
// mask must take part). ldmatrix and mma.sync need all 32 lanes. Returns true if completed.
bool try_complete(Block& b, const Thread& t) {
  const int warp = t.tid / 32;
  const bool whole_warp = t.op == kOpLdmatrix || t.op == kOpMma;
  Thread* lanes[32] = {};
  unsigned live = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int tid = warp * 32 + lane;
    if (tid >= b.nthreads) continue;
    lanes[lane] = &(*b.threads)[tid];
    if (lanes[lane]->state != ThreadState::kExited) live |= 1u << lane;
  }
  for (int lane = 0; lane < 32; ++lane) {
    if (!(t.mask >> lane & 1u)) continue;
    if (lanes[lane] == nullptr) {
      fail("warp collective at %s:%d names lane %d, which the block does not have", t.wait_file,
           t.wait_line, lane);
      return false;
    }
    const Thread& o = *lanes[lane];
    if (o.state == ThreadState::kExited) {
      if (whole_warp) {
        fail("%s at %s:%d needs all 32 lanes, but lane %d has exited",
             t.op == kOpMma ? "mma.sync" : "ldmatrix", t.wait_file, t.wait_line, lane);
        return false;
      }
      continue;
    }
    if (o.state != ThreadState::kWarp) return false;
    // One instruction with one mask; a shuffle's source lane may differ from lane to lane.
    if (o.op != t.op || o.mask != t.mask || o.wait_line != t.wait_line ||
        strcmp(o.wait_file, t.wait_file) != 0 || (t.op != kOpShfl && o.arg != t.arg) ||
        o.width != t.width || o.bytes != t.bytes) {
      fail("warp divergence: lane %d is at a different collective (%s:%d) than lane %d (%s:%d)",
           lane, o.wait_file, o.wait_line, t.tid % 32, t.wait_file, t.wait_line);
      return false;
    }
  }
  const unsigned participants = t.mask & live;
  switch (t.op) {
    case kOpSyncwarp:
      // Orders memory only when every live lane takes part; a partial mask records nothing
      // (conservative: the checker then treats the lanes as unordered).
      if ((live & ~t.mask) == 0) ++b.wsync[warp];
      break;
    case kOpShfl: complete_shfl(lanes, participants); break;
    case kOpLdmatrix: complete_ldmatrix(lanes); break;
    case kOpMma: complete_mma(lanes); break;
    default: break;
  }
  for (int lane = 0; lane < 32; ++lane) {
    if (participants >> lane & 1u) lanes[lane]->state = ThreadState::kRunnable;
  }
  return true;
}

// Called by each arriving lane after it stored its inputs; returns when the collective is
// complete (the last lane to arrive computes it for every lane).
void warp_collective(int op, unsigned mask, const char* file, int line) {
  Thread& t = current();
  t.op = op;
  t.mask = mask;
  t.wait_file = file;
  t.wait_line = line;
  t.state = ThreadState::kWarp;
  if (!(mask >> (t.tid % 32) & 1u))
    fail("warp collective with a mask 0x%x that excludes the calling lane", mask);
  if (try_complete(*exec().block, t)) return;
  block_here();
}

// A lane that exits may complete a collective the rest of its mask waits at.
bool complete_after_exits(Block& b) {
  bool any = false;
  for (int i = 0; i < b.nthreads; ++i) {
    const Thread& t = (*b.threads)[i];
    if (t.state == ThreadState::kWarp && try_complete(b, t)) any = true;
  }
  return any;
}

}  // namespace

// ---- runtime API --------------------------------------------------------------------------

cudaError_t get_last_error() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (!t_last_message.empty()) return t_last_message.c_str();
  return "llada-emu: error";
}

cudaError_t func_set_attribute(const void* func, int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > kMaxSharedBytesOptin) {
    t_last_message = "llada-emu: cudaFuncSetAttribute: invalid attribute or value";
    return cudaErrorInvalidValue;
  }
  set_max_dynamic_shared(func, value);
  return cudaSuccess;
}

void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, Entry entry,
              const void* ctx) {
  const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
  char buf[256];
  if (nthreads < 1 || nthreads > kMaxThreadsPerBlock || block.z > 64) {
    snprintf(buf, sizeof(buf), "%s: invalid block (%u,%u,%u)", name, block.x, block.y, block.z);
    config_error(buf);
    return;
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u) {
    snprintf(buf, sizeof(buf), "%s: invalid grid (%u,%u,%u)", name, grid.x, grid.y, grid.z);
    config_error(buf);
    return;
  }
  const int allowed = max_dynamic_shared(kernel);
  if (smem > static_cast<size_t>(allowed)) {
    snprintf(buf, sizeof(buf),
             "%s: %zu bytes of dynamic shared memory requested, %d allowed (raise the limit "
             "with cudaFuncSetAttribute)",
             name, smem, allowed);
    config_error(buf);
    return;
  }
  Executor& ex = exec();
  static thread_local uint64_t launches = 0;
  Launch l;
  l.id = ++launches;
  l.name = name;
  l.grid = grid;
  l.block = block;
  l.smem = smem;
  l.entry = entry;
  l.ctx = ctx;
  ex.launch = &l;
  std::vector<Thread> threads(static_cast<size_t>(nthreads));
  Block b;
  b.nthreads = static_cast<int>(nthreads);
  b.threads = &threads;
  for (unsigned z = 0; z < grid.z && !l.failed; ++z) {
    for (unsigned y = 0; y < grid.y && !l.failed; ++y) {
      for (unsigned x = 0; x < grid.x && !l.failed; ++x) {
        b.idx = uint3{x, y, z};
        b.id = 1 + x + grid.x * (y + grid.y * z);
        run_block(l, b, threads);
      }
    }
  }
  ex.launch = nullptr;
  if (l.failed) {
    t_last_error = cudaErrorLaunchFailure;
    t_last_message = l.report;
  }
}

void begin_kernel_body() {
  current().in_body = true;
}

void end_kernel_body() {
  Thread& t = current();
  t.in_body = false;
  // Copies never waited for still land (nothing may read them: the thread is gone).
  for (const auto& g : t.groups)
    for (const CpCopy& c : g) land_copy(c, t);
  for (const CpCopy& c : t.open) land_copy(c, t);
  t.groups.clear();
  t.open.clear();
}

uint3 thread_idx() {
  return current().idx;
}
uint3 block_idx() {
  return exec().block->idx;
}
dim3 block_dim() {
  return exec().launch->block;
}
dim3 grid_dim() {
  return exec().launch->grid;
}

void syncthreads(const char* file, int line) {
  Thread& t = current();
  t.state = ThreadState::kBarrier;
  t.wait_file = file;
  t.wait_line = line;
  block_here();
}

void syncwarp(unsigned mask, const char* file, int line) {
  Thread& t = current();
  t.arg = t.width = t.bytes = 0;
  warp_collective(kOpSyncwarp, mask, file, line);
}

uint64_t shfl(unsigned mask, uint64_t value, int bytes, int mode, int arg, int width,
              const char* file, int line) {
  Thread& t = current();
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width %d", width);
  t.in[0] = static_cast<uint32_t>(value);
  t.in[1] = static_cast<uint32_t>(value >> 32);
  t.arg = arg;
  t.width = width;
  t.bytes = bytes | (mode << 8);
  warp_collective(kOpShfl, mask, file, line);
  return static_cast<uint64_t>(t.out[0]) | (static_cast<uint64_t>(t.out[1]) << 32);
}

void* dynamic_shared() {
  Block& b = *exec().block;
  for (Region& r : b.regions)
    if (r.line == 0) return r.base;
  // No dynamic shared memory was requested: any access through this pointer is reported.
  return reinterpret_cast<void*>(16);
}

void* static_shared(size_t bytes, size_t align, const void* key, const char* file, int line) {
  Block& b = *exec().block;
  for (Region& r : b.regions)
    if (r.key == key) return r.base;
  Region& r = add_region(b, bytes, file, line);
  r.key = key;
  if (reinterpret_cast<uintptr_t>(r.base) % align != 0) fail("shared array misaligned");
  return r.base;
}

uint32_t shared_address(const void* p, const char* file, int line) {
  const char* a = static_cast<const char*>(p);
  for (const Region& r : exec().block->regions) {
    if (a >= r.base && a <= r.base + r.bytes) return r.addr + static_cast<uint32_t>(a - r.base);
  }
  fail("__cvta_generic_to_shared at %s:%d of %p, which is not shared memory", file, line, p);
  return 0;
}

void cp_async_16(uint32_t dst, const void* src, bool valid) {
  Thread& t = current();
  if (dst % 16 != 0) fail("cp.async destination 0x%x is not 16-byte aligned", dst);
  size_t off = 0;
  Region* r = resolve_shared(dst, 16, &off);
  CpCopy c;
  c.dst = dst;
  memset(c.data, 0, 16);
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0)
      fail("cp.async source %p is not 16-byte aligned", src);
    check_global(src, 16, GlobalOp::kRead, "cp.async source");
    memcpy(c.data, src, 16);
  }
  shared_access(*r, off, 16, true, t);  // the copy writes these bytes at some point from now
  mark_pending(*r, off, 16, t);
  t.open.push_back(c);
}

void cp_async_commit() {
  Thread& t = current();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

void cp_async_wait(int pending) {
  Thread& t = current();
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const CpCopy& c : t.groups.front()) land_copy(c, t);
    t.groups.erase(t.groups.begin());
  }
}

void ldmatrix(uint32_t* regs, int count, uint32_t addr, bool trans) {
  Thread& t = current();
  t.in[0] = addr;
  t.arg = count;
  t.width = trans ? 1 : 0;
  t.bytes = 0;
  warp_collective(kOpLdmatrix, 0xffffffffu, "ldmatrix", count * 2 + (trans ? 1 : 0));
  for (int i = 0; i < count; ++i) regs[i] = t.out[i];
}

void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16) {
  Thread& t = current();
  for (int i = 0; i < 4; ++i) t.in[i] = a[i];
  t.in[4] = b0;
  t.in[5] = b1;
  memcpy(&t.in[6], d, 16);
  t.arg = bf16 ? 1 : 0;
  t.width = 0;
  t.bytes = 0;
  warp_collective(kOpMma, 0xffffffffu, "mma.sync", 16816);
  memcpy(d, t.out, 16);
}

void read_only_load(const void* p, size_t bytes) {
  check_global(p, bytes, GlobalOp::kReadOnly, "__ldg");
}

float atomic_add(float* address, float value) {
  check_global(address, 4, GlobalOp::kAtomic, "atomicAdd");
  const float old = *address;
  *address = old + value;
  return old;
}

float2 atomic_add2(float2* address, float2 value) {
  // sm_90's vector atomicAdd: an 8-byte aligned pair, each half added atomically
  if (reinterpret_cast<uintptr_t>(address) % 8 != 0)
    fail("misaligned float2 atomicAdd at %p (8-byte alignment required)",
         static_cast<void*>(address));
  check_global(address, 8, GlobalOp::kAtomic, "atomicAdd(float2)");
  const float2 old = *address;
  *address = float2{old.x + value.x, old.y + value.y};
  return old;
}

}  // namespace emu
}  // namespace llada
