"""Turning sampler output into answers: cut each row at its first end token, then decode."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

__all__ = ["decode_answers", "render_canvas", "truncate_at_eos"]


def _stop_set(eos_id: int | None, eot_id: int | None) -> set[int]:
    return {int(t) for t in (eos_id, eot_id) if t is not None}


def truncate_at_eos(
    ids: Tensor | Sequence[Sequence[int]],
    *,
    eos_id: int | None,
    eot_id: int | None = None,
    prompt_length: int = 0,
) -> list[list[int]]:
    """Answer tokens of each row, up to (not including) the first EOS or end-of-turn token.

    Parameters
    ----------
    ids : Tensor or sequence of sequences of int
        int64 [B, P + G] as returned by :func:`llada_ext.generate` (or [P + G] for one row).
    eos_id : int or None
        End-of-sequence id; None stops at ``eot_id`` only.
    eot_id : int, optional
        End-of-turn id of chat models (LLaDA-8B-Instruct ends its turn with it).
    prompt_length : int
        Columns to drop first (the prompt, padding included, i.e. ``prompt_ids.shape[1]``).

    Returns
    -------
    list of list of int
        One list per row.
    """
    if isinstance(ids, Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"ids must be a [B, T] tensor, got shape {tuple(ids.shape)}")
        rows: Iterable[Sequence[int]] = ids.tolist()
    else:
        rows = ids
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
        raise ValueError(f"prompt_length must be an int >= 0, got {prompt_length!r}")
    stops = _stop_set(eos_id, eot_id)
    out = []
    for row in rows:
        answer = [int(t) for t in row[prompt_length:]]
        for i, t in enumerate(answer):
            if t in stops:
                answer = answer[:i]
                break
        out.append(answer)
    return out


def decode_answers(
    tokenizer: Any,
    ids: Tensor | Sequence[Sequence[int]],
    prompt_length: int,
    *,
    eos_id: int | None = None,
    eot_id: int | None = None,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Text of each row's answer, cut at its first EOS / end-of-turn token.

    Parameters
    ----------
    tokenizer : object
        Anything with ``decode(ids, skip_special_tokens=...)`` (the tokenizers of
        :mod:`llada_ext.tokenizer`, a Hugging Face tokenizer).
    ids : Tensor or sequence of sequences of int
        Sampler output, int64 [B, P + G].
    prompt_length : int
        ``P``, the padded prompt width.
    eos_id, eot_id : int, optional
        Default: the tokenizer's ``eos_token_id`` and ``eot_token_id`` (when it has them).
    skip_special_tokens : bool
        Passed to ``tokenizer.decode``.

    Returns
    -------
    list of str
    """
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
    if eot_id is None:
        eot_id = getattr(tokenizer, "eot_token_id", None)
    rows = truncate_at_eos(ids, eos_id=eos_id, eot_id=eot_id, prompt_length=prompt_length)
    return [tokenizer.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]


def _render_canvas(tokenizer: Any, row: Sequence[int], marks: dict[int, str]) -> str:
    """The answer canvas as text, each token of ``marks`` shown as its mark."""
    parts: list[str] = []
    run: list[int] = []
    for t in row:
        mark = marks.get(int(t))
        if mark is not None:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(mark)
        else:
            run.append(int(t))
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts)


def render_canvas(
    tokenizer: Any,
    ids: Tensor,
    prompt_length: int,
    mask_id: int,
    placeholder: str = "_",
    marks: dict[int, str] | None = None,
) -> list[str]:
    """Each row's answer canvas as text with masked positions shown as ``placeholder``.

    Every position is shown: tokens that decoding hides (EOS, end of turn) get a visible
    mark through ``marks``, so the canvas of the last step reads as the answer followed by
    its end tokens (the answer is what comes before the first of them).

    Parameters
    ----------
    tokenizer : object
        Anything with ``decode(ids)``.
    ids : Tensor
        int64 [B, P + G], e.g. the ``x`` a sampler callback receives.
    prompt_length : int
        ``P``.
    mask_id : int
        The mask token id.
    placeholder : str
        Text shown for each still-masked token.
    marks : dict of int to str, optional
        Text shown for other token ids, e.g. ``{eos_id: "<eos>"}``.

    Returns
    -------
    list of str
    """
    rows = ids[:, prompt_length:].tolist() if isinstance(ids, Tensor) else ids
    shown = {**(marks or {}), int(mask_id): placeholder}
    return [_render_canvas(tokenizer, r, shown) for r in rows]
