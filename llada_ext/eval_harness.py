"""Evaluate a LLaDA model with lm-evaluation-harness (``lm_eval``, v0.4 API).

Two layers:

- :class:`LLaDAEvalAdapter` holds a model and a tokenizer and answers the three request
  kinds of the harness (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``).
  It needs nothing from ``lm_eval``: any object with an ``.args`` tuple is a request, so it
  can be driven by hand or by another harness.
- ``LLaDAHarnessLM``, defined only when ``lm_eval`` can be imported, is an
  ``lm_eval.api.model.LM`` registered under the model name ``"llada_ext"``. It loads a
  checkpoint folder and delegates to the adapter::

      import llada_ext.eval_harness  # registers "llada_ext"
      import lm_eval

      lm_eval.simple_evaluate(
          model="llada_ext",
          model_args="pretrained=/path/to/ckpt,mc_num=128,check_greedy=False",
          tasks=["hellaswag"],
      )

or from the command line, with the harness's own arguments::

    python -m llada_ext.eval_harness --model llada_ext \\
        --model_args pretrained=/path/to/ckpt,mc_num=128 --tasks hellaswag --batch_size 16

(the harness's ``--batch_size`` is the number of Monte Carlo samples per forward pass).

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
from llada_ext.sampling.core import _finite_float, _positive_int, check_schedule, left_pad
from llada_ext.sampling.decode import truncate_at_eos

__all__ = ["LLaDAEvalAdapter", "register", "lm_eval_available"]

MODEL_NAME = "llada_ext"

try:  # lm_eval is optional: without it only the plain adapter exists
    from lm_eval.api.model import LM as _LM
except Exception as _e:  # a broken install must not break this module either
    _LM = None
    _LM_EVAL_ERROR: Exception | None = _e
else:
    _LM_EVAL_ERROR = None


def lm_eval_available() -> bool:
    """True if ``lm_eval`` could be imported (and ``LLaDAHarnessLM`` exists)."""
    return _LM is not None


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
        self.mc_num = _positive_int(mc_num, "mc_num")
        self.batch_size = _positive_int(batch_size, "batch_size")
        if mc_num % batch_size != 0:
            raise ValueError(f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size})")
        self.cfg_scale = _finite_float(cfg_scale, "cfg_scale", minimum=0.0)
        self.check_greedy = bool(check_greedy)
        self.steps_per_block = check_schedule(gen_length, steps, block_length)
        self.gen_length, self.steps, self.block_length = gen_length, steps, block_length
        if not isinstance(remasking, str):
            raise ValueError(f"remasking must be a strategy name, got {remasking!r}")
        self.remasking = remasking  # checked by generate()
        self.chat = bool(chat)
        self.generate_batch_size = _positive_int(generate_batch_size, "generate_batch_size")
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

        jobs: dict[tuple[int, int, int], list[tuple[int, list[int], list[str]]]] = {}
        for i, req in enumerate(requests):
            context = req.args[0]
            gen_kwargs = req.args[1] if len(req.args) > 1 else {}
            until = (gen_kwargs or {}).get("until") or []
            if isinstance(until, str):
                until = [until]
            settings = self.gen_settings(gen_kwargs)
            jobs.setdefault(settings, []).append((i, self._prompt_ids(context), list(until)))

        out: list[str | None] = [None] * len(requests)
        device = self.model.device
        bar = self._bar("generate_until", len(requests))
        for (gen_length, steps, block_length), group in jobs.items():
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


# --------------------------------------------------------------------------------------------
# lm_eval integration (only when lm_eval is importable)
# --------------------------------------------------------------------------------------------
_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def _arg_bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be a bool (true/false), got {value!r}")


def _arg_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{name} must be an int, got {value!r}")


def _arg_float(value: object, name: str) -> float:
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{name} must be a float, got {value!r}")


def _arg_optional_int(value: object, name: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    return _arg_int(value, name)


def _arg_dtype(value: object) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name == "auto":
            return None
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
        dtype = getattr(torch, aliases.get(name, name), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    raise ValueError(f"dtype must be 'auto' or a floating dtype like 'bfloat16', got {value!r}")


if _LM is not None:

    class LLaDAHarnessLM(_LM):
        """lm-evaluation-harness model ``"llada_ext"``: a LLaDA checkpoint folder evaluated
        through :class:`LLaDAEvalAdapter`.

        Every argument may also be given as a string (``--model_args key=value,...``).

        Parameters
        ----------
        pretrained : str
            Checkpoint folder in the published LLaDA layout
            (:meth:`llada_ext.LLaDAModel.from_pretrained`).
        device : str, optional
            ``"cuda"``, ``"cuda:N"`` or ``"cpu"``; default CUDA when available.
        dtype : str
            ``"auto"`` (the checkpoint's) or a floating dtype name (``"bfloat16"``, ...).
        tokenizer : str, optional
            Tokenizer folder (:func:`llada_ext.tokenizer.load_tokenizer`); default
            ``pretrained``.
        backend : {"kernels", "torch"}
            Attention backend of the model.
        batch_size : int or "auto"
            Monte Carlo samples per forward pass (the harness's ``--batch_size``, as in the
            reference script); ``"auto"`` means 16. Must divide ``mc_num``.
        max_batch_size : optional
            Accepted for the harness and ignored.
        gen_length, steps, block_length, remasking, cfg_scale
            As in :class:`LLaDAEvalAdapter`; by default the folder's
            ``generation_config.json`` (written by ``train``, ``sft`` and ``demo``), else the
            LLaDA defaults.
        mc_num, check_greedy, chat, generate_batch_size, seed, respect_max_gen_toks, add_bos,
        progress
            As in :class:`LLaDAEvalAdapter`.
        """

        def __init__(
            self,
            pretrained: str,
            device: str | None = None,
            dtype: str = "auto",
            tokenizer: str | None = None,
            backend: str = "kernels",
            mc_num: int | str = 128,
            batch_size: int | str = 16,
            max_batch_size: int | str | None = None,
            cfg_scale: float | str | None = None,
            check_greedy: bool | str = True,
            gen_length: int | str | None = None,
            steps: int | str | None = None,
            block_length: int | str | None = None,
            remasking: str | None = None,
            chat: bool | str = False,
            generate_batch_size: int | str = 8,
            seed: int | str | None = 1234,
            respect_max_gen_toks: bool | str = True,
            add_bos: bool | str = False,
            progress: bool | str = True,
        ) -> None:
            super().__init__()
            from llada_ext.generation_config import read_generation_config
            from llada_ext.model import LLaDAModel
            from llada_ext.tokenizer import load_tokenizer

            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
                batch_size = 16
            model = LLaDAModel.from_pretrained(
                str(pretrained),
                device=str(device),
                dtype=_arg_dtype(dtype),
                backend=str(backend),
            )
            tok = load_tokenizer(str(tokenizer) if tokenizer is not None else str(pretrained))
            # settings not given come from the folder's generation_config.json
            folder = read_generation_config(str(pretrained))
            gen_length = folder["gen_length"] if gen_length is None else gen_length
            steps = folder["steps"] if steps is None else steps
            block_length = folder["block_length"] if block_length is None else block_length
            remasking = folder["remasking"] if remasking is None else remasking
            cfg_scale = folder["cfg_scale"] if cfg_scale is None else cfg_scale
            self._device = torch.device(str(device))
            self.adapter = LLaDAEvalAdapter(
                model,
                tok,
                mc_num=_arg_int(mc_num, "mc_num"),
                batch_size=_arg_int(batch_size, "batch_size"),
                cfg_scale=_arg_float(cfg_scale, "cfg_scale"),
                check_greedy=_arg_bool(check_greedy, "check_greedy"),
                gen_length=_arg_int(gen_length, "gen_length"),
                steps=_arg_int(steps, "steps"),
                block_length=_arg_int(block_length, "block_length"),
                remasking=str(remasking),
                chat=_arg_bool(chat, "chat"),
                generate_batch_size=_arg_int(generate_batch_size, "generate_batch_size"),
                seed=_arg_optional_int(seed, "seed"),
                respect_max_gen_toks=_arg_bool(respect_max_gen_toks, "respect_max_gen_toks"),
                add_bos=_arg_bool(add_bos, "add_bos"),
                progress=_arg_bool(progress, "progress"),
            )

        @property
        def model(self) -> torch.nn.Module:
            """The wrapped :class:`llada_ext.LLaDAModel`."""
            return self.adapter.model

        @property
        def tokenizer(self) -> Any:
            """The tokenizer."""
            return self.adapter.tokenizer

        def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
            """See :meth:`LLaDAEvalAdapter.loglikelihood`."""
            return self.adapter.loglikelihood(requests)

        def loglikelihood_rolling(self, requests: list) -> list[float]:
            """See :meth:`LLaDAEvalAdapter.loglikelihood_rolling`."""
            return self.adapter.loglikelihood_rolling(requests)

        def generate_until(self, requests: list) -> list[str]:
            """See :meth:`LLaDAEvalAdapter.generate_until`."""
            return self.adapter.generate_until(requests)

    __all__.append("LLaDAHarnessLM")


def register() -> type:
    """Register ``LLaDAHarnessLM`` with lm_eval's model registry as ``"llada_ext"``.

    Runs at import time when ``lm_eval`` is importable; calling it again is harmless. The
    harness's own model table is loaded first, so its built-in model names stay available.

    Returns
    -------
    type
        ``LLaDAHarnessLM``.

    Raises
    ------
    ImportError
        ``lm_eval`` is not installed (or fails to import).
    """
    if _LM is None:
        raise _missing_lm_eval("register()")
    import lm_eval.api.registry as registry

    try:  # lazy placeholders of the built-in models (an empty registry is filled on lookup)
        import lm_eval.models  # noqa: F401
    except Exception:  # older harness versions import their optional dependencies here
        pass
    cls = globals()["LLaDAHarnessLM"]
    try:
        existing = registry.get_model(MODEL_NAME)
    except Exception:  # not registered yet
        existing = None
    if existing is not cls:
        registry.register_model(MODEL_NAME)(cls)
    return cls


def _missing_lm_eval(what: str) -> ImportError:
    err = ImportError(
        f"{what} needs lm-evaluation-harness, which could not be imported "
        f"({type(_LM_EVAL_ERROR).__name__}: {_LM_EVAL_ERROR}); install it with "
        "`pip install lm_eval`"
    )
    err.__cause__ = _LM_EVAL_ERROR
    return err


def __getattr__(name: str) -> Any:
    if name == "LLaDAHarnessLM":
        raise _missing_lm_eval("llada_ext.eval_harness.LLaDAHarnessLM")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if _LM is not None and __name__ != "__main__":
    register()

if __name__ == "__main__":  # python -m llada_ext.eval_harness <lm_eval command line>
    if _LM is None:
        raise _missing_lm_eval("python -m llada_ext.eval_harness")
    from lm_eval.__main__ import cli_evaluate

    import llada_ext.eval_harness  # noqa: F401 (registers the importable copy of this module)

    cli_evaluate()
