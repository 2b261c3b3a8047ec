"""Model set-up of the throughput benchmark: the models of one preset, the public LLaDA
sampling loop (the reference path), and one runner per (method, tokens per step) of a grid
point.

The AR twin, the LLaDA model (and the Hugging Face Llama when ``hf`` is asked for) are in
memory together, so every method of a grid point can be timed in the same rounds
(``throughput_measure.py``). Weights are random: at a fixed number of tokens per step the
speed does not depend on them.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ar_baseline import (  # noqa: E402
    ARDecoder,
    ARModel,
    build_ar_model,
    default_dtype,
    hf_baseline,
    hf_generate,
    weight_bytes_per_step,
)

from llada_ext.model import LLaDAConfig, LLaDAModel  # noqa: E402
from llada_ext.sampling import SamplerGraphs, generate, get_num_transfer_tokens  # noqa: E402

AR_METHODS = ("ar", "ar-eager", "hf")
DIFFUSION_METHODS = (
    "diffusion-none",
    "diffusion-prefix",
    "diffusion-dual",
    "diffusion-none-graphs",
    "diffusion-prefix-graphs",
    "diffusion-dual-graphs",
    "reference",
)
# the AR method the ratios are taken against: the first of these that was measured
AR_BASELINES = ("ar", "ar-eager")


# ---------------------------------------------------------------------------------------
# the reference sampler (public LLaDA generate.py, temperature 0, no CFG)
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def reference_generate(
    model: LLaDAModel,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_id: int,
) -> torch.Tensor:
    """The public LLaDA sampling loop written in plain torch (the "reference path").

    Parameters
    ----------
    model : LLaDAModel
        Any model returning ``.logits`` [B, L, V].
    prompt : Tensor
        int64 [B, P].
    steps, gen_length, block_length : int
        As in :func:`llada_ext.generate`.
    mask_id : int
        The mask token id.

    Returns
    -------
    Tensor
        int64 [B, P + gen_length].
    """
    b, plen = prompt.shape
    x = torch.full((b, plen + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :plen] = prompt
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        start, end = plen + nb * block_length, plen + (nb + 1) * block_length
        num_transfer = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(x).logits
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            ks = num_transfer[:, i].tolist()
            for j in range(b):
                _, select = torch.topk(confidence[j], k=int(ks[j]))
                transfer[j, select] = True
            x[transfer] = x0[transfer]
    return x


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------


def build_llada(
    cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> LLaDAModel:
    """Random-weight LLaDA model allocated directly in ``dtype`` on ``device``."""
    with default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        model = LLaDAModel(cfg, backend="kernels")
    return model.eval().requires_grad_(False)


@dataclass
class Models:
    """Every model the methods of one preset need, in memory together."""

    name: str
    cfg: LLaDAConfig
    llada: Optional[LLaDAModel] = None
    ar: Optional[ARModel] = None
    decoders: dict[str, ARDecoder] = field(default_factory=dict)
    hf: Any = None
    hf_why: str = ""
    weight_bytes: int = 0  # read per step; the AR twin and LLaDA have the same sizes


def build_models(
    name: str, methods: list[str], device: torch.device, dtype: torch.dtype, compile_ar: bool
) -> Models:
    """The models of preset ``name`` that ``methods`` use (``compile_ar``: the ``ar``
    method's step through ``torch.compile(mode="reduce-overhead")``)."""
    cfg = LLaDAConfig.preset(name)
    ms = Models(name, cfg)
    if any(m in DIFFUSION_METHODS for m in methods):
        ms.llada = build_llada(cfg, device, dtype)
        ms.weight_bytes = weight_bytes_per_step(ms.llada, cfg.vocab_size, cfg.d_model)
    if "ar" in methods or "ar-eager" in methods:
        ms.ar = build_ar_model(cfg, device, dtype)
        ms.weight_bytes = weight_bytes_per_step(ms.ar, cfg.vocab_size, cfg.d_model)
        if "ar" in methods:
            ms.decoders["ar"] = ARDecoder(ms.ar, compile=compile_ar)
        if "ar-eager" in methods:
            ms.decoders["ar-eager"] = ARDecoder(ms.ar, compile=False)
    if "hf" in methods:
        try:
            ms.hf, ms.hf_why = hf_baseline(cfg, device, dtype)
        except Exception as e:  # noqa: BLE001 - an incompatible transformers version
            ms.hf, ms.hf_why = None, f"{type(e).__name__}: {e}"[:160]
        if ms.hf is not None and not ms.weight_bytes:
            ms.weight_bytes = weight_bytes_per_step(ms.hf, cfg.vocab_size, cfg.d_model)
    return ms


# ---------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One method at one number of tokens per step, ready to be warmed up and timed."""

    method: str
    k: int
    steps: int
    run: Callable[[], Any]  # the timed call: a whole generation
    warmup: Callable[[], Any]  # untimed, first (records the CUDA graphs of a graphs runner)
    extra: dict[str, Any] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None  # frees what the runner holds (graphs)
    check: Optional[Callable[[Any], bool]] = None  # graphs: same tokens as the eager sampler?
    last: Any = None  # the output of the last timed call

    @property
    def name(self) -> str:
        return f"{self.method} k={self.k}"

    def call(self) -> None:
        self.last = self.run()


def point_runners(
    ms: Models,
    methods: list[str],
    prompt: torch.Tensor,
    gen: int,
    ks: list[int],
    block_length: int,
    capture_graphs: bool,
) -> tuple[list[Runner], list[tuple[str, int, int, str]]]:
    """Runners for every method (AR ones at k = 1, diffusion ones at every k of ``ks`` that
    divides ``block_length``), and (method, k, steps, reason) for those that cannot run.

    ``capture_graphs`` False runs the ``-graphs`` methods through the same static buffers
    without recording (a CPU test of their logic); the benchmark passes True on CUDA only.
    """
    runners: list[Runner] = []
    skipped: list[tuple[str, int, int, str]] = []
    for mt in (m for m in methods if m in AR_METHODS):
        if mt == "hf":
            if ms.hf is None:
                skipped.append(("hf", 1, gen, f"skipped: {ms.hf_why}"))
                continue
            run = functools.partial(hf_generate, ms.hf, prompt, gen)
            runners.append(Runner("hf", 1, gen, run, run, {"compiled": False}))
            continue
        dec = ms.decoders[mt]
        run = functools.partial(dec.generate, prompt, gen)
        extra = {"compiled": dec.compiled, "cuda_graphs": dec.compiled and prompt.is_cuda}
        runners.append(Runner(mt, 1, gen, run, run, extra))
    if gen % block_length:
        return runners, skipped
    for k in ks:
        if block_length % k:
            continue
        for mt in (m for m in methods if m in DIFFUSION_METHODS):
            assert ms.llada is not None
            runners.append(
                diffusion_runner(ms.llada, mt, prompt, gen, k, block_length, capture_graphs)
            )
    return runners, skipped


def diffusion_runner(
    model: LLaDAModel,
    method: str,
    prompt: torch.Tensor,
    gen: int,
    k: int,
    block_length: int,
    capture_graphs: bool,
) -> Runner:
    """A runner for ``method`` (``diffusion-<cache>[-graphs]`` or ``reference``) at ``k``
    tokens per step. Eager paths warm up on one block; a graphs runner on a full generation,
    which records its graphs (replayed by the timed calls)."""
    mask_id = model.config.mask_token_id
    full = {"gen_length": gen, "steps": gen // k, "block_length": block_length}
    short = {"gen_length": block_length, "steps": block_length // k, "block_length": block_length}
    if method == "reference":

        def ref(kw: dict[str, int]) -> torch.Tensor:
            model.backend = "torch"
            try:
                return reference_generate(model, prompt, mask_id=mask_id, **kw)
            finally:
                model.backend = "kernels"

        extra = {"backend": "torch (SDPA)", "remask": "torch step", "cache": "none"}
        return Runner(
            method,
            k,
            gen // k,
            functools.partial(ref, full),
            functools.partial(ref, short),
            {**extra, "cuda_graphs": False},
        )
    cache = method.split("-")[1]

    def eager(kw: dict[str, int]) -> torch.Tensor:
        model.backend = "kernels"
        return generate(model, prompt, cache=cache, **kw)

    extra = {"backend": "kernels", "remask": "lx.remask", "cache": cache}
    if not method.endswith("-graphs"):
        run, warm = functools.partial(eager, full), functools.partial(eager, short)
        return Runner(method, k, gen // k, run, warm, {**extra, "cuda_graphs": False})
    graphs = SamplerGraphs(capture=capture_graphs)

    def replay() -> torch.Tensor:
        model.backend = "kernels"
        return generate(model, prompt, cache=cache, cuda_graphs=graphs, **full)

    return Runner(
        method,
        k,
        gen // k,
        replay,
        replay,
        {**extra, "cuda_graphs": capture_graphs},
        release=graphs.release,
        check=lambda out: bool(torch.equal(out, eager(full))),
    )
