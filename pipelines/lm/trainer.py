"""The LM as a Task of the shared training loop (pipelines/train.py)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipelines.data import absolute_spec
from pipelines.lm.data import ByteCorpus, decode, encode
from pipelines.lm.model import MoELM

# sized for the 2-core CPU: `sigma train-lm` with no options finishes in a few minutes
LM_PRESETS = {"tiny": dict(width=128, depth=4, heads=4, context=128, experts=16, expert_hidden=64, top_k=2, shared_experts=1)}
LM_TRAIN = {"tiny": dict(steps=1000, batch_size=16, lr=2e-3, warmup=100, ema=0.0, weight_decay=0.1)}


@dataclass
class LMStage:
    optimizer: str = "adamw"  # "adamw" | "muon" (matrices, including each expert's; AdamW for the rest)
    muon_lr_scale: float = 10.0  # Muon's lr relative to --lr (Muon steps are orthogonalised, of unit scale)
    sample_prompt: str = "The "


def make_lm_optimizer(model: MoELM, cfg, stage: LMStage) -> torch.optim.Optimizer:
    """Weight matrices (Linear weights, stacked expert weights) get weight decay, and Muon with --optimizer muon;
    everything else (embedding, router, norms, NSA position codes, MTA kernels and head mixing) is AdamW, and
    only the embedding of those is decayed (identity-initialised kernels and gains must not decay to 0)."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    experts = {id(p) for n, p in model.named_parameters() if n.endswith(("w_in", "w_out"))}
    decay, no_decay, muon, muon_experts = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        matrix = (id(p) in linear or id(p) in experts) and "router" not in name
        if stage.optimizer == "muon" and matrix:
            (muon_experts if id(p) in experts else muon).append(p)
        elif matrix or "embed" in name:
            decay.append(p)
        else:
            no_decay.append(p)
    if stage.optimizer == "muon":
        from pipelines.nn.muon import MuonAdamW
        from pipelines.train import uses_bf16

        muon_kw = {"use_muon": True, "weight_decay": cfg.weight_decay, "lr_scale": stage.muon_lr_scale}
        return MuonAdamW([
            {"params": muon, **muon_kw},  # nn.Linear: [out, in]
            # experts are stored [in, out]; w_in holds gate | up side by side: orthogonalised as two matrices
            {"params": muon_experts, **muon_kw, "in_out": True, "split_out": 2},
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), bf16_newton_schulz=uses_bf16(cfg.precision, next(model.parameters()).device))
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(model: MoELM, corpus: ByteCorpus, max_windows: int | None = None, batch_size: int = 32) -> dict:
    """Mean validation cross-entropy (nats per byte) and bits per byte over the held-out tail."""
    was = model.training
    model.eval()
    x, y = corpus.val_windows(max_windows)
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(model.device))
        total += F.cross_entropy(logits.flatten(0, 1).float(), y[i : i + batch_size].flatten().to(model.device), reduction="sum").item()
        count += y[i : i + batch_size].numel()
    model.train(was)
    loss = total / count
    return {"val_loss": loss, "bits_per_byte": loss / math.log(2), "val_bytes": count}


class LMTask:
    kind = "lm"

    def __init__(self, model: MoELM, corpus: ByteCorpus, stage: LMStage, batch_size: int, data_spec: str | None, train_cfg):
        self.model, self.corpus, self.stage, self.batch_size, self.data_spec = model, corpus, stage, batch_size, data_spec
        self.samples_per_step = batch_size * model.config.context  # tokens
        self.train_cfg = train_cfg

    @staticmethod
    def dsa_warmup(model) -> bool:
        return model.config.attn == "dsa" and (model.config.attn_config or {}).get("stage", "sparse") == "warmup"

    def trainable(self, model):
        if self.dsa_warmup(model):
            model.requires_grad_(False)  # DSA stage 1: only the lightning indexers learn
            for p in model.indexer_parameters():
                p.requires_grad_(True)
        else:
            model.requires_grad_(True)

    def make_optimizer(self, model, cfg):
        return make_lm_optimizer(model, cfg, self.stage)

    def loss(self, net, model: MoELM, step: int, generator: torch.Generator, rank: int, world: int):
        x, y = self.corpus.batch(generator, self.batch_size)  # the global batch; this rank takes its share
        b = self.batch_size // world
        x, y = x[rank * b : (rank + 1) * b].to(model.device), y[rank * b : (rank + 1) * b].to(model.device)
        logits = net(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        logs = {"ce": loss.item()}
        aux = model.aux_loss()
        if aux is not None:
            loss = loss + aux
            logs["balance_loss"] = aux.item()
        kl = model.indexer_loss()
        if kl is not None:  # its gradient reaches only the indexers (frozen model, or detached indexer input)
            loss = loss + kl
            logs["indexer_kl"] = kl.item()
        return loss, logs

    @torch.no_grad()
    def after_step(self, model: MoELM, step: int):
        """Aux-loss-free balancing: every rank applies the same update from the all-reduced loads. Not in DSA's
        warm-up, where the model is frozen and only the indexers learn (the router bias is part of the model)."""
        gamma = 0.0 if self.dsa_warmup(model) else model.config.bias_update
        for layer in model.moe_layers():
            load = layer.load.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(load)
            if gamma > 0:
                layer.update_bias(gamma, load)
            else:
                layer.load.zero_()

    @torch.no_grad()
    def pictures(self, model: MoELM, step: int, run_dir: Path) -> Path:
        """The LM's 'picture': a text sample and the validation figures, in samples.txt."""
        prompt = encode(self.stage.sample_prompt)[None].to(model.device)
        out = model.generate(prompt, 200, temperature=0.8, top_k=40, generator=torch.Generator(device=model.device).manual_seed(0))
        ev = evaluate(model, self.corpus, max_windows=64)
        path = run_dir / "samples.txt"
        from checkpoints.io import atomic_write_text

        atomic_write_text(path, f"step {step}, validation bits/byte {ev['bits_per_byte']:.3f} (first 64 windows)\n\n"
                          + decode(out[0].tolist()) + "\n")
        return path

    def metadata(self) -> dict:
        return {"data": self.corpus.name, "data_spec": absolute_spec(self.data_spec), "data_sha256": self.corpus.digest,
                "stage": asdict(self.stage)}
