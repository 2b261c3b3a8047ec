"""The kernel benchmark cases, shared by ``test_bench_kernels.py`` (pytest-benchmark) and
``bench_kernels_cpu.py`` (the plain script that writes ``results/kernels_<device>.{json,md}``).

Each case builds its inputs once and offers one callable per implementation: ours first, then
the plain-torch baseline the target is stated against, then optional extra baselines
(``torch.compile``, Liger, Cut Cross-Entropy) when they are available. The work of a case
(FLOPs or bytes) is fixed by its shapes, so every implementation is credited the same work and
TFLOP/s or GB/s ratios equal speed ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from bench_common import dtype_name, torch_remask_step

import llada_ext as lx

# shapes of the issue
REMASK_SHAPE = {"B": 4, "W": 256, "V": 126464, "prompt": 64, "k": 4}
CE_SHAPE = {"N": 4096, "V": 32000, "mask_ratio": 0.5}
ATTN_SHAPE = {"B": 1, "H": 8, "S": 1024, "D": 64}


@dataclass
class Impl:
    """One implementation of a case: a no-argument callable doing the whole timed unit."""

    name: str
    fn: Callable[[], Any]


@dataclass
class Case:
    """A benchmark case: inputs built once, implementations, work and target.

    ``target`` is the minimum speed of ``impls[0]`` relative to the impl named ``baseline``
    (time_baseline / time_ours); e.g. 5.0 = "at least 5x faster", 1/1.5 = "no slower than
    1.5x the baseline".
    """

    key: str
    title: str
    device: torch.device
    impls: list[Impl]
    baseline: str
    work: float
    unit: str  # "TFLOP/s" or "GB/s"
    peak_key: str
    target: Optional[float]
    target_text: str
    shape: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)

    def rate(self, seconds: float) -> float:
        """TFLOP/s or GB/s achieved when the case takes ``seconds``."""
        scale = 1e12 if self.unit == "TFLOP/s" else 1e9
        return self.work / seconds / scale


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------
# remask
# ---------------------------------------------------------------------------------------


def build_remask(device: torch.device) -> Case:
    """One remasking step over a fully masked window (a block's first step: every position
    is a candidate, so the kernel must read every logits row, like the reference)."""
    s = REMASK_SHAPE
    B, W, V, P = s["B"], s["W"], s["V"], s["prompt"]
    g = _gen(device, 1)
    logits = torch.randn(B, W, V, device=device, generator=g)
    mask_id = V - 1
    x = torch.full((B, P + W), mask_id, dtype=torch.int64, device=device)
    x[:, :P] = torch.randint(0, V - 1, (B, P), device=device, generator=g)
    nt = torch.full((B,), s["k"], dtype=torch.int64, device=device)
    impls = [
        Impl("lx.remask", lambda: lx.remask(logits, x, nt, mask_id=mask_id, offset=P)),
        Impl(
            "torch reference step",
            lambda: torch_remask_step(logits, x, nt, mask_id=mask_id, offset=P),
        ),
    ]
    return Case(
        key="remask",
        title=f"remask B={B} W={W} V={V} float32 (logits read once)",
        device=device,
        impls=impls,
        baseline="torch reference step",
        work=float(B * W * V * 4),
        unit="GB/s",
        peak_key="copy_gbps",
        target=5.0 if device.type == "cpu" else None,
        target_text=">= 5x the torch step" if device.type == "cpu" else "(no target stated)",
        shape=dict(s),
    )


# ---------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------


def _ce_all_rows(logits: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits, t, reduction="none") * w).sum()


def _fwd_bwd(leaf: torch.Tensor, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        leaf.grad = None
        loss_fn().backward()

    return run


def _optional_ce_baselines(
    device: torch.device,
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    with_compile: bool,
) -> tuple[list[Impl], dict[str, str]]:
    """The torch.compile'd and the Liger cross-entropy, each where it can run (already run
    once, so compiling is not timed); the others by name with the reason."""
    impls: list[Impl] = []
    skipped: dict[str, str] = {}
    if with_compile:
        try:
            compiled = torch.compile(_ce_all_rows, dynamic=False)
            run = _fwd_bwd(logits, lambda: compiled(logits, targets, weights))
            run()  # compile now, outside any timing
            impls.append(Impl("torch.compile(F.cross_entropy)", run))
        except Exception as e:  # noqa: BLE001 - any compile failure just drops this baseline
            skipped["torch.compile(F.cross_entropy)"] = f"{type(e).__name__}: {e}"[:200]
    else:
        skipped["torch.compile(F.cross_entropy)"] = "disabled (--no-compile)"
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        if device.type != "cuda":
            raise RuntimeError("Liger kernels are Triton (CUDA) only")
        liger = LigerCrossEntropyLoss(reduction="none")
        run = _fwd_bwd(logits, lambda: (liger(logits, targets) * weights).sum())
        run()
        impls.append(Impl("Liger cross-entropy", run))
    except Exception as e:  # noqa: BLE001
        skipped["Liger cross-entropy"] = f"{type(e).__name__}: {e}"[:200]
    return impls, skipped


def build_masked_ce(device: torch.device, *, with_compile: bool = True) -> Case:
    """Weighted masked CE forward + backward, half the rows masked (weight 1/t)."""
    s = CE_SHAPE
    N, V, r = s["N"], s["V"], s["mask_ratio"]
    g = _gen(device, 2)
    logits = torch.randn(N, V, device=device, generator=g).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    masked = torch.rand(N, device=device, generator=g) < r
    weights = masked.float() / r
    n_masked = int(masked.sum())
    impls = [
        Impl(
            "lx.masked_cross_entropy",
            _fwd_bwd(logits, lambda: lx.masked_cross_entropy(logits, targets, weights)),
        ),
        Impl(
            "F.cross_entropy (all rows)",
            _fwd_bwd(logits, lambda: _ce_all_rows(logits, targets, weights)),
        ),
    ]
    extra, skipped = _optional_ce_baselines(device, logits, targets, weights, with_compile)
    # effective traffic of the masked computation: read the masked rows forward and backward,
    # write the whole gradient (zeros in unmasked rows)
    work = float((2 * n_masked + N) * V * 4)
    return Case(
        key="masked_ce",
        title=f"masked CE fwd+bwd N={N} V={V} float32, mask ratio {r}",
        device=device,
        impls=impls + extra,
        baseline="F.cross_entropy (all rows)",
        work=work,
        unit="GB/s",
        peak_key="copy_gbps",
        target=1.8 if device.type == "cpu" else None,
        target_text=">= 1.8x F.cross_entropy" if device.type == "cpu" else "(no target stated)",
        shape=dict(s, masked_rows=n_masked),
        skipped=skipped,
    )


def build_linear_ce(device: torch.device) -> Optional[Case]:
    """Fused LM head + masked CE vs Cut Cross-Entropy, only when ``cut_cross_entropy`` is
    importable and a GPU is present (it is a Triton kernel)."""
    if device.type != "cuda":
        return None
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:  # noqa: BLE001
        return None
    N, d, V, r = 4096, 2048, 126464, 0.5
    g = _gen(device, 5)
    hidden = (torch.randn(N, d, device=device, generator=g) / math.sqrt(d)).to(torch.bfloat16)
    weight = torch.randn(V, d, device=device, generator=g).to(torch.bfloat16)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    masked = torch.rand(N, device=device, generator=g) < r
    weights = masked.float() / r

    def ours() -> None:
        hidden.grad = weight.grad = None
        lx.linear_masked_cross_entropy(hidden, weight, targets, weights).backward()

    def cce() -> None:
        hidden.grad = weight.grad = None
        loss = linear_cross_entropy(hidden, weight, targets, reduction="none")
        (loss.float() * weights).sum().backward()

    n_masked = int(masked.sum())
    return Case(
        key="linear_ce",
        title=f"LM head + masked CE fwd+bwd N={N} d={d} V={V} bfloat16",
        device=device,
        impls=[Impl("lx.linear_masked_cross_entropy", ours), Impl("Cut Cross-Entropy", cce)],
        baseline="Cut Cross-Entropy",
        work=float(2 * 3 * n_masked * d * V),
        unit="TFLOP/s",
        peak_key="matmul_tflops_bfloat16",
        target=None,
        target_text="(no target stated)",
        shape={"N": N, "d": d, "V": V, "mask_ratio": r, "masked_rows": n_masked},
    )


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------


def _attn_dtype(device: torch.device) -> torch.dtype:
    # the CPU kernel's main dtype is float32; the CUDA kernel runs float16/bfloat16
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def build_attention(device: torch.device, backward: bool) -> Case:
    """Non-causal attention, lx.attention ([B, S, H, D]) vs SDPA on its native [B, H, S, D]."""
    s = ATTN_SHAPE
    B, H, S, D = s["B"], s["H"], s["S"], s["D"]
    dtype = _attn_dtype(device)
    g = _gen(device, 3)
    q, k, v = (torch.randn(B, S, H, D, device=device, generator=g).to(dtype) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    fwd_flops = 4.0 * B * H * S * S * D
    if not backward:
        impls = [
            Impl("lx.attention", lambda: lx.attention(q, k, v)),
            Impl("torch SDPA", lambda: F.scaled_dot_product_attention(qt, kt, vt)),
        ]
        work, what = fwd_flops, "forward"
    else:
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        leaves_t = [t.requires_grad_(True) for t in (qt, kt, vt)]
        dout = torch.randn(B, S, H, D, device=device, generator=g).to(dtype)
        dout_t = dout.transpose(1, 2).contiguous()

        def ours() -> None:
            for t in leaves:
                t.grad = None
            lx.attention(q, k, v).backward(dout)

        def sdpa() -> None:
            for t in leaves_t:
                t.grad = None
            F.scaled_dot_product_attention(qt, kt, vt).backward(dout_t)

        impls = [Impl("lx.attention", ours), Impl("torch SDPA", sdpa)]
        # the usual accounting: backward = 2.5x forward (5 matmuls incl. the recomputed scores)
        work, what = 3.5 * fwd_flops, "forward+backward"
    fwd_only = not backward and device.type == "cpu"
    return Case(
        key="attention_fwd_bwd" if backward else "attention_fwd",
        title=f"attention {what} B={B} H={H} S={S} D={D} {dtype_name(dtype)}",
        device=device,
        impls=impls,
        baseline="torch SDPA",
        work=work,
        unit="TFLOP/s",
        peak_key=f"matmul_tflops_{dtype_name(dtype)}",
        target=1 / 1.5 if fwd_only else None,
        target_text="no slower than 1.5x SDPA" if fwd_only else "(recorded, no target)",
        shape=dict(s, dtype=dtype_name(dtype)),
    )


BUILDERS: dict[str, Callable[..., Optional[Case]]] = {
    "remask": build_remask,
    "masked_ce": build_masked_ce,
    "attention_fwd": lambda dev: build_attention(dev, backward=False),
    "attention_fwd_bwd": lambda dev: build_attention(dev, backward=True),
    "linear_ce": build_linear_ce,
}


def devices() -> list[torch.device]:
    """CPU always; CUDA when torch sees a GPU and the extension has its CUDA kernels."""
    out = [torch.device("cpu")]
    if torch.cuda.is_available() and lx.has_cuda_kernels():
        out.append(torch.device("cuda"))
    return out
