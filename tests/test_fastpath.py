"""pipeline/fastpath.py computes the same numbers as the paths it replaces: per-conversation attention equals
each conversation run on its own, and the plain LM head equals TRL's chunked kernel (loss, metrics, gradients)."""
from __future__ import annotations

import types

import pytest
import torch

from pipeline import fastpath


@pytest.fixture()
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


def packed_row(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(5, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return docs, ids, positions


def test_packed_attention_equals_each_conversation_alone(model):
    docs, ids, positions = packed_row([7, 12, 5], model.config.vocab_size)
    alone = torch.cat([model(input_ids=d.unsqueeze(0)).logits[0] for d in docs])
    dense = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]  # block-diagonal mask

    previous = fastpath.packed_attention(model)
    assert model.config._attn_implementation == fastpath.ATTENTION
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed, dense, atol=1e-5, rtol=1e-4)

    # a padded batch (one sequence per row) still goes through the mask
    batch = torch.tensor([[0, 0, 9, 10, 11], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with_fastpath = model(input_ids=batch, attention_mask=mask).logits
    fastpath.restore_attention(model, previous)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(with_fastpath[:, 2:], model(input_ids=batch, attention_mask=mask).logits[:, 2:],
                               atol=1e-5, rtol=1e-4)


def test_packed_attention_gradients_match(model):
    _, ids, positions = packed_row([9, 4, 11], model.config.vocab_size, seed=1)

    def grads():
        model.zero_grad()
        model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    dense = grads()
    previous = fastpath.packed_attention(model)
    packed = grads()
    fastpath.restore_attention(model, previous)
    for a, b in zip(packed, dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_plain_lm_head_equals_trl_kernel(model):
    from trl.trainer.utils import add_fused_lm_head

    _, ids, positions = packed_row([10, 14, 6], model.config.vocab_size, seed=2)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt: not scored
    labels[0, 10:13] = -100
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))

    def run():
        model.zero_grad()
        out = model(input_ids=ids, position_ids=positions, labels=labels, fused_lm_head=True, use_cache=False)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    trl_out, trl_grads = run()
    assert fastpath.plain_lm_head(types.SimpleNamespace(model=model, args=types.SimpleNamespace(temperature=1.0)))
    ours, our_grads = run()
    torch.testing.assert_close(ours.loss, trl_out.loss, atol=1e-5, rtol=1e-5)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(ours, field), getattr(trl_out, field), atol=1e-4, rtol=1e-4)
    assert torch.equal(ours.is_top1.bool(), trl_out.is_top1.bool())
    assert torch.equal(ours.label_mask, trl_out.label_mask)
    assert ours.log_probs[0, :3].abs().sum() == 0  # ignored positions are zero
    for a, b in zip(our_grads, trl_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # generation (no fused_lm_head) still goes through the model's own forward
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_plain_lm_head_skips_soft_capped_models(model):
    model.config.final_logit_softcapping = 30.0
    assert not fastpath.plain_lm_head(types.SimpleNamespace(model=model, args=types.SimpleNamespace(temperature=1.0)))


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_same_loss_and_gradients(model):
    _, ids, positions = packed_row([6, 10, 8], model.config.vocab_size, seed=2)
    fastpath.packed_attention(model)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads()
    uncompile = fastpath.compile_decoder_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    compiled_loss, compiled_grads = loss_and_grads()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-4)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    uncompile()
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    assert fastpath.compile_decoder_layers(torch.nn.Linear(2, 2))() is None  # no decoder layers: left alone


def test_plain_lm_head_gives_dpo_the_same_loss_and_rewards(tiny_model_dir, tmp_path):
    """The pref stage puts the plain head under TRL's DPOTrainer too (policy and the adapter-off reference)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
              "chosen": [{"role": "assistant", "content": "A careful answer" + " indeed" * i}],
              "rejected": [{"role": "assistant", "content": "No" + " idea" * (3 - i)}]} for i in range(4)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True,
                     max_length=64, dataset_num_proc=None)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    def loss_and_rewards():
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, batch)
        return loss, {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}

    trl_loss, trl_rewards = loss_and_rewards()
    assert fastpath.plain_lm_head(trainer)
    loss, rewards = loss_and_rewards()
    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=1e-5)
    assert trl_rewards and rewards.keys() == trl_rewards.keys()
    for k in rewards:
        assert rewards[k] == pytest.approx(trl_rewards[k], abs=1e-4)
