"""Arguments the public API renamed: a clear TypeError instead of a silent alias."""

from __future__ import annotations


def refuse_renamed_attention_args(kwargs: dict) -> None:
    """TypeError for keyword arguments attention() does not take, explaining the rename of
    key_padding_mask."""
    if "key_padding_mask" in kwargs:
        raise TypeError(
            "attention(): key_padding_mask was renamed to key_mask, where True = attend this "
            "key (as in SDPA's boolean mask and Hugging Face's attention_mask). "
            "nn.MultiheadAttention's key_padding_mask means the opposite (True = ignore): pass "
            "key_mask=~key_padding_mask if that is what you have"
        )
    if kwargs:
        raise TypeError(f"attention() got an unexpected keyword argument {next(iter(kwargs))!r}")
