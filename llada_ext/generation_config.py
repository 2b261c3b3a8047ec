"""``generation_config.json``: the sampling settings a run folder recommends for its model.

``train``, ``sft`` and ``demo`` write one next to the weights; ``llada-ext sample`` takes its
defaults from it (explicit options still win). Without one the LLaDA defaults below apply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"
#: Token ids a folder may name for the sampler (``generate``'s argument -> config attribute);
#: when absent, ``generate`` takes them from the model's config.
_ID_KEYS = {"mask_id": "mask_token_id", "eos_id": "eos_token_id", "eot_id": "eot_token_id"}

#: The sampler settings used when a folder has no generation_config.json.
DEFAULTS: dict[str, Any] = {
    "gen_length": 64,
    "steps": 64,
    "block_length": 32,
    "temperature": 0.0,
    "cfg_scale": 0.0,
    "remasking": "low_confidence",
}


def fitting(seq_len: int) -> dict[str, Any]:
    """Settings for a model trained on `seq_len`-token rows: one block of the largest power of
    two up to half the row (at most 64), one token per step."""
    n = 1
    while n * 2 <= max(seq_len // 2, 1) and n * 2 <= 64:
        n *= 2
    return {**DEFAULTS, "gen_length": n, "steps": n, "block_length": n}


def write_generation_config(
    folder: str | Path, settings: dict[str, Any], config: Any = None
) -> Path:
    """Writes `settings` (checked like ``generate``'s arguments) to the folder, with the
    mask / EOS / end-of-turn ids of the model `config` when one is given."""
    from .sampling.core import check_schedule

    settings = {**DEFAULTS, **settings}
    for key, attr in _ID_KEYS.items():
        value = getattr(config, attr, None) if config is not None else None
        if value is not None:
            settings.setdefault(key, int(value))
    check_schedule(settings["gen_length"], settings["steps"], settings["block_length"])
    path = Path(folder) / GENERATION_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """The folder's settings over :data:`DEFAULTS` (just the defaults without a file).

    Raises
    ------
    ValueError
        Naming the file, when it is not a JSON object of known settings.
    """
    path = Path(folder) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return dict(DEFAULTS)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    known = {k: v for k, v in data.items() if k in DEFAULTS or k in _ID_KEYS}
    for key in _ID_KEYS:
        value = known.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{str(path)!r}: {key} must be a token id, got {value!r}")
    return {**DEFAULTS, **known}


def generation_settings(folder: str | Path) -> dict[str, Any]:
    """Keyword arguments of :func:`llada_ext.generate` recommended by a run folder.

    ``lx.generate(model, prompt, **lx.generation_settings(folder))`` samples with the settings
    that ``train``, ``sft`` or ``demo`` wrote for the model in ``folder`` (its
    ``generation_config.json``), or with the LLaDA defaults when it has none. Keywords given
    after the unpacking still win: ``generate(..., **settings, temperature=0.7)`` is an error
    in Python, so update the dict instead (``settings["temperature"] = 0.7``).

    Parameters
    ----------
    folder : str or PathLike
        A model / run folder.

    Returns
    -------
    dict
        ``gen_length``, ``steps``, ``block_length``, ``temperature``, ``cfg_scale``,
        ``remasking``, and ``mask_id`` / ``eos_id`` / ``eot_id`` where the folder names them.

    Raises
    ------
    ValueError
        The folder's generation_config.json is malformed.
    """
    settings = read_generation_config(folder)
    return {k: v for k, v in settings.items() if v is not None}
