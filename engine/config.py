"""Named model shapes and the engine's configuration. Torch-free (the CLI reads these)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """A Llama/Qwen-style decoder's shape. Field names follow HF's config.json where they exist."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # Qwen2 has q/k/v biases, Llama does not
    tie_word_embeddings: bool = False
    eos_token_id: int = 257  # the byte tokenizer's EOS
    dtype: str = "float32"  # weights/KV dtype on CPU; "auto" → bfloat16 on CUDA
    init_std: float = 0.02  # random-weight init (deterministic from the engine seed)

    @classmethod
    def from_hf_dir(cls, path: str | Path, name: str | None = None) -> ModelConfig:
        """Read a local HF config.json (Llama/Qwen2 families). Never downloads."""
        cfg: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id", 257)
        return cls(
            name=name or Path(path).name,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            attention_bias=cfg.get("model_type") == "qwen2" or cfg.get("attention_bias", False),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            dtype="auto",
        )


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # Tests and the demo on 2 CPU cores: a decode step of a few ms, random weights.
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=258,  # 256 bytes + BOS + EOS
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        init_std=0.05,
    ),
    # Qwen2.5-0.5B's shapes (GQA 14/2, tied embeddings, q/k/v bias) for GPU measurements.
    "qwen2.5-0.5b": ModelConfig(
        name="qwen2.5-0.5b",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        attention_bias=True,
        tie_word_embeddings=True,
        eos_token_id=257,  # byte tokenizer; a real checkpoint's config.json overrides it
        dtype="auto",
    ),
}


def get_model_config(name: str, model_path: str | None = None) -> ModelConfig:
    if model_path:
        return ModelConfig.from_hf_dir(model_path, name=name)
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_CONFIGS))
        raise ValueError(f"unknown model config {name!r} (known: {known})") from None


@dataclass
class EngineConfig:
    """Everything the reference engine is started with (SGLang's ServerArgs, trimmed)."""

    model: str = "tiny"
    model_path: str | None = None  # local HF dir with config.json + *.safetensors
    device: str = "auto"  # "cpu" / "cuda" / "auto"
    page_size: int = 1
    max_total_tokens: int = 4096  # KV pool size in token slots
    max_running_requests: int = 32
    context_length: int = 1024  # longest prompt + output a request may have
    chunked_prefill_size: int | None = 256  # None: never chunk a prompt
    max_prefill_tokens: int = 1024  # new tokens per prefill batch
    enable_overlap: bool = False
    enable_radix_cache: bool = True
    # Evicted radix-cache pages are copied asynchronously to a CPU tier (medium CPU_PINNED)
    # of this many pages; "offload in flight" is one of the states is_fully_idle waits out.
    enable_kv_offload: bool = True
    kv_offload_pages: int = 1024
    seed: int = 0
    # CPU only: torch intra-op threads. Small models gain nothing from more, and OpenMP
    # threads spinning on shared cores cost several times the step. None: leave torch's.
    cpu_threads: int | None = 1
    # Admission over-commits decode KV by this ratio of the remaining max_new_tokens, decaying
    # towards the minimum each decode step; a retraction raises it back (SGLang's policy).
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.002
    # Telemetry
    telemetry_endpoint: str | None = None  # None: no telemetry unless an emitter is given
    engine_id: str | None = None
    decode_log_interval: int = 40  # decode batches per gen_throughput window (SGLang default)
    kv_load_interval_s: float = 0.5  # KvLoad while busy (≥ once a second)
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int | None = None

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict[str, str | int | float | bool | None]:
        """Flat scalar view for EngineInfo.config and /server_info."""
        out: dict[str, str | int | float | bool | None] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, str | int | float | bool):
                out[f.name] = value
        return out
