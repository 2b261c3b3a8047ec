"""Answer lm-evaluation-harness requests with a LLaDA model, without ``lm_eval`` itself.

:class:`LLaDAEvalAdapter` holds a model and a tokenizer and answers the three request kinds
of the harness (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``). Any object
with an ``.args`` tuple is a request, so it can be driven by hand or by another harness;
:mod:`llada_ext.eval_harness` wraps it as the lm_eval model ``"llada_ext"``.

The semantics follow the public LLaDA ``eval_llada.py``:

- ``loglikelihood``: the Monte Carlo estimate of Alg. 3 (:func:`llada_ext.log_likelihood`,
  a lower bound on the log-likelihood) of the continuation given the context; ``is_greedy``
  says whether greedy low-confidence decoding of ``len(continuation)`` tokens in one block,
  one token per step, reproduces the continuation exactly.
- ``generate_until``: :func:`llada_ext.generate` at temperature 0, the answer cut at the
  first EOS / end-of-turn token and then at the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llada_ext.likelihood import log_likelihood
from llada_ext.model import config_token_id
from llada_ext.sampling.core import left_pad
from llada_ext.sampling.decode import truncate_at_eos
from llada_ext.sampling.options import check_schedule, finite_float, positive_int

__all__ = ["LLaDAEvalAdapter"]


class LLaDAEvalAdapter:
    """Answer lm-evaluation-harness requests with a LLaDA model.

    Parameters
    ----------
    model : LLaDAModel
        The mask predictor (any device and dtype); used in ``torch.no_grad`` mode.
    tokenizer : ByteTokenizer or HFTokenizer
        Anything with ``encode(str) -> list[int]``, ``decode(ids, skip_special_tokens=...)``,
        ``eos_token_id`` and, for ``chat=True``, ``apply_chat_template(messages)``; an
        ``eot_token_id`` attribute (end of turn) is used when present.
    mc_num : int
        Monte Carlo samples per log-likelihood (Alg. 3).
    batch_size : int
        Monte Carlo samples per forward pass; must divide ``mc_num``.
    cfg_scale : float
        Classifier-free guidance scale for likelihoods and generation (0 = off).
    check_greedy : bool
        Compute ``is_greedy`` of ``loglikelihood`` (one extra decoding of the continuation's
        length per request). ``False`` skips it and reports ``False``; none of the LLaDA
        paper's metrics need it, only exact-match ones like LAMBADA's accuracy.
    gen_length, steps, block_length : int
        Default generation settings of ``generate_until`` (see :func:`llada_ext.generate`):
        ``block_length`` divides ``gen_length`` and the number of blocks divides ``steps``.
    remasking : str
        Remasking strategy of ``generate_until``.
    chat : bool
        Wrap each ``generate_until`` context as one user turn of the tokenizer's chat
        template (with the assistant header appended), for instruction-tuned models.
    generate_batch_size : int
        Prompts per ``generate`` call; prompts are left-padded with EOS and masked.
    seed : int or None
        Every ``loglikelihood`` / ``loglikelihood_rolling`` request is scored with a CPU
        generator freshly seeded with ``seed``, so a request's score does not depend on the
        other requests or their order, and the choices of a multiple-choice question (one
        request each, same context) share their Monte Carlo draws (common random numbers),
        which lowers the variance of their ranking. Each ``generate`` call also gets a
        generator with this seed (it only matters for ``remasking="random"``). ``None``
        uses torch's global random state instead.
    respect_max_gen_toks : bool
        Take the answer length of a ``generate_until`` request from its ``max_gen_toks``
        (see :meth:`gen_settings`); ``False`` always uses ``gen_length``, as the reference
        script does.
    add_bos : bool
        Prepend the tokenizer's BOS id to every encoded context (likelihood and non-chat
        generation), for checkpoints whose tokenizer adds it when called on a text.
    progress : bool
        Show tqdm progress bars.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        mc_num: int = 128,
        batch_size: int = 16,
        cfg_scale: float = 0.0,
        check_greedy: bool = True,
        gen_length: int = 256,
        steps: int = 256,
        block_length: int = 32,
        remasking: str = "low_confidence",
        chat: bool = False,
        generate_batch_size: int = 8,
        seed: int | None = 1234,
        respect_max_gen_toks: bool = True,
        add_bos: bool = False,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.mc_num = positive_int(mc_num, "mc_num")
        self.batch_size = positive_int(batch_size, "batch_size")
        if mc_num % batch_size != 0:
            raise ValueError(f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size})")
        self.cfg_scale = finite_float(cfg_scale, "cfg_scale", minimum=0.0)
        self.check_greedy = bool(check_greedy)
        self.steps_per_block = check_schedule(gen_length, steps, block_length)
        self.gen_length, self.steps, self.block_length = gen_length, steps, block_length
        if not isinstance(remasking, str):
            raise ValueError(f"remasking must be a strategy name, got {remasking!r}")
        self.remasking = remasking  # checked by generate()
        self.chat = bool(chat)
        self.generate_batch_size = positive_int(generate_batch_size, "generate_batch_size")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.respect_max_gen_toks = bool(respect_max_gen_toks)
        self.add_bos = bool(add_bos)
        self.progress = bool(progress)
        self.mask_id = config_token_id(
            getattr(model, "config", None), "mask_token_id", None, "mask_id", "the evaluator"
        )
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("tokenizer must have an eos_token_id (used for padding and stops)")
        self.eos_id = int(eos)
        eot = getattr(tokenizer, "eot_token_id", None)
        self.eot_id = None if eot is None else int(eot)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.empty_context_id = self.eos_id if bos is None else int(bos)

    # -- helpers -----------------------------------------------------------------------------
    def _loglik(self, prompt: list[int], answer: list[int]) -> float:
        """Alg. 3 estimate of ``log p(answer | prompt)`` with this adapter's settings."""
        return float(
            log_likelihood(
                self.model,
                torch.tensor(prompt, dtype=torch.int64),
                torch.tensor(answer, dtype=torch.int64),
                mc_num=self.mc_num,
                batch_size=self.batch_size,
                cfg_scale=self.cfg_scale,
                mask_id=self.mask_id,
                generator=self._generator(),
            )
        )

    def _generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def _bar(self, desc: str, total: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress)

    def _encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text))
        return [int(self.tokenizer.bos_token_id)] + ids if self.add_bos else ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) pair.

        Trailing whitespace of the context is moved to the front of the continuation (the
        harness's convention, which keeps word-boundary spaces with the scored text); then
        ``context + continuation`` is encoded as one text and split after as many tokens as
        the context alone encodes to, so the continuation's tokens are the ones the joint
        text has.

        Parameters
        ----------
        context, continuation : str

        Returns
        -------
        context_ids, continuation_ids : list of int
        """
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        n_ctx = len(self._encode(context))
        return whole[:n_ctx], whole[n_ctx:]

    @torch.no_grad()
    def _is_greedy(self, context_ids: list[int], target_ids: list[int]) -> bool:
        """Whether greedy low-confidence decoding of ``len(target)`` tokens (one block, one
        token per step) after the context yields exactly the target."""
        from llada_ext.sampling import generate

        n = len(target_ids)
        prompt = torch.tensor(context_ids, dtype=torch.int64)[None]
        out = generate(
            self.model,
            prompt,
            gen_length=n,
            steps=n,
            block_length=n,
            temperature=0.0,
            cfg_scale=self.cfg_scale,
            remasking="low_confidence",
            mask_id=self.mask_id,
        )
        return out[0, len(context_ids) :].cpu().tolist() == list(target_ids)

    # -- the three request kinds -------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context.

        Parameters
        ----------
        requests : list
            Objects whose ``.args`` is ``(context: str, continuation: str)``.

        Returns
        -------
        list of (float, bool)
            ``(log_likelihood, is_greedy)`` per request. The log-likelihood is the Alg. 3
            Monte Carlo estimate (``mc_num`` draws, generator seeded with ``seed``); an empty
            continuation scores ``(0.0, True)``. ``is_greedy`` is ``False`` when
            ``check_greedy`` is off. An empty context is replaced by the BOS token (EOS if
            the tokenizer has none), as the harness's own models do, since the sampler needs
            a prompt.
        """
        out: list[tuple[float, bool]] = []
        bar = self._bar("loglikelihood", len(requests))
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx_ids, cont_ids = self._encode_pair(context, continuation)
            ctx_ids = ctx_ids or [self.empty_context_id]
            if not cont_ids:
                out.append((0.0, True))
                bar.update(1)
                continue
            ll = self._loglik(ctx_ids, cont_ids)
            greedy = self._is_greedy(ctx_ids, cont_ids) if self.check_greedy else False
            out.append((ll, bool(greedy)))
            bar.update(1)
        bar.close()
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks).

        This is the masked-diffusion bound of Alg. 3 with an empty prompt over the whole
        text (BOS as the prompt with ``add_bos``), estimated by Monte Carlo, *not* an
        autoregressive rolling-window likelihood: the text is scored in one piece, so it
        must fit the model's context. The bound is not comparable token for token with an
        autoregressive model's exact log-likelihood.

        Parameters
        ----------
        requests : list
            Objects whose ``.args`` is ``(text: str,)``.

        Returns
        -------
        list of float
            One estimate per request; an empty text scores 0.0.
        """
        out: list[float] = []
        bar = self._bar("loglikelihood_rolling", len(requests))
        prefix = self._encode("")
        for req in requests:
            ids = self._encode(req.args[0])[len(prefix) :]
            bar.update(1)
            if not ids:
                out.append(0.0)
                continue
            out.append(self._loglik(prefix, ids))
        bar.close()
        return out

    def gen_settings(self, gen_kwargs: dict | None) -> tuple[int, int, int]:
        """``(gen_length, steps, block_length)`` for a ``generate_until`` request.

        Without ``max_gen_toks`` (or with ``respect_max_gen_toks=False``) the configured
        settings. Otherwise ``gen_length`` is ``max_gen_toks`` rounded up to a multiple of
        ``block_length`` and every block keeps the configured number of steps per block
        (``steps * block_length / gen_length``), so the steps-per-token ratio is unchanged
        and the block count divides ``steps``.

        Parameters
        ----------
        gen_kwargs : dict or None
            The request's generation arguments.

        Returns
        -------
        tuple of int
        """
        max_toks = (gen_kwargs or {}).get("max_gen_toks")
        if max_toks is None or not self.respect_max_gen_toks:
            return self.gen_length, self.steps, self.block_length
        max_toks = int(max_toks)
        if max_toks <= 0:
            raise ValueError(f"max_gen_toks must be positive, got {max_toks}")
        num_blocks = -(-max_toks // self.block_length)
        return num_blocks * self.block_length, num_blocks * self.steps_per_block, self.block_length

    def _prompt_ids(self, context: str) -> list[int]:
        if self.chat:
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": context}]))
        return self._encode(context) or [self.empty_context_id]

    def _postprocess(self, answer_ids: list[int], until: list[str]) -> str:
        (answer_ids,) = truncate_at_eos([answer_ids], eos_id=self.eos_id, eot_id=self.eot_id)
        text = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in until if s and s in text), default=len(text))
        return text[:cut]

    def _generation_jobs(
        self, requests: Sequence[Any]
    ) -> dict[tuple[int, int, int], list[tuple[int, list[int], list[str]]]]:
        """``generate_until`` requests grouped by their generation settings: settings ->
        ``(request index, prompt ids, stop strings)`` per request, in request order."""
        jobs: dict[tuple[int, int, int], list[tuple[int, list[int], list[str]]]] = {}
        for i, req in enumerate(requests):
            context = req.args[0]
            gen_kwargs = req.args[1] if len(req.args) > 1 else {}
            until = (gen_kwargs or {}).get("until") or []
            if isinstance(until, str):
                until = [until]
            settings = self.gen_settings(gen_kwargs)
            jobs.setdefault(settings, []).append((i, self._prompt_ids(context), list(until)))
        return jobs

    @torch.no_grad()
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers to prompts, cut at stop strings.

        Requests with the same generation settings (:meth:`gen_settings`) are decoded
        together, ``generate_batch_size`` at a time, longest prompts first, left-padded with
        EOS and masked out. Each answer is cut at its first EOS / end-of-turn token, decoded
        without special tokens, and cut before the first occurrence of any ``until`` string.
        Decoding is greedy (temperature 0) whatever the request asks. An empty context
        becomes the BOS token.

        Parameters
        ----------
        requests : list
            Objects whose ``.args`` is ``(context: str, gen_kwargs: dict)``; ``gen_kwargs``
            may hold ``"until"`` (str or list of str) and ``"max_gen_toks"`` (int).

        Returns
        -------
        list of str
            One continuation per request, in request order.
        """
        from llada_ext.sampling import generate

        out: list[str | None] = [None] * len(requests)
        device = self.model.device
        bar = self._bar("generate_until", len(requests))
        for (gen_length, steps, block_length), group in self._generation_jobs(requests).items():
            group.sort(key=lambda job: -len(job[1]))
            for start in range(0, len(group), self.generate_batch_size):
                chunk = group[start : start + self.generate_batch_size]
                ids, attn = left_pad([job[1] for job in chunk], self.eos_id)
                plen = ids.shape[1]
                seqs = generate(
                    self.model,
                    ids.to(device),
                    attention_mask=attn.to(device),
                    gen_length=gen_length,
                    steps=steps,
                    block_length=block_length,
                    temperature=0.0,
                    cfg_scale=self.cfg_scale,
                    remasking=self.remasking,
                    mask_id=self.mask_id,
                    generator=self._generator(),
                )
                for row, (idx, _, until) in enumerate(chunk):
                    out[idx] = self._postprocess(seqs[row, plen:].cpu().tolist(), until)
                bar.update(len(chunk))
        bar.close()
        return [s if s is not None else "" for s in out]
