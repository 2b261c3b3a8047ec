// llada_ext._C: a thin pybind11 layer over the C ABI. Each tensor argument arrives as a
// tuple (data_ptr, dtype, device_type, device_id, shape, strides) built by llada_ext/_views.py
// (from a torch tensor or any DLPack array); this file only converts and forwards, releasing
// the GIL while the kernel runs. Failures become Python exceptions carrying
// llada_last_error(): ValueError for bad arguments, TypeError for unsupported dtypes,
// RuntimeError otherwise.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "llada/llada.h"

namespace py = pybind11;

namespace {

llada_tensor to_view(const py::tuple& t, const char* name) {
  if (t.size() != 6) throw py::value_error(std::string(name) + ": expected a 6-tuple tensor view");
  llada_tensor v{};
  v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
  v.dtype = t[1].cast<int32_t>();
  v.device_type = t[2].cast<int32_t>();
  v.device_id = t[3].cast<int32_t>();
  const auto shape = t[4].cast<std::vector<int64_t>>();
  const auto strides = t[5].cast<std::vector<int64_t>>();
  if (shape.size() > LLADA_MAX_DIMS || shape.size() != strides.size())
    throw py::value_error(std::string(name) + ": bad shape/strides");
  v.ndim = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    v.shape[i] = shape[i];
    v.strides[i] = strides[i];
  }
  return v;
}

struct OptView {
  llada_tensor view{};
  bool present = false;
  OptView(const std::optional<py::tuple>& t, const char* name) {
    if (t) {
      view = to_view(*t, name);
      present = true;
    }
  }
  const llada_tensor* ptr() const { return present ? &view : nullptr; }
  llada_tensor* mut() { return present ? &view : nullptr; }
};

void check(llada_status s) {
  if (s == LLADA_OK) return;
  std::string msg = llada_last_error();
  if (msg.empty()) msg = llada_status_string(s);
  switch (s) {
    case LLADA_ERROR_INVALID_ARGUMENT:
    case LLADA_ERROR_DEVICE_MISMATCH:
    case LLADA_ERROR_INSUFFICIENT_WORKSPACE: throw py::value_error(msg);
    case LLADA_ERROR_UNSUPPORTED_DTYPE: throw py::type_error(msg);
    default: throw std::runtime_error(msg);
  }
}

void* as_stream(uintptr_t s) {
  return reinterpret_cast<void*>(s);
}

}  // namespace

#if defined(LLADA_EMU)
#include "cuda/remask_acc.cuh"

namespace llada {
namespace emu {
std::vector<std::string> selftest_names();
std::pair<std::string, std::vector<float>> selftest(const std::string& name);

// The CUDA remask's float pre-test of a Gumbel key (remask_acc.cuh), compiled for the host:
// would a token of logit l, whose uniform starts with Philox word `word`, be skipped
// against the best key `key` at temperature T?
bool remask_gumbel_pretest(float l, uint32_t word, double key, float temperature) {
  cuda::ThreadAcc<true> acc;
  acc.init();
  acc.key = key;
  acc.idx = 0;
  return acc.cannot_win(l, word, 1.f / temperature);
}
}  // namespace emu
}  // namespace llada
#endif

#ifndef LLADA_PY_MODULE
#define LLADA_PY_MODULE _C
#endif

// How this module and its kernel library were built: compile definitions that CMake sets on
// this file when it configures (CMakeLists.txt, "the build description"). The defaults are
// for a build of this file outside that project.
#ifndef LLADA_BUILD_COMMIT
#define LLADA_BUILD_COMMIT "unknown"
#endif
#ifndef LLADA_BUILD_COMPILER
#define LLADA_BUILD_COMPILER "unknown"
#endif
#ifndef LLADA_BUILD_CUDA_TOOLKIT
#define LLADA_BUILD_CUDA_TOOLKIT ""
#endif
#ifndef LLADA_BUILD_CUDA_ARCHS
#define LLADA_BUILD_CUDA_ARCHS ""
#endif
#ifndef LLADA_BUILD_OPENMP
#define LLADA_BUILD_OPENMP 0
#endif
#ifndef LLADA_BUILD_OPENMP_VERSION
#define LLADA_BUILD_OPENMP_VERSION 0
#endif

