"""The LLaDA model configuration: sizes, special ids, presets and the published
``config.json`` format (also what the Hugging Face LLaDA code writes)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["LLaDAConfig", "config_token_id"]

_SPECIAL_IDS = ("mask_token_id", "eos_token_id", "bos_token_id", "pad_token_id", "eot_token_id")
# Upper bounds of the config sizes: far above any published model (LLaDA-8B: d_model 4096,
# 32 layers, MLP 12288, vocabulary 126464), low enough that a hostile config.json cannot make
# the constructor build for minutes or overflow a storage size.
_SIZE_LIMITS = {
    "d_model": 1 << 16,
    "n_layers": 1 << 10,
    "n_heads": 1 << 10,
    "n_kv_heads": 1 << 10,
    "mlp_hidden_size": 1 << 20,
    "vocab_size": 1 << 24,
    "max_sequence_length": 1 << 24,
}


#: Architecture switches of the published config format (and of the Hugging Face LLaDA code)
#: with the values this model implements. A config that sets one otherwise describes another
#: network, which would load without error and compute something else.
_ARCHITECTURE = {
    "block_type": ("llama",),
    "activation_type": ("silu",),
    "layer_norm_type": ("rms",),
    "rope": (True,),
    "alibi": (False,),
    "weight_tying": (False,),
    "include_bias": (False,),
    "include_qkv_bias": (False, None),
    "bias_for_layer_norm": (False, None),
    "attention_layer_norm": (False,),
    "input_emb_norm": (False,),
    "scale_logits": (False,),
    "block_group_size": (1,),
    "layer_norm_with_affine": (True,),
}


#: The presets of :meth:`LLaDAConfig.preset`: the fields each sets; the others keep LLaDA-8B's.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "d_model": 128,
        "n_layers": 4,
        "n_heads": 4,
        "n_kv_heads": 2,
        "mlp_hidden_size": 352,
        "vocab_size": 260,
        "max_sequence_length": 256,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "mask_token_id": 258,
        "eos_token_id": 257,
        "bos_token_id": 256,
        "pad_token_id": 257,
        "eot_token_id": 259,
        "initializer_range": 0.02,
    },
    "1b": {
        "d_model": 2048,
        "n_layers": 22,
        "n_heads": 32,
        "n_kv_heads": 4,
        "mlp_hidden_size": 5634,
        "max_sequence_length": 4096,
    },
    "8b": {},
}


def _check_architecture(data: dict[str, Any]) -> None:
    for key, allowed in _ARCHITECTURE.items():
        if key in data and not any(
            data[key] is a if a is None or isinstance(a, bool) else data[key] == a for a in allowed
        ):
            raise ValueError(
                f"config {key}={data[key]!r} is not supported: this LLaDA model implements "
                f"{key}={allowed[0]!r} (a non-causal Llama block: RMSNorm, RoPE, SwiGLU MLP, "
                "no biases, untied LM head)"
            )


def config_token_id(config: object, attr: str, given: int | None, name: str, why: str) -> int:
    """The special token id `given` if not None, else ``config.<attr>``.

    Raises
    ------
    ValueError
        Naming `name`, when neither is set (a config may have no mask, EOS, ... id: a small
        model's config.json written by the Hugging Face code has ``bos_token_id: null``).
    """
    if given is not None:
        return given  # type and range are checked where the ids are used
    value = getattr(config, attr, None) if config is not None else None
    if value is None:
        raise ValueError(f"{name} is required for {why} (the model config has no {attr})")
    return int(value)


@dataclass
class LLaDAConfig:
    """Hyper-parameters of a LLaDA mask predictor.

    The defaults are the published LLaDA-8B dimensions and special token ids, so a
    ``config.json`` that omits a key falls back to the value LLaDA-8B uses.

    Attributes
    ----------
    d_model, n_layers, n_heads, n_kv_heads, mlp_hidden_size : int
        Width, depth, query heads, key/value heads (GQA when smaller than ``n_heads``) and
        SwiGLU hidden size.
    vocab_size : int
        Rows of the embedding and of the LM head.
    max_sequence_length : int
        Longest sequence the model was trained for (informational; RoPE has no table).
    rope_theta, rms_norm_eps : float
        RoPE base and RMSNorm epsilon.
    mask_token_id, eos_token_id, bos_token_id, pad_token_id : int or None
        Special ids; None when the model has no such token. In LLaDA the EOS token doubles
        as padding (a missing pad id is the EOS id).
    eot_token_id : int or None
        End-of-turn id of the chat template, if any.
    initializer_range : float
        Standard deviation of the normal initialisation used when training from scratch.
    """

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int | None = 126336
    eos_token_id: int | None = 126081
    bos_token_id: int | None = 126080
    pad_token_id: int | None = 126081
    eot_token_id: int | None = 126348
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "mlp_hidden_size",
            "vocab_size",
            "max_sequence_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LLaDAConfig.{name} must be a positive int, got {value!r}")
            if value > _SIZE_LIMITS[name]:
                raise ValueError(
                    f"LLaDAConfig.{name}={value} is beyond the supported maximum "
                    f"{_SIZE_LIMITS[name]} (a config from elsewhere is checked before anything "
                    "is built)"
                )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"LLaDAConfig.d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"LLaDAConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"LLaDAConfig head_dim ({self.head_dim}) must be even for RoPE")
        for name in _SPECIAL_IDS:
            value = getattr(self, name)
            if value is None:  # the model has no such token
                continue
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"LLaDAConfig.{name} must be an int in [0, vocab_size={self.vocab_size}), "
                    f"got {value!r}"
                )

    @property
    def head_dim(self) -> int:
        """Per-head width ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    # -- presets ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> LLaDAConfig:
        """Return a named configuration.

        Parameters
        ----------
        name : {"tiny", "1b", "8b"}
            ``"tiny"``: byte-level model that trains on a CPU in minutes: d_model 128, 4 layers,
            4 heads, 2 KV heads, MLP 352, vocabulary 260 = 256 bytes + BOS 256, EOS 257 (also
            padding), MASK 258, EoT 259 (the ids of :class:`llada_ext.tokenizer.ByteTokenizer`),
            max length 256, RoPE theta 10000.
            ``"1b"``: the LLaDA 1B architecture of the paper's scaling study (22 layers, d_model
            2048, 32 heads, 4 KV heads, MLP 5634, LLaDA vocabulary; about 1.0B parameters
            without the two embedding matrices, 1.5B with them).
            ``"8b"``: the exact LLaDA-8B dimensions.

        Returns
        -------
        LLaDAConfig
        """
        sizes = _PRESETS.get(name.lower())
        if sizes is None:
            raise ValueError(f"unknown preset {name!r}; expected one of 'tiny', '1b', '8b'")
        return cls(**sizes)

    # -- published config.json format ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Serialise in the published LLaDA ``config.json`` format.

        Returns
        -------
        dict
            The keys of the published LLaDA-8B config (``d_model``, ``n_heads``, ...,
            ``model_type="llada"``, ``architectures=["LLaDAModelLM"]``) plus the fields that
            config lacks (``eot_token_id``, ``initializer_range``, also written as ``init_std``).
        """
        out: dict[str, Any] = {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers,
            "mlp_hidden_size": self.mlp_hidden_size,
            "vocab_size": self.vocab_size,
            "embedding_size": self.vocab_size,
            "max_sequence_length": self.max_sequence_length,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eot_token_id": self.eot_token_id,
            "initializer_range": self.initializer_range,
            # fixed architecture facts of LLaDA, written so that other readers of the
            # published format see the right model
            "init_std": self.initializer_range,
            "activation_type": "silu",
            "block_type": "llama",
            "layer_norm_type": "rms",
            "rope": True,
            "rope_full_precision": True,
            "include_bias": False,
            "weight_tying": False,
            "alibi": False,
            # no dropout anywhere (the reference code's defaults are 0.1)
            "attention_dropout": 0.0,
            "residual_dropout": 0.0,
            "embedding_dropout": 0.0,
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLaDAConfig:
        """Build a config from a (published or :meth:`to_dict`) ``config.json`` dictionary.

        Absent keys take the LLaDA-8B defaults; unknown keys are ignored. When the published
        ``embedding_size`` (the padded row count of the weights) exceeds ``vocab_size``, the
        weights have ``embedding_size`` rows, so that becomes ``vocab_size`` here.

        Parameters
        ----------
        data : dict
            Parsed ``config.json``.

        Returns
        -------
        LLaDAConfig
        """
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        _check_architecture(data)
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("mlp_hidden_size") is None and "mlp_ratio" in data:
            kwargs["mlp_hidden_size"] = data["mlp_ratio"] * kwargs.get("d_model", cls.d_model)
        if "initializer_range" not in kwargs and data.get("init_std") is not None:
            kwargs["initializer_range"] = data["init_std"]
        emb = data.get("embedding_size")
        vocab = kwargs.get("vocab_size", cls.vocab_size)
        if emb is not None and emb > vocab:
            kwargs["vocab_size"] = emb
        if kwargs.get("n_kv_heads") is None:  # missing or null: multi-head or multi-query
            mqa = data.get("multi_query_attention") is True
            kwargs["n_kv_heads"] = 1 if mqa else kwargs.get("n_heads", cls.n_heads)
        final_vocab = kwargs.get("vocab_size", vocab)
        for key in _SPECIAL_IDS:
            # A missing id takes LLaDA-8B's only where it fits the vocabulary; else the model
            # has none (the Hugging Face code writes bos_token_id: null for small models).
            if key not in kwargs and getattr(cls, key) is not None:
                if not (isinstance(final_vocab, int) and getattr(cls, key) < final_vocab):
                    kwargs[key] = None
        if kwargs.get("pad_token_id", cls.pad_token_id) is None:
            kwargs["pad_token_id"] = kwargs.get("eos_token_id", cls.eos_token_id)
        for key in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
