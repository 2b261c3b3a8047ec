"""The steps of :func:`llada_ext.generate`, each callable (and tested) on its own.

Loop control, on the host, once per block or per step:

- :func:`get_num_transfer_tokens`: the schedule, tokens to unmask per row at each step of a
  block;
- :func:`window_start`: where a block's window starts (an earlier position that is still
  masked joins it, as in the reference);
- :func:`needs_full_pass`: the cache refresh rule;
- :func:`block_done`: the early block exit of ``threshold`` / ``factor``;
- :func:`answers_end_in_eos`: the ``eos_early_stop`` test.

One sampling step, on the device, methods of :class:`SamplerState` (no host synchronisation,
fixed shapes, so :class:`~llada_ext.sampling.SamplerGraphs` can record them):

- the window's logits: :meth:`~SamplerState.forward_window` (no cache),
  :meth:`~SamplerState.refresh_cache` then :meth:`~SamplerState.cached_window` (full pass
  into the key/value cache), or :meth:`~SamplerState.forward_cached` (against the cache);
- :meth:`~SamplerState.remask`: predict, score and unmask the window's tokens in the canvas;
- :meth:`~SamplerState.step`: one of the three forwards, then the remask, through the
  runner's units.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..model import KVCache
from .graphs import SamplerGraphs
from .options import SamplerOptions
from .select import DEMOTED, select_transfer

__all__ = [
    "SamplerState",
    "answers_end_in_eos",
    "block_done",
    "get_num_transfer_tokens",
    "needs_full_pass",
    "window_start",
]

_REMASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Logits = tuple[Tensor, "Tensor | None"]


# ------------------------------------------------------------------------------------------
# loop control
# ------------------------------------------------------------------------------------------
def get_num_transfer_tokens(block_mask: Tensor, steps: int) -> Tensor:
    """Per-row number of tokens to unmask at each step of a block.

    Parameters
    ----------
    block_mask : Tensor
        bool [B, W], True where the block is masked.
    steps : int
        Steps for this block.

    Returns
    -------
    Tensor
        int64 [B, steps]: ``m // steps`` everywhere plus one in the first ``m % steps``
        steps, where ``m`` is the row's number of masks (the public LLaDA schedule).
    """
    mask_num = block_mask.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    step_idx = torch.arange(steps, device=block_mask.device)[None, :]
    return (base + (step_idx < remainder).to(base.dtype)).to(torch.int64)


def window_start(x: Tensor, plen: int, start: int, mask_id: int) -> int:
    """First position of the window of the block that starts at ``start``.

    A position whose prediction was the mask token itself stays masked. The reference keeps
    every mask left of the block end a candidate, so such a leftover of an earlier block joins
    the window of the later blocks (the schedule still counts the block's masks only).

    Parameters
    ----------
    x : Tensor
        int64 [B, L], the canvas.
    plen : int
        Prompt length (the answer starts there).
    start : int
        The block's first position.
    mask_id : int
        The mask token id.

    Returns
    -------
    int
        The first answer position before ``start`` that is masked in some row, else
        ``start``. Reads one device value (almost never a leftover for a trained model).
    """
    if start == plen:
        return start  # the first block: no answer position before it
    left = (x[:, plen:start] == mask_id).any(dim=0)
    if bool(left.any()):
        return plen + int(left.int().argmax())
    return start


def needs_full_pass(step: int, cache_refresh: int | None) -> bool:
    """Whether step ``step`` (0-based, within a block) runs the full pass that refills the
    key/value cache: the block's first step, and every ``cache_refresh``-th step if given."""
    return step == 0 or (cache_refresh is not None and step % cache_refresh == 0)


def block_done(x: Tensor, lo: int, end: int, mask_id: int) -> bool:
    """True when no row of ``x[:, lo:end]`` (int64 [B, L]) holds ``mask_id`` any more: a
    threshold / factor rule finished the block before its last scheduled step."""
    return not bool((x[:, lo:end] == mask_id).any())


def answers_end_in_eos(x: Tensor, plen: int, end: int, eos_id: int) -> bool:
    """The ``eos_early_stop`` test after the block that ends at ``end``.

    Parameters
    ----------
    x : Tensor
        int64 [B, L], the canvas.
    plen : int
        Prompt length.
    end : int
        End (exclusive) of the finished block.
    eos_id : int
        The EOS id.

    Returns
    -------
    bool
        True when every row's answer so far, ``x[:, plen:end]``, holds an EOS followed only by
        EOS up to ``end``.
    """
    answer = x[:, plen:end]
    is_eos = answer == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), answer.shape[1])
    return bool((has_eos & (is_eos.sum(dim=1) == answer.shape[1] - first)).all())


