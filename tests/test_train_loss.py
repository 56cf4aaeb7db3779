"""``answer_token_loss``: the LM head on the answer positions only gives transformers' loss and gradients;
``unlikelihood_loss``: Welleck et al.'s token-level formula."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from safemerge.testing import make_tiny_model
from safemerge.train.loss import answer_token_loss, has_plain_head, unlikelihood_loss
from safemerge.train.tokenize import IGNORE_INDEX, collate, first_answer_tokens


def _batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    """Three examples of different lengths, prompts masked, right-padded by ``collate``."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for prompt, answer in ((5, 3), (9, 6), (2, 1)):
        ids = torch.randint(3, vocab, (prompt + answer,), generator=g).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return collate(examples, pad_token_id=0)


def _lora(arch: str, targets: list[str] | str) -> torch.nn.Module:
    model = make_tiny_model(arch, seed=1, hidden=32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():  # non-zero B, so the LoRA path changes the logits
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return peft


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "lm_head"]])
def test_loss_and_gradients_equal_the_full_logits_loss(arch: str, targets: list[str] | str) -> None:
    torch.manual_seed(0)
    model = _lora(arch, ["qkv_proj", "lm_head"] if arch == "phi3" and targets != "all-linear" else targets)
    assert has_plain_head(model)
    batch = _batch()
    reference = model(**batch).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    loss = answer_token_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_other_architectures_use_their_own_forward() -> None:
    model = _lora("gemma", "all-linear")
    assert not has_plain_head(model)
    batch = _batch()
    torch.testing.assert_close(answer_token_loss(model, batch), model(**batch).loss, rtol=0, atol=0)


def test_a_batch_without_answer_tokens_gives_nan_like_transformers() -> None:
    model = _lora("llama", "all-linear")
    batch = _batch()
    batch["labels"].fill_(IGNORE_INDEX)
    assert torch.isnan(answer_token_loss(model, batch)) and torch.isnan(model(**batch).loss)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_unlikelihood_is_minus_log_one_minus_p_of_the_labelled_tokens(arch: str) -> None:
    # Welleck et al. 2020, Eq. 4, against the full logits of the model's own forward (plain head and not)
    model = _lora(arch, "all-linear")
    batch = _batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    p = torch.softmax(logits[keep], dim=-1).gather(1, targets[keep][:, None]).squeeze(1)
    expected = -torch.log(1 - p).mean()
    loss = unlikelihood_loss(model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    loss.backward()  # differentiable through the LoRA
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_first_answer_tokens_keeps_the_opening_only() -> None:
    ex = {"input_ids": list(range(8)), "labels": [IGNORE_INDEX] * 3 + [3, 4, 5, 6, 7]}
    assert first_answer_tokens(ex, 2)["labels"] == [IGNORE_INDEX] * 3 + [3, 4] + [IGNORE_INDEX] * 3
    assert first_answer_tokens(ex, 9)["labels"] == ex["labels"] and first_answer_tokens(ex, 2)["input_ids"] == ex[
        "input_ids"]
