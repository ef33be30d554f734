"""core/chat.py and core/scoring.py: the assistant spans and the log-likelihoods every part of the project shares."""
from __future__ import annotations

import math

import pytest

from core import scoring
from core.chat import tokenize_conversation

SYSTEM = "Be brief."
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "First question?"},
                {"role": "assistant", "content": "First answer."}, {"role": "user", "content": "Second?"},
                {"role": "assistant", "content": "Second answer."}]


def test_assistant_mask_covers_assistant_turns_only(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = tokenize_conversation(tok, CONVERSATION)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "First answer.<|im_end|>\nSecond answer.<|im_end|>\n"
    ignored = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert SYSTEM in ignored and "First question?" in ignored and "Second answer" not in ignored


def test_ranking_metrics_match_hand_computation():
    # normalised: chosen -2, -3; rejected -3, -2 -> margins +1, -1
    m = scoring.ranking_metrics([(-10.0, 5), (-30.0, 10)], [(-12.0, 4), (-20.0, 10)])
    assert m == {"pref_accuracy": 0.5, "pref_margin": 0.0}
    m = scoring.ranking_metrics([(-4.0, 2)], [(-9.0, 3)])  # -2 vs -3
    assert m["pref_accuracy"] == 1.0 and m["pref_margin"] == pytest.approx(1.0)
    # beta * ((pc - rc) - (pr - rr)) = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2
    r = scoring.implicit_reward_accuracy([(-10.0, -12.0), (-5.0, -5.0)], [(-11.0, -11.0), (-4.0, -6.0)], beta=0.1)
    assert r["reward_accuracy"] == 0.5
    assert r["reward_margin"] == pytest.approx((0.2 + 0.1 * ((-5 + 4) - (-5 + 6))) / 2)


def test_perplexity_is_exp_of_mean_nll(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "Compound interest grows a deposit faster than simple interest over long periods."
    scorer = scoring.Scorer(tiny_model_dir)
    nll, n = scorer.text_nll([text])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        mean_nll = model(input_ids=ids, labels=ids).loss.item()
    assert n == ids.shape[1] - 1
    assert scoring.perplexity_from_nll(nll, n) == pytest.approx(math.exp(mean_nll), rel=1e-4)


def test_conversation_nll_is_the_loss_sft_trains(tiny_model_dir):
    """The scorer's conversation loss equals the model's own loss with labels on the SFT mask only, and a
    conversation scored in a padded batch scores as it does alone."""
    import torch
    from transformers import AutoModelForCausalLM

    scorer = scoring.Scorer(tiny_model_dir)
    enc = tokenize_conversation(scorer.tok, CONVERSATION)
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.where(torch.tensor([enc["assistant_masks"]]) == 1, ids, -100)
    with torch.no_grad():
        loss = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids, labels=labels).loss.item()
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    nll, n = scorer.conversation_nll([CONVERSATION])
    batched, n2 = scorer.conversation_nll([CONVERSATION, short])
    alone, n_short = scorer.conversation_nll([short])
    assert n == sum(enc["assistant_masks"][1:]) and nll / n == pytest.approx(loss, rel=1e-4)
    assert n2 == n + n_short and batched == pytest.approx(nll + alone, rel=1e-4)


def test_batching_keeps_order_and_values(tiny_model_dir):
    """Scored shortest first in token-budget batches, every result comes back in the order given and equals the
    sequence scored alone with the model's own full logits; greedy answers come back in prompt order too."""
    import torch
    from transformers import AutoModelForCausalLM

    scorer = scoring.Scorer(tiny_model_dir, batch_tokens=64)  # several batches
    prompts = [[{"role": "user", "content": "Hi" + " again" * k}] for k in (6, 0, 11, 2)]
    completions = [[{"role": "assistant", "content": "Fine" + " thanks" * k}] for k in (0, 9, 3, 5)]
    batched = scorer.completion_logps(prompts, completions)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for prompt, completion, (logp, n) in zip(prompts, completions, batched):
        ids, mask = scoring.completion_mask(scorer.tok, prompt, completion)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        assert n == int(keep.sum()) and logp == pytest.approx(float(lp[keep].sum()), rel=1e-4)
    together = scorer.generate(prompts, max_new_tokens=5)
    assert together == [scorer.generate([p], max_new_tokens=5)[0] for p in prompts]
