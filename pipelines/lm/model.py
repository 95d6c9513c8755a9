"""A small decoder-only language model whose FFNs are DeepSeekMoE (fine-grained routed + shared experts).

RMSNorm, RoPE, SwiGLU; attention through the kernels (dense SDPA, causal NSA, causal MTA); the output head
is tied to the byte embedding (logits = h E^T: one tensor in the state dict, so safetensors saves it once).
Router (DeepSeek-V3): sigmoid scores, a per-expert bias used ONLY to choose the top-k, gates = the chosen
unbiased scores renormalised (x route_scale); aux-loss-free balancing moves the bias after every step by
gamma * sign(mean load - load); an optional sequence-wise balance loss; softmax routing as an option.

Axis legend: B batch, T tokens, D width, H query heads, Hkv kv heads, K head dim, E routed experts,
F expert hidden size, k experts per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from kernels.moe import moe_ffn
from pipelines.nn.layers import RMSNorm, apply_rope, sdpa

LM_ATTN_KINDS = ("dense", "nsa", "mta", "dsa")


def rope_1d(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    freqs = theta ** (-torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device) / (head_dim // 2))
    angle = positions.float()[:, None] * freqs  # [T, K/2]
    return angle.cos(), angle.sin()


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    def __init__(self, dim: int, experts: int, hidden: int, top_k: int, shared: int, router: str = "sigmoid",
                 route_scale: float = 1.0, balance_loss: float = 0.0, backend: str = "auto"):
        super().__init__()
        if router not in ("sigmoid", "softmax"):
            raise ValueError(f"router must be sigmoid or softmax, not {router!r}")
        if not 1 <= top_k <= experts:
            raise ValueError(f"top-k {top_k} must be between 1 and the {experts} experts")
        self.top_k, self.router_kind, self.route_scale = top_k, router, route_scale
        self.balance_weight, self.backend = balance_loss, backend
        std = dim**-0.5
        self.w_in = nn.Parameter(torch.randn(experts, dim, 2 * hidden) * std)  # [E, D, 2F]: SwiGLU gate | up
        self.w_out = nn.Parameter(torch.zeros(experts, hidden, dim))  # [E, F, D]; zero: each expert starts silent
        self.router = nn.Linear(dim, experts, bias=False)
        self.register_buffer("bias", torch.zeros(experts))  # chooses experts only; saved with the weights
        self.register_buffer("load", torch.zeros(experts), persistent=False)  # tokens per expert since the update
        self.shared = SwiGLU(dim, shared * hidden) if shared else None
        self.aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        logits = self.router(flat).float()  # [B*T, E]
        scores = torch.sigmoid(logits) if self.router_kind == "sigmoid" else torch.softmax(logits, -1)
        choice = (scores + self.bias).topk(self.top_k, dim=-1).indices  # the bias steers the choice only
        gate = scores.gather(1, choice)
        if self.router_kind == "sigmoid":
            gate = gate / gate.sum(-1, keepdim=True)
        gate = gate * self.route_scale
        out = moe_ffn(flat, self.w_in, self.w_out, choice, gate, self.backend).view(B, T, D)
        if self.training:
            with torch.no_grad():
                self.load += torch.bincount(choice.flatten(), minlength=self.load.numel()).to(self.load.dtype)
            self.aux_loss = self.sequence_balance_loss(scores.view(B, T, -1), choice.view(B, T, -1)) if self.balance_weight else None
        if self.shared is not None:
            out = out + self.shared(x)
        return out

    def sequence_balance_loss(self, scores, choice):
        """DeepSeek-V3 eq. 17-20: alpha * sum_e f_e P_e per sequence, averaged over the batch."""
        B, T, E = scores.shape
        f = torch.zeros(B, E, device=scores.device).scatter_add_(1, choice.reshape(B, -1),
                                                                 torch.ones(B, T * self.top_k, device=scores.device))
        f = f * E / (self.top_k * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
        return self.balance_weight * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float, load: torch.Tensor | None = None):
        """Aux-loss-free balancing: overloaded experts get a lower bias, underloaded a higher one."""
        load = self.load if load is None else load
        self.bias += gamma * torch.sign(load.mean() - load)
        self.load.zero_()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, attn: str, attn_config: dict | None, layer: int):
        super().__init__()
        if attn not in LM_ATTN_KINDS:
            raise ValueError(f"attention kind {attn!r} is not available for the LM (have: {', '.join(LM_ATTN_KINDS)})")
        if dim % heads or heads % kv_heads:
            raise ValueError(f"width {dim} / {heads} heads / {kv_heads} kv heads do not divide")
        if (dim // heads) % 2:  # RoPE turns pairs of channels
            raise ValueError(f"width {dim} / {heads} heads: heads of odd size {dim // heads}; RoPE needs an even size")
        self.heads, self.kv_heads, self.head_dim, self.attn = heads, kv_heads, dim // heads, attn
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.op_layer = None
        if attn == "nsa":
            from kernels.nsa.module import NSACausal

            self.op_layer = NSACausal(dim, heads, kv_heads, self.head_dim, **(attn_config or {}))
        elif attn == "mta":
            from kernels.mta.module import MTA

            self.op_layer = MTA(dim, heads, self.head_dim, causal=True, layer=layer, **(attn_config or {}))
        elif attn == "dsa":
            from kernels.dsa.module import DSA

            self.op_layer = DSA(dim, heads, self.head_dim, **(attn_config or {}))

    def forward(self, x, cos, sin, cache: dict | None = None):
        B, T, D = x.shape
        H, Hkv, K = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, H + 2 * Hkv, K).transpose(1, 2).split([H, Hkv, Hkv], dim=1)  # [B, h, T, K]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # KV cache: append this call's keys and values (the sparse kinds keep more in it)
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        if self.op_layer is not None:
            if self.attn in ("mta", "dsa") and Hkv != H:
                k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            o = self.op_layer(x, q.contiguous(), k.contiguous(), v.contiguous(), cache)
        else:
            # new queries sit at the end: with a cache and one new token it sees every key; from an empty cache
            # (or none) the usual causal mask applies
            causal = k.shape[2] == T
            if not causal and T != 1:
                raise ValueError("the KV cache takes one new token at a time after the prompt")
            o = sdpa(q, k, v, is_causal=causal and T > 1, enable_gqa=Hkv != H)
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.width), RMSNorm(cfg.width)
        self.attn = Attention(cfg.width, cfg.heads, cfg.kv_heads or cfg.heads, cfg.attn, cfg.attn_config, layer)
        if cfg.ffn == "moe":
            self.ffn = MoE(cfg.width, cfg.experts, cfg.expert_hidden, cfg.top_k, cfg.shared_experts, cfg.router,
                           cfg.route_scale, cfg.balance_loss)
        else:  # the same active size: (top_k + shared) experts' worth of hidden units
            self.ffn = SwiGLU(cfg.width, (cfg.top_k + cfg.shared_experts) * cfg.expert_hidden)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.norm1(x), cos, sin, cache)
        return x + self.ffn(self.norm2(x))


class MoELM(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 256,  # bytes
        context: int = 128,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        kv_heads: int | None = None,  # GQA; None = heads
        ffn: str = "moe",  # "moe" | "dense" (same active parameters)
        experts: int = 16,
        expert_hidden: int = 64,
        top_k: int = 2,
        shared_experts: int = 1,
        router: str = "sigmoid",  # "sigmoid" (V3) | "softmax" (DeepSeekMoE v1)
        route_scale: float = 1.0,
        bias_update: float = 1e-3,  # gamma of the aux-loss-free balancing (0 = off)
        balance_loss: float = 0.0,  # alpha of the sequence-wise balance loss (0 = off)
        attn: str = "dense",
        attn_config: dict | None = None,
    ):
        super().__init__()
        if ffn not in ("moe", "dense"):
            raise ValueError(f"ffn must be moe or dense, not {ffn!r}")
        self.embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        cfg = self.config
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(depth))
        self.norm = RMSNorm(width)
        for name, p in self.named_parameters():  # residual outputs scaled down with depth (GPT-2)
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def forward(self, idx: torch.Tensor, caches: list | None = None, start: int = 0) -> torch.Tensor:
        """idx: [B, T] byte ids at positions start..start+T-1 -> logits [B, T, vocab]."""
        B, T = idx.shape
        cos, sin = rope_1d(torch.arange(start, start + T, device=idx.device), self.config.width // self.config.heads)
        h = self.embed(idx)
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, caches[i] if caches is not None else None)
        return self.norm(h) @ self.embed.weight.t()  # tied head

    def aux_loss(self):
        """The routers' sequence balance losses (if on)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return sum(losses) if losses else None

    def indexer_loss(self):
        """DSA: the lightning indexers' KL to the main attention (mean over layers), or None."""
        from kernels.dsa.module import DSA

        losses = [m.indexer_loss for m in self.modules() if isinstance(m, DSA) and m.indexer_loss is not None]
        return sum(losses) / len(losses) if losses else None

    def indexer_parameters(self) -> list:
        from kernels.dsa.module import DSA

        return [p for m in self.modules() if isinstance(m, DSA) for p in m.indexer_parameters()]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """prompt: [B, T0] -> [B, T0 + max_new_tokens]. With use_cache every attention kind keeps its keys and values
        (NSA its compressed blocks too, DSA its indexer's keys, MTA the queries its convolutions read) and runs one new
        token a step; past the context the window is recomputed each step."""
        was_training = self.training
        self.eval()  # sampled tokens must not count as router load (the aux-loss-free update reads it)
        try:
            return self._generate(prompt, max_new_tokens, temperature, top_k, generator, use_cache)
        finally:
            self.train(was_training)

    def _generate(self, prompt, max_new_tokens, temperature, top_k, generator, use_cache):
        idx = prompt
        ctx = self.config.context
        caches = None
        for _ in range(max_new_tokens):
            if use_cache and idx.shape[1] <= ctx:
                if caches is None:  # prefill
                    caches = [{} for _ in self.blocks]
                    logits = self(idx, caches, 0)
                else:
                    logits = self(idx[:, -1:], caches, idx.shape[1] - 1)
            else:
                caches = None
                logits = self(idx[:, -ctx:])
            logits = logits[:, -1].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], 1)
        return idx
