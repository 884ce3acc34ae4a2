"""The phase modules' shared helpers: the learning-rate schedule and the markdown tables."""

import math

import pytest

from rlhf_lightning.modules.common import lr_factor, markdown_table


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_factor_warms_up_then_decays_to_the_floor(decay):
    # 2 warmup steps, then 4 steps of decay to 0.2: halfway (step 4) linear gives 0.6, cosine 0.2 + 0.8 * 0.5 = 0.6.
    f = [lr_factor(step, 2, 6, 0.2, decay) for step in range(8)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == pytest.approx(1.0) and f[4] == pytest.approx(0.6) and f[6] == f[7] == pytest.approx(0.2)
    quarter = 1 - 0.8 * 0.25 if decay == "linear" else 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))
    assert f[3] == pytest.approx(quarter)


def test_markdown_table_escapes_pipes():
    assert markdown_table(["a", "b"], [["x|y", "z"]]) == "| a | b |\n|---|---|\n| x\\|y | z |"


def test_scoring_fuses_the_head_unless_lora_adapts_it(tmp_path):
    """response_token_logprobs takes the fused path (hidden states and lm_head_weight) for a plain head and the
    logits of the head module itself when LoRA adapts it: both equal the log-softmax of the model's own logits."""
    pytest.importorskip("peft")
    import torch

    from rlhf_kernels.reference import token_logprobs_reference
    from rlhf_lightning.hf_tiny import make_tiny_hf
    from rlhf_lightning.models.hf import HFCausalLM
    from rlhf_lightning.models.lora import LoRABackbone, LoRAConfig
    from rlhf_lightning.modules.common import adapted_lm_head, response_token_logprobs

    path = make_tiny_hf(tmp_path / "gpt2")
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, -1] = False  # a padded response position
    response_ids, response_mask = ids[:, 4:], mask[:, 4:]
    for targets, adapted in ((("c_attn",), False), (("c_attn", "lm_head"), True)):
        model = LoRABackbone(HFCausalLM.from_pretrained(path), LoRAConfig(r=2, alpha=4.0, target_modules=targets))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters matter
                torch.nn.init.normal_(p, std=0.5)
        assert (adapted_lm_head(model) is not None) == adapted
        logp, _ = response_token_logprobs(model, ids, mask, response_ids, response_mask, 0.9, False)
        with torch.no_grad():
            logits = model.base.model(input_ids=ids, attention_mask=mask.long()).logits[:, 3:6]  # the model's own
        want = token_logprobs_reference(logits[response_mask], response_ids[response_mask], 0.9)
        torch.testing.assert_close(logp[response_mask], want.float(), rtol=1e-5, atol=1e-5)
        assert not logp[~response_mask].any()
