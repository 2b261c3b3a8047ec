// Fibers for the CPU executor: one stack and saved context per emulated CUDA thread, switched
// cooperatively on one OS thread. On x86-64 the switch is a few instructions (callee-saved
// registers, MXCSR and the x87 control word); elsewhere it falls back to ucontext.
#pragma once

#include <stddef.h>
#include <stdint.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace llada {
namespace emu {

struct FiberStack {
  char* lo = nullptr;  // lowest usable byte (a guard page sits below it)
  char* hi = nullptr;  // one past the highest byte
};

// Allocates `bytes` of stack with a PROT_NONE guard page below it; aborts if out of memory.
FiberStack fiber_stack_alloc(size_t bytes);
void fiber_stack_free(FiberStack s);

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
};

// Prepares `f` to run fn(arg) on `stack` when first switched to. fn must never return.
void fiber_init(Fiber* f, FiberStack stack, void (*fn)(void*), void* arg);
// Saves the running context into `from` and resumes `to`.
void fiber_switch(Fiber* from, Fiber* to);

}  // namespace emu
}  // namespace llada
