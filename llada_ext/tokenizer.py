"""Tokenizers with one small interface: a byte-level one for the tiny preset and a wrapper
around a Hugging Face ``tokenizer.json`` (e.g. LLaDA-8B's).

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, the special ids
``mask_token_id``, ``eos_token_id``, ``bos_token_id``, ``pad_token_id``, ``eot_token_id``,
``vocab_size`` and ``apply_chat_template(messages, add_generation_prompt=True) -> list[int]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise TypeError(f"messages[{i}] must be a dict with str 'role' and 'content'")


class _Tokenizer:
    """What both tokenizers share: the chat template entry point and ``len``."""

    vocab_size: int

    def _chat_ids(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> list[int]:
        raise NotImplementedError

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation in this tokenizer's chat template (see the class docs).

        Parameters
        ----------
        messages : list of dict
            ``[{"role": "user", "content": "..."}, ...]``.
        add_generation_prompt : bool
            Append the assistant header so that generation continues as the assistant.

        Returns
        -------
        list[int]
        """
        _check_messages(messages)
        return self._chat_ids(messages, add_generation_prompt)

    def __len__(self) -> int:
        return self.vocab_size


class ByteTokenizer(_Tokenizer):
    """UTF-8 byte tokenizer matching ``LLaDAConfig.preset("tiny")``.

    Ids 0-255 are the bytes; 256 BOS, 257 EOS (also padding), 258 MASK, 259 EoT (end of a
    chat turn); vocabulary size 260.

    The chat template is a compact byte-level version of LLaDA's::

        [BOS] "<user>\\n" content [EoT] "<assistant>\\n" content [EoT] ... "<assistant>\\n"

    (the last header only with ``add_generation_prompt``). An answer generated after it is
    expected to end with EOS padding, as in LLaDA's SFT data.
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 257
    mask_token_id = 258
    eot_token_id = 259
    vocab_size = 260
    _special_names = {256: "<|bos|>", 257: "<|eos|>", 258: "<|mask|>", 259: "<|eot|>"}

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ids (no BOS/EOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (ints or a 1-D tensor). Special ids are dropped, or rendered as
        ``<|bos|>``, ``<|eos|>``, ``<|mask|>``, ``<|eot|>`` with
        ``skip_special_tokens=False``; invalid UTF-8 becomes U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i in self._special_names:
                if not skip_special_tokens:
                    out.extend(self._special_names[i].encode())
            else:
                raise ValueError(f"id {i} is outside the byte vocabulary [0, {self.vocab_size})")
        return out.decode("utf-8", errors="replace")

    def _chat_ids(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> list[int]:
        ids = [self.bos_token_id]
        for m in messages:
            ids += self.encode(f"<{m['role']}>\n{m['content'].strip()}") + [self.eot_token_id]
        if add_generation_prompt:
            ids += self.encode("<assistant>\n")
        return ids


class HFTokenizer(_Tokenizer):
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json`` with the interface above.

    Special ids come from the folder's ``config.json`` when present, else from the
    vocabulary's LLaDA special tokens (``<|mdm_mask|>``, ``<|endoftext|>``,
    ``<|startoftext|>``, ``<|eot_id|>``), else the LLaDA-8B ids. The chat template is
    LLaDA-8B-Instruct's::

        <|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n

    Parameters
    ----------
    folder : str or PathLike
        Folder with ``tokenizer.json``.
    """

    _defaults = {
        "bos_token_id": ("<|startoftext|>", 126080),
        "eos_token_id": ("<|endoftext|>", 126081),
        "mask_token_id": ("<|mdm_mask|>", 126336),
        "eot_token_id": ("<|eot_id|>", 126348),
    }

    def __init__(self, folder: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} not found")
        self._tok = Tokenizer.from_file(str(path))
        config: dict = {}
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
        for attr, (token, default) in self._defaults.items():
            value = config.get(attr)
            if value is None:
                value = self._tok.token_to_id(token)
            setattr(self, attr, default if value is None else int(value))
        pad = config.get("pad_token_id")
        self.pad_token_id = self.eos_token_id if pad is None else int(pad)
        self.vocab_size = int(
            config.get("vocab_size") or self._tok.get_vocab_size(with_added_tokens=True)
        )

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without added special tokens (special-token strings in the text,
        e.g. ``<|eot_id|>``, still map to their ids)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (ints or a 1-D tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _chat_ids(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> list[int]:
        text = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            for m in messages
        )
        if add_generation_prompt:
            text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return [self.bos_token_id] + self.encode(text)


def load_tokenizer(folder: str | os.PathLike | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a checkpoint folder.

    Parameters
    ----------
    folder : str or PathLike, optional
        Checkpoint folder (must exist). With a ``tokenizer.json`` inside, an
        :class:`HFTokenizer`; otherwise (or with ``None``) the :class:`ByteTokenizer` of the
        tiny preset.

    Returns
    -------
    ByteTokenizer or HFTokenizer
    """
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
        if (folder / "tokenizer.json").is_file():
            return HFTokenizer(folder)
    return ByteTokenizer()
