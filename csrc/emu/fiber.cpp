#include "emu/fiber.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

namespace llada {
namespace emu {

FiberStack fiber_stack_alloc(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  bytes = (bytes + page - 1) / page * page;
  void* p = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    fprintf(stderr, "llada-emu: cannot map %zu bytes of fiber stack\n", bytes);
    abort();
  }
  mprotect(p, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
  FiberStack s;
  s.lo = static_cast<char*>(p) + page;
  s.hi = s.lo + bytes;
  return s;
}

void fiber_stack_free(FiberStack s) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  munmap(s.lo - page, static_cast<size_t>(s.hi - s.lo) + page);
}

#if defined(__x86_64__)

extern "C" void llada_emu_switch(void** save_sp, void* new_sp);

// llada_emu_switch(save_sp, new_sp): push the callee-saved registers and the floating-point
// control words, store rsp in *save_sp, load new_sp and pop the same frame there.
// llada_emu_fiber_start: the first "return address" of a new fiber; calls r13(r12).
asm(R"(
  .text
  .globl llada_emu_switch
  .hidden llada_emu_switch
  .type llada_emu_switch, @function
llada_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size llada_emu_switch, .-llada_emu_switch

  .globl llada_emu_fiber_start
  .hidden llada_emu_fiber_start
  .type llada_emu_fiber_start, @function
llada_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size llada_emu_fiber_start, .-llada_emu_fiber_start
)");

extern "C" void llada_emu_fiber_start();

void fiber_init(Fiber* f, FiberStack stack, void (*fn)(void*), void* arg) {
  const uintptr_t top = reinterpret_cast<uintptr_t>(stack.hi) & ~static_cast<uintptr_t>(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 64);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  sp[1] = 0;                                                   // r15
  sp[2] = 0;                                                   // r14
  sp[3] = reinterpret_cast<uint64_t>(fn);                      // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);                     // r12
  sp[5] = 0;                                                   // rbx
  sp[6] = 0;                                                   // rbp
  sp[7] = reinterpret_cast<uint64_t>(&llada_emu_fiber_start);  // return address
  // After the pops and the return, rsp == top: 16-byte aligned at the call, as the ABI wants.
  f->sp = sp;
}

void fiber_switch(Fiber* from, Fiber* to) {
  llada_emu_switch(&from->sp, to->sp);
}

#else  // ucontext fallback

void fiber_init(Fiber* f, FiberStack stack, void (*fn)(void*), void* arg) {
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = stack.lo;
  f->ctx.uc_stack.ss_size = static_cast<size_t>(stack.hi - stack.lo);
  f->ctx.uc_link = nullptr;
  // makecontext passes int arguments: split the pointer in two.
  const uintptr_t a = reinterpret_cast<uintptr_t>(arg);
  static void (*s_fn)(void*);
  s_fn = fn;
  makecontext(&f->ctx, reinterpret_cast<void (*)()>(+[](unsigned lo, unsigned hi) {
    s_fn(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
  }),
              2, static_cast<unsigned>(a), static_cast<unsigned>(a >> 32));
}

void fiber_switch(Fiber* from, Fiber* to) {
  swapcontext(&from->ctx, &to->ctx);
}

#endif

}  // namespace emu
}  // namespace llada
