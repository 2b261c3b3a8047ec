"""Evaluate a LLaDA model with lm-evaluation-harness (``lm_eval``, v0.4 API).

Two layers:

- :class:`LLaDAEvalAdapter` (:mod:`llada_ext.eval_adapter`, also importable from here) holds a
  model and a tokenizer and answers the three request kinds of the harness
  (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``). It needs nothing from
  ``lm_eval``: any object with an ``.args`` tuple is a request, so it can be driven by hand or
  by another harness.
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
The semantics of the requests are those of :mod:`llada_ext.eval_adapter` (the public LLaDA
``eval_llada.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from llada_ext.eval_adapter import LLaDAEvalAdapter

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


# --------------------------------------------------------------------------------------------
# model arguments: lm_eval passes ``--model_args key=value,...`` as strings or as values
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


def _arg_number(value: object, name: str, kind: type) -> Any:
    """``value`` as ``kind`` (int or float): a number of that kind (an int also for a float,
    a float with no fraction also for an int) or a string that parses as one; never a bool."""
    if not isinstance(value, bool):
        if isinstance(value, int) or (
            isinstance(value, float) and (kind is float or value.is_integer())
        ):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                pass
    raise ValueError(f"{name} must be {'an int' if kind is int else 'a float'}, got {value!r}")


def _arg_int(value: object, name: str) -> int:
    return _arg_number(value, name, int)


def _arg_float(value: object, name: str) -> float:
    return _arg_number(value, name, float)


def _arg_optional_int(value: object, name: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    return _arg_int(value, name)


def _arg_str(value: object, name: str) -> str:
    return str(value)


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


#: The adapter's settings as model arguments, each with its conversion, in checking order.
_ADAPTER_ARGS = {
    "mc_num": _arg_int,
    "batch_size": _arg_int,
    "cfg_scale": _arg_float,
    "check_greedy": _arg_bool,
    "gen_length": _arg_int,
    "steps": _arg_int,
    "block_length": _arg_int,
    "remasking": _arg_str,
    "chat": _arg_bool,
    "generate_batch_size": _arg_int,
    "seed": _arg_optional_int,
    "respect_max_gen_toks": _arg_bool,
    "add_bos": _arg_bool,
    "progress": _arg_bool,
}
#: Settings that, when not given, come from the folder's ``generation_config.json``.
_FROM_FOLDER = ("gen_length", "steps", "block_length", "remasking", "cfg_scale")


def _adapter_settings(pretrained: str, **given: object) -> dict[str, Any]:
    """Keyword arguments of :class:`LLaDAEvalAdapter` from lm_eval model arguments.

    Parameters
    ----------
    pretrained : str
        Checkpoint folder; its ``generation_config.json`` (else the LLaDA defaults) supplies
        ``gen_length``, ``steps``, ``block_length``, ``remasking`` and ``cfg_scale`` when
        they are None.
    **given
        The adapter settings, as values or as strings (``"true"``, ``"16"``, ``"none"``).

    Returns
    -------
    dict
        The settings converted to the types the adapter takes.

    Raises
    ------
    ValueError
        Naming the setting, when a value does not convert.
    """
    from llada_ext.generation_config import read_generation_config

    folder = read_generation_config(str(pretrained))
    out = {}
    for name, value in given.items():
        if value is None and name in _FROM_FOLDER:
            value = folder[name]
        out[name] = _ADAPTER_ARGS[name](value, name)
    return out


def _load(
    pretrained: str, device: str, dtype: object, tokenizer: str | None, backend: str
) -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer a ``LLaDAHarnessLM`` evaluates."""
    from llada_ext.model import LLaDAModel
    from llada_ext.tokenizer import load_tokenizer

    model = LLaDAModel.from_pretrained(
        str(pretrained), device=str(device), dtype=_arg_dtype(dtype), backend=str(backend)
    )
    tok = load_tokenizer(str(tokenizer) if tokenizer is not None else str(pretrained))
    return model, tok


# --------------------------------------------------------------------------------------------
# lm_eval integration (only when lm_eval is importable)
# --------------------------------------------------------------------------------------------
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
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
                batch_size = 16
            model, tok = _load(pretrained, device, dtype, tokenizer, backend)
            settings = _adapter_settings(
                pretrained,
                mc_num=mc_num,
                batch_size=batch_size,
                cfg_scale=cfg_scale,
                check_greedy=check_greedy,
                gen_length=gen_length,
                steps=steps,
                block_length=block_length,
                remasking=remasking,
                chat=chat,
                generate_batch_size=generate_batch_size,
                seed=seed,
                respect_max_gen_toks=respect_max_gen_toks,
                add_bos=add_bos,
                progress=progress,
            )
            self._device = torch.device(str(device))
            self.adapter = LLaDAEvalAdapter(model, tok, **settings)

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