PYBIND11_MODULE(LLADA_PY_MODULE, m) {
  m.doc() = "llada kernel library: thin bindings over the C ABI (csrc/include/llada/llada.h)";
  m.attr("VERSION") = LLADA_VERSION;
  m.def("version", &llada_version);
  m.def("has_cuda", []() { return llada_has_cuda() != 0; });
  m.def(
      "cuda_status",
      []() {
        const llada_status s = llada_cuda_status();
        return py::make_tuple(s == LLADA_OK, std::string(s == LLADA_OK ? "" : llada_last_error()));
      },
      "(True, '') when the CUDA kernels can run here, else (False, the runtime's reason).");
  m.def("blas_info", []() { return std::string(llada_blas_info()); });
  m.def(
      "build_config",
      []() {
        py::dict d;
        d["commit"] = std::string(LLADA_BUILD_COMMIT);
        d["compiler"] = std::string(LLADA_BUILD_COMPILER);
        d["cuda_toolkit"] = std::string(LLADA_BUILD_CUDA_TOOLKIT);
        d["cuda_archs"] = std::string(LLADA_BUILD_CUDA_ARCHS);
        d["openmp"] = LLADA_BUILD_OPENMP != 0;
        d["openmp_version"] = static_cast<int>(LLADA_BUILD_OPENMP_VERSION);
        return d;
      },
      "How the build was configured: commit, compiler, CUDA toolkit and archs (empty strings "
      "without CUDA), OpenMP and its _OPENMP value (0 without OpenMP).");

  m.def(
      "attention_fwd",
      [](py::tuple q, py::tuple k, py::tuple v, std::optional<py::tuple> mask, float scale,
         py::tuple out, py::tuple lse, uintptr_t stream, uintptr_t workspace,
         size_t workspace_bytes) {
        llada_tensor vq = to_view(q, "q"), vk = to_view(k, "k"), vv = to_view(v, "v");
        OptView vm(mask, "key_padding_mask");
        llada_tensor vo = to_view(out, "out"), vl = to_view(lse, "lse");
        llada_status s;
        {
          py::gil_scoped_release nogil;
          s = llada_attention_fwd_ws(&vq, &vk, &vv, vm.ptr(), scale, &vo, &vl,
                                     reinterpret_cast<void*>(workspace), workspace_bytes,
                                     as_stream(stream));
        }
        check(s);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("scale"),
      py::arg("out"), py::arg("lse"), py::arg("stream") = 0, py::arg("workspace") = 0,
      py::arg("workspace_bytes") = 0);

  m.def("attention_fwd_workspace_size", [](py::tuple q, py::tuple k) {
    llada_tensor vq = to_view(q, "q"), vk = to_view(k, "k");
    size_t bytes = 0;
    check(llada_attention_fwd_workspace_size(&vq, &vk, &bytes));
    return bytes;
  });

  m.def("attention_bwd_workspace_size", [](py::tuple q, py::tuple k) {
    llada_tensor vq = to_view(q, "q"), vk = to_view(k, "k");
    size_t bytes = 0;
    check(llada_attention_bwd_workspace_size(&vq, &vk, &bytes));
    return bytes;
  });

  m.def(
      "attention_bwd",
      [](py::tuple q, py::tuple k, py::tuple v, std::optional<py::tuple> mask, py::tuple out,
         py::tuple dout, py::tuple lse, float scale, py::tuple dq, py::tuple dk, py::tuple dv,
         uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
        llada_tensor vq = to_view(q, "q"), vk = to_view(k, "k"), vv = to_view(v, "v");
        OptView vm(mask, "key_padding_mask");
        llada_tensor vo = to_view(out, "out"), vdo = to_view(dout, "dout"),
                     vl = to_view(lse, "lse");
        llada_tensor vdq = to_view(dq, "dq"), vdk = to_view(dk, "dk"), vdv = to_view(dv, "dv");
        llada_status s;
        {
          py::gil_scoped_release nogil;
          s = llada_attention_bwd(&vq, &vk, &vv, vm.ptr(), &vo, &vdo, &vl, scale, &vdq, &vdk, &vdv,
                                  reinterpret_cast<void*>(workspace), workspace_bytes,
                                  as_stream(stream));
        }
        check(s);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("out"),
      py::arg("dout"), py::arg("lse"), py::arg("scale"), py::arg("dq"), py::arg("dk"),
      py::arg("dv"), py::arg("workspace") = 0, py::arg("workspace_bytes") = 0,
      py::arg("stream") = 0);

  m.def(
      "masked_ce_fwd",
      [](py::tuple logits, py::tuple targets, py::tuple weights, py::tuple loss,
         std::optional<py::tuple> lse, uintptr_t stream) {
        llada_tensor vl = to_view(logits, "logits"), vt = to_view(targets, "targets"),
                     vw = to_view(weights, "weights"), vloss = to_view(loss, "loss");
        OptView vlse(lse, "lse");
        llada_status s;
        {
          py::gil_scoped_release nogil;
          s = llada_masked_ce_fwd(&vl, &vt, &vw, &vloss, vlse.mut(), as_stream(stream));
        }
        check(s);
      },
      py::arg("logits"), py::arg("targets"), py::arg("weights"), py::arg("loss"), py::arg("lse"),
      py::arg("stream") = 0);

  m.def(
      "masked_ce_bwd",
      [](py::tuple logits, py::tuple targets, py::tuple weights, py::tuple lse, py::tuple grad_loss,
         py::tuple grad_logits, uintptr_t stream) {
        llada_tensor vl = to_view(logits, "logits"), vt = to_view(targets, "targets"),
                     vw = to_view(weights, "weights"), vlse = to_view(lse, "lse"),
                     vg = to_view(grad_loss, "grad_loss"),
                     vgl = to_view(grad_logits, "grad_logits");
        llada_status s;
        {
          py::gil_scoped_release nogil;
          s = llada_masked_ce_bwd(&vl, &vt, &vw, &vlse, &vg, &vgl, as_stream(stream));
        }
        check(s);
      },
      py::arg("logits"), py::arg("targets"), py::arg("weights"), py::arg("lse"),
      py::arg("grad_loss"), py::arg("grad_logits"), py::arg("stream") = 0);

  m.def("remask_workspace_size", [](py::tuple logits, py::tuple x) {
    llada_tensor vl = to_view(logits, "logits"), vx = to_view(x, "x");
    size_t bytes = 0;
    check(llada_remask_workspace_size(&vl, &vx, &bytes));
    return bytes;
  });

  m.def(
      "remask",
      [](py::tuple logits, std::optional<py::tuple> uncond, py::tuple x, py::tuple num_transfer,
         int64_t mask_id, int64_t offset, int32_t strategy, bool has_threshold, float threshold,
         float temperature, float cfg_scale, uint64_t seed, py::tuple x_out, py::tuple x0,
         py::tuple confidence, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
        llada_tensor vl = to_view(logits, "logits");
        OptView vu(uncond, "uncond_logits");
        llada_tensor vx = to_view(x, "x"), vnt = to_view(num_transfer, "num_transfer"),
                     vxo = to_view(x_out, "x_out"), vx0 = to_view(x0, "x0"),
                     vc = to_view(confidence, "confidence");
        llada_remask_params p{};
        p.mask_id = mask_id;
        p.offset = offset;
        p.strategy = strategy;
        p.has_threshold = has_threshold ? 1 : 0;
        p.threshold = threshold;
        p.temperature = temperature;
        p.cfg_scale = cfg_scale;
        p.seed = seed;
        llada_status s;
        {
          py::gil_scoped_release nogil;
          s = llada_remask(&vl, vu.ptr(), &vx, &vnt, &p, &vxo, &vx0, &vc,
                           reinterpret_cast<void*>(workspace), workspace_bytes, as_stream(stream));
        }
        check(s);
      },
      py::arg("logits"), py::arg("uncond_logits"), py::arg("x"), py::arg("num_transfer"),
      py::arg("mask_id"), py::arg("offset"), py::arg("strategy"), py::arg("has_threshold"),
      py::arg("threshold"), py::arg("temperature"), py::arg("cfg_scale"), py::arg("seed"),
      py::arg("x_out"), py::arg("x0"), py::arg("confidence"), py::arg("workspace") = 0,
      py::arg("workspace_bytes") = 0, py::arg("stream") = 0);

#if defined(LLADA_EMU)
  // The executor's own checks, each tripped by a deliberately broken kernel (csrc/emu).
  m.def("selftest_names", &llada::emu::selftest_names);
  m.def("selftest", &llada::emu::selftest, py::arg("name"),
        "Runs one self-test kernel: (the executor's report or '', the kernel's output).");
  m.def("remask_gumbel_pretest", &llada::emu::remask_gumbel_pretest, py::arg("l"), py::arg("word"),
        py::arg("key"), py::arg("temperature"),
        "The CUDA remask's float pre-test: True if the token is skipped as a sure loser.");
#endif
}
