"""CPU speed-ups for the cpt and sft stages (transformers + PEFT backend), measured with bench/train_throughput.py.

Both keep the trainer's numbers identical (same loss, entropy and token accuracy on the same batches) and only
change how they are computed:

- `packed_attention`: a packed batch (TRL's padding-free collator puts every conversation of the batch in one
  row, position ids restarting per conversation) goes through SDPA with a dense block-diagonal mask over the
  whole row, so attention costs (batch x max_length)^2 however short the conversations are. Here each
  conversation is attended to on its own (causal SDPA per segment, the "varlen" idea of flash-attention),
  which costs the sum of the squared lengths: attention fell from 36% of an SFT step to 8%.
- `plain_lm_head`: TRL 1.16 replaces the LM head with a chunked log-prob kernel; without Triton (CPU) it folds
  the vocabulary tiles with a dozen separate torch passes and scores masked (non-assistant) positions too.
  Here the logits of the labelled positions only are computed in one matmul and scored with torch's fused
  cross-entropy: the head's share of a step fell from about 4.5 s to about 1 s (SmolLM2, 2k tokens).

On CUDA the Triton kernel and flash-attention are used as they are.
"""
from __future__ import annotations

import types

from core.scoring import plain_head_ok

ATTENTION = "packed_sdpa"


def _packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                 **kwargs):
    """Attention of query/key/value [batch, heads, tokens, head_dim]; [batch, tokens, heads, head_dim] out."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def dense():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    if position_ids is None or dropout:
        return dense()
    positions = position_ids.expand(query.shape[0], -1)
    starts = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1  # where a conversation begins
    if not bool(starts[:, 1:].any()):  # one sequence per row (padded batches, generation): the mask decides
        return dense()
    grouped = query.shape[1] != key.shape[1]
    rows = []
    for b in range(query.shape[0]):
        cuts = [0] + (torch.nonzero(starts[b, 1:]).flatten() + 1).tolist() + [query.shape[2]]
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           is_causal=True, scale=scaling, enable_gqa=grouped)
            for s, e in zip(cuts[:-1], cuts[1:])], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def inner_model(trainer):
    """The transformers model inside the trainer's (possibly PEFT-wrapped) model."""
    return trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model


def enable(trainer):
    """Both speed-ups on an SFTTrainer (DPO and KTO trainers: the LM head; their padded rows keep dense attention); returns (the callable that puts the attention back before saving,
    whether the plain LM head replaced TRL's)."""
    model = inner_model(trainer)
    previous = packed_attention(model)
    return (lambda: restore_attention(model, previous)), plain_lm_head(trainer)


def compile_decoder_layers(model):
    """torch.compile each decoder layer (dynamic shapes: packed batches change length every step). Inductor fuses
    the elementwise work the matmuls leave on the table (RMSNorm, rotary, SiLU, PEFT's LoRA scaling and adds); the
    per-conversation attention loop stays eager. The layers share one compiled graph, made on the first step.
    Returns what puts the plain layers back. A model without `model.layers` is left alone."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return lambda: None
    for layer in layers:
        layer.compile(dynamic=True)

    def uncompile():
        for layer in layers:
            layer._compiled_call_impl = None

    return uncompile


def packed_attention(model) -> str:
    """Switch `model` to per-conversation attention; returns the implementation to restore before saving."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # compiled decoder layers (compile_decoder_layers) run this loop over conversations eagerly, a planned
    # graph break instead of one dynamo warns about
    AttentionInterface.register(ATTENTION, torch.compiler.disable(_packed_sdpa))
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # rows that are not packed still get their mask
    previous = model.config._attn_implementation
    if previous == "sdpa":
        model.set_attn_implementation(ATTENTION)
    return previous


def restore_attention(model, previous: str) -> None:
    if model.config._attn_implementation == ATTENTION:
        model.set_attn_implementation(previous)


def plain_lm_head(trainer) -> bool:
    """Replace TRL's chunked LM head (installed by SFTTrainer) with one matmul over the labelled positions.
    Skipped (False) for models whose logits are scaled or soft-capped, which TRL's kernel handles."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.utils import FusedCausalLMOutput

    model = inner_model(trainer)
    if not plain_head_ok(model.config) or getattr(trainer.args, "temperature", 1.0) not in (None, 1.0):
        return False
    weighted = bool(getattr(trainer, "use_weighting", False))
    trl_forward = model.forward  # TRL's patched forward: plain generation, or its kernel with fused_lm_head=True

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        target = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float()
        log_softmax = F.log_softmax(logits, dim=-1)
        log_probs = log_softmax.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():  # the metrics TRL logs: entropy, top-1 accuracy, mean logit (DPO, KTO)
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            is_top1 = log_softmax.argmax(-1) == target
            mean_logits = logits.mean(-1)
            sum_sq = torch.logsumexp(2 * log_softmax, dim=-1) if weighted else None  # DPO's WPO weights

        def spread(x):  # back to [batch, tokens - 1], zero where the label is ignored
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = spread(log_probs)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=spread(entropy),
                                   is_top1=spread(is_top1), mean_logits=spread(mean_logits), label_mask=mask,
                                   log_sum_sq_probs=spread(sum_sq) if weighted else None)

    model.forward = types.MethodType(forward, model)
    return True
