"""A Llama/Qwen-style decoder (RMSNorm, RoPE, GQA attention over the paged KV pool, SwiGLU).

Parameter names follow HF's checkpoints (``model.layers.0.self_attn.q_proj.weight`` …), so a
local safetensors directory loads with no renaming. Without one, weights are random but
deterministic: drawn from a generator seeded with the engine seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from schedscope.engine.config import ModelConfig


@dataclass
class AttentionMeta:
    """Where a forward pass reads and writes KV, built once per batch and shared by all layers."""

    out_slots: torch.Tensor  # [T] pool slot that receives each new token's K/V
    decode: bool
    # decode: one query per request, padded gather over each request's slots
    kv_index: torch.Tensor | None = None  # [B, L]
    kv_mask: torch.Tensor | None = None  # [B, 1, 1, L] True = attend
    # extend (prefill): per request (first query row, query count, its slots, mask or None)
    segments: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMeta,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache[meta.out_slots] = k
        v_cache[meta.out_slots] = v
        if meta.decode:
            assert meta.kv_index is not None
            kk = k_cache[meta.kv_index].transpose(1, 2)  # [B, KVH, L, D]
            vv = v_cache[meta.kv_index].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2), kk, vv, attn_mask=meta.kv_mask, enable_gqa=True
            )  # [B, H, 1, D]
            out = out.reshape(t, -1)
        else:
            assert meta.segments is not None
            parts = []
            for start, n, slots, mask in meta.segments:
                qq = q[start : start + n].transpose(0, 1)  # [H, n, D]
                kk = k_cache[slots].transpose(0, 1)  # [KVH, L, D]
                vv = v_cache[slots].transpose(0, 1)
                o = F.scaled_dot_product_attention(
                    qq, kk, vv, attn_mask=mask, is_causal=mask is None, enable_gqa=True
                )
                parts.append(o.transpose(0, 1).reshape(n, -1))
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def rope_tables(
    cfg: ModelConfig, max_positions: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim] in HF's rotate_half layout (computed in float64)."""
    d = cfg.head_dim
    exps = torch.arange(0, d, 2, dtype=torch.float64, device=device) / d
    inv_freq = 1.0 / (cfg.rope_theta**exps)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        cos, sin = rope_tables(cfg, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMeta,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        logit_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [len(logit_rows), V] for the rows that sample; writes K/V of every token."""
        h = self.model.embed_tokens(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1).to(h.dtype)  # [T, 1, D]
        sin = self.rope_sin[positions].unsqueeze(1).to(h.dtype)
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, meta, k_cache, v_cache)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h[logit_rows])
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight).float()


def build_model(
    cfg: ModelConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    max_positions: int,
    model_path: str | None = None,
) -> CausalLM:
    """Weights from ``model_path`` (local safetensors) or deterministic random from ``seed``."""
    with torch.device("meta"):
        model = CausalLM(cfg, max_positions)
    model = model.to_empty(device=device)  # meta: no wasted default init of big weights
    cos, sin = rope_tables(cfg, max_positions, torch.device("cpu"))
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    if model_path:
        load_safetensors(model, model_path)
    else:
        init_random(model, seed, cfg.init_std)
    return model.to(dtype).eval()


@torch.no_grad()
def init_random(model: CausalLM, seed: int, std: float) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=gen)


@torch.no_grad()
def load_safetensors(model: CausalLM, path: str | Path) -> None:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    params = dict(model.named_parameters())
    missing = set(params)
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if name in params:
                params[name].copy_(tensor)
                missing.discard(name)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {min(missing)}")