# ------------------------------------------------------------------------------------------
# one step
# ------------------------------------------------------------------------------------------
class SamplerState:
    """One generation's canvas, its static buffers and the step units that act on them.

    Make one with :meth:`begin`. The buffers live in ``runner.static`` so that recorded CUDA
    graphs read and write them at fixed addresses: ``x`` int64 [B, L] (the canvas, prompt
    then answer), ``nt`` int64 [B] (this step's scheduled count), ``zero`` int64 [B] (zeros),
    ``prompt_index`` bool [B, L] (with CFG) and ``model_mask`` [B or 2B, L] (with an
    attention mask). The key/value cache and the full pass's hidden states are kept in
    ``runner.state``.
    """

    def __init__(self, model: torch.nn.Module, opts: SamplerOptions, runner: SamplerGraphs):
        self.model = model
        self.o = opts
        self.runner = runner
        s = runner.static
        self.x, self.nt, self.zero = s["x"], s["nt"], s["zero"]
        self.prompt_index = s.get("prompt_index")
        self.model_mask = s.get("model_mask")
        self.batch = self.x.shape[0]
        # a recorded unit would freeze the Philox seed / the torch.rand draw: with random
        # draws the selection runs after the unit, eagerly
        self.select_in_unit = not (runner.freezes_randomness and opts.random_draws)

    @classmethod
    def begin(
        cls,
        model: torch.nn.Module,
        opts: SamplerOptions,
        runner: SamplerGraphs,
        prompt: Tensor,
        model_mask: Tensor | None,
        gen_length: int,
        block_length: int,
    ) -> SamplerState:
        """Prepare the runner's buffers and write the starting canvas.

        Parameters
        ----------
        model, opts, runner
            The mask predictor, the checked settings and the unit runner.
        prompt : Tensor
            int64 [B, P] on the model's device.
        model_mask : Tensor, optional
            [B, P + gen_length], 1 on real tokens (see :func:`check_prompt`).
        gen_length, block_length : int
            Answer and block lengths (part of the runner's key).

        Returns
        -------
        SamplerState
            With ``x`` = the prompt followed by ``gen_length`` masks.
        """
        batch, plen = prompt.shape
        total = plen + gen_length
        shapes = {
            "x": ((batch, total), torch.int64),
            "nt": ((batch,), torch.int64),
            "zero": ((batch,), torch.int64),
        }
        if opts.use_cfg:
            shapes["prompt_index"] = ((batch, total), torch.bool)
        if model_mask is not None:
            rows = 2 * batch if opts.use_cfg else batch
            shapes["model_mask"] = ((rows, total), model_mask.dtype)
        shape_key = tuple(shapes.items())
        key = (batch, plen, gen_length, block_length, opts.key(), shape_key, id(model))
        runner.prepare(key, shapes, prompt.device)
        static = runner.static
        static["x"].fill_(opts.mask_id)
        static["x"][:, :plen] = prompt
        static["zero"].zero_()
        if opts.use_cfg:
            # as in the reference: everything that is not a mask at the start counts as
            # prompt, padding included, and the unconditional pass masks all of it
            static["prompt_index"].copy_(static["x"] != opts.mask_id)
        if model_mask is not None:
            both = torch.cat([model_mask, model_mask]) if opts.use_cfg else model_mask
            static["model_mask"].copy_(both)
        return cls(model, opts, runner)

    # -- the window's logits -----------------------------------------------------------------
    def inputs(self, lo: int, hi: int) -> Tensor:
        """Model input for ``x[:, lo:hi]``: int64 [B, hi - lo], or [2B, hi - lo] with CFG
        (the unconditional copy has the prompt masked)."""
        xs = self.x[:, lo:hi]
        if self.o.use_cfg:
            un = torch.where(self.prompt_index[:, lo:hi], self.o.mask_id, xs)
            return torch.cat([xs, un], dim=0)
        return xs

    def split(self, logits: Tensor) -> Logits:
        """Conditional and unconditional logits [B, W, V] (None without CFG) from the model's
        output for :meth:`inputs`; float32 unless already a remask dtype."""
        if logits.dtype not in _REMASK_DTYPES:
            logits = logits.float()
        cond, uncond = logits, None
        if self.o.use_cfg:
            cond, uncond = logits[: self.batch], logits[self.batch :]
        if self.o.forbid_eos:
            # on the conditional logits only: u + (cfg + 1)(-inf - u) = -inf, while -inf on
            # both halves would give NaN
            cond[..., self.o.eos_id] = float("-inf")
        return cond, uncond

    def head(self, hidden: Tensor) -> Logits:
        """:meth:`split` of the LM head on hidden states [B or 2B, W, d]."""
        return self.split(self.model.lm_head(hidden))

    def forward_window(self, start: int, end: int) -> Logits:
        """No cache: the whole sequence through the model, the LM head on ``[start, end)``
        only when the model exposes its hidden states; logits [B, end - start, V]."""
        total = self.x.shape[1]
        if self.o.has_hidden:
            hidden = self.model.forward_hidden(self.inputs(0, total), self.model_mask)
            return self.head(hidden[:, start:end])
        out = self.model(self.inputs(0, total), attention_mask=self.model_mask).logits
        return self.split(out[:, start:end])

    def full_pass(self) -> tuple[Tensor, KVCache]:
        """The whole sequence with a fresh key/value cache: hidden states [B or 2B, L, d]
        and the cache (every layer's keys after RoPE and values)."""
        kv = KVCache()
        hidden = self.model.forward_hidden(
            self.inputs(0, self.x.shape[1]), self.model_mask, kv_cache=kv
        )
        return hidden, kv

    def refresh_cache(self) -> None:
        """Run :meth:`full_pass` as the shared ``("full",)`` unit; keep its outputs in
        ``runner.state`` for :meth:`cached_window` and :meth:`forward_cached`."""
        state = self.runner.state
        state["hidden"], state["kv"] = self.runner.run(("full",), self.full_pass, persistent=True)

    def cached_window(self, start: int, end: int) -> Logits:
        """Logits of ``[start, end)`` from the last full pass's hidden states."""
        return self.head(self.runner.state["hidden"][:, start:end])

    def forward_cached(self, start: int, end: int) -> Logits:
        """Logits of ``[start, end)``, recomputing only ``x[:, start:]`` (prefix cache) or
        the window (dual cache) against the cached keys and values of the rest."""
        hi = self.x.shape[1] if self.o.cache == "prefix" else end
        hidden = self.model.forward_hidden(
            self.inputs(start, hi),
            self.model_mask,
            kv_cache=self.runner.state["kv"],
            cache_start=start,
        )
        return self.head(hidden[:, : end - start])

    # -- selection ---------------------------------------------------------------------------
    def remask(self, cond: Tensor, uncond: Tensor | None, start: int, end: int) -> Tensor:
        """Unmask this step's tokens of the window ``[start, end)`` in ``x``.

        Parameters
        ----------
        cond, uncond : Tensor
            Logits [B, end - start, V] of the window (``uncond`` None without CFG).
        start, end : int
            The window.

        Returns
        -------
        Tensor
            float32 [B, end - start], the confidences (-inf at non-candidates).
        """
        from llada_ext.ops import remask_

        o = self.o
        common = dict(
            mask_id=o.mask_id,
            offset=start,
            temperature=o.temperature,
            generator=o.generator,
            uncond_logits=uncond,
            cfg_scale=o.cfg_scale,
            return_details=True,
        )
        if not o.torch_select:
            _, _, conf = remask_(
                cond, self.x, self.nt, strategy=o.remasking, threshold=o.threshold, **common
            )
            return conf
        strategy = "low_confidence" if o.torch_random else o.remasking
        # k = 0: predictions and confidences only, x is left as it is
        _, x0, conf = remask_(cond, self.x, self.zero, strategy=strategy, **common)
        return self._select_in_torch(cond, uncond, x0, conf, start, end)

    def _select_in_torch(
        self, cond: Tensor, uncond: Tensor | None, x0: Tensor, conf: Tensor, start: int, end: int
    ) -> Tensor:
        o = self.o
        window = self.x[:, start:end]
        candidates = window == o.mask_id
        if o.torch_random:
            conf = torch.where(candidates, self._torch_rand()[:, start:end], float("-inf"))
        if o.zero_eos_confidence:
            ends = (x0 == o.eos_id) | (x0 == o.eot_id)
            if o.remasking == "low_confidence":
                conf = self._without_end_tokens(cond, uncond, x0, conf)
            conf = torch.where(candidates & ends, DEMOTED, conf)
        take = select_transfer(conf, self.nt, threshold=o.threshold, factor=o.factor)
        window.copy_(torch.where(take, x0, window))
        return conf

    def _torch_rand(self) -> Tensor:
        """The reference's random confidences: ``torch.rand`` over the whole sequence."""
        gen = self.o.generator
        shape = (self.batch, self.x.shape[1])
        if gen is None:
            return torch.rand(shape, device=self.x.device)
        return torch.rand(shape, generator=gen, device=gen.device).to(self.x.device)

    def _without_end_tokens(
        self, cond: Tensor, uncond: Tensor | None, x0: Tensor, conf: Tensor
    ) -> Tensor:
        """``softmax(l)[x0]`` renormalised over the vocabulary without EOS and EoT.

        With ``p = conf = softmax(l)[x0]``, ``p_e = p * exp(l_e - l_x0)`` for an end token e,
        so only three logit columns per position are read, not the vocabulary.
        """
        o = self.o
        ends = sorted({o.eos_id, o.eot_id})
        cols = torch.cat(
            [x0[..., None], torch.tensor(ends, device=x0.device).expand(*x0.shape, len(ends))],
            dim=-1,
        )
        picked = cond.gather(-1, cols).float()
        if uncond is not None:
            u = uncond.gather(-1, cols).float()
            picked = u + (o.cfg_scale + 1.0) * (picked - u)
        rel = torch.exp(picked[..., 1:] - picked[..., :1]).sum(dim=-1)
        rest = (1.0 - conf * rel).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(conf > float("-inf"), conf / rest, conf)

    # -- the step ----------------------------------------------------------------------------
    def _unit(self, logits: Logits, start: int, end: int) -> Any:
        # a unit ends with the selection unless it must run eagerly after it
        if self.select_in_unit:
            return self.remask(logits[0], logits[1], start, end)
        return logits

    def step(self, nb: int, start: int, end: int, num_transfer: Tensor, full: bool) -> Tensor:
        """One sampling step of block ``nb`` over the window ``[start, end)``.

        Parameters
        ----------
        nb : int
            Block index (part of the unit keys).
        start, end : int
            The window: the block, or from an earlier still-masked position to the block end.
        num_transfer : Tensor
            int64 [B], the scheduled count of this step.
        full : bool
            With a cache: run the full pass first (see :func:`needs_full_pass`).

        Returns
        -------
        Tensor
            float32 [B, end - start], the step's confidences (-inf at non-candidates).
        """
        self.nt.copy_(num_transfer)
        run = self.runner.run
        if self.o.cache == "none":
            unit = ("step", nb, start)
            out = run(unit, lambda: self._unit(self.forward_window(start, end), start, end))
        elif full:
            self.refresh_cache()
            unit = ("head", nb, start)
            out = run(unit, lambda: self._unit(self.cached_window(start, end), start, end))
        else:
            unit = ("slice", nb, start)
            out = run(unit, lambda: self._unit(self.forward_cached(start, end), start, end))
        if self.select_in_unit:
            return out
        return self.remask(out[0], out[1], start, end)
