"""LoRABackbone on both backbones: it starts as the model it wraps, the adapters-disabled view is that model whatever
the adapters hold, merging folds them in exactly, the spec rebuilds it, and a missing peft names the extra."""

from __future__ import annotations

import sys

import pytest
import torch

from rlhf_lightning.models.backbone import backbone_from_spec, backbone_spec
from rlhf_lightning.models.hf import HFCausalLM
from rlhf_lightning.models.lora import AdaptersDisabled, LoRABackbone, LoRAConfig, require_peft
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT

V = 40


def tiny_gpt() -> TinyGPT:
    return TinyGPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_seq_len=16)).eval()


def tiny_gpt2() -> HFCausalLM:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1)
    return HFCausalLM(GPT2LMHeadModel(config)).eval()


@pytest.mark.parametrize("make", [tiny_gpt, tiny_gpt2], ids=["tinygpt", "hf-gpt2"])
def test_adapters_start_at_zero_and_disabling_them_gives_the_wrapped_weights(make):
    backbone = make()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        before = backbone(ids)
    lora = LoRABackbone(backbone, LoRAConfig(r=4, alpha=8.0)).eval()
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():
        assert torch.equal(lora(ids), before)  # B = 0: exactly the wrapped model
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
        adapted = lora(ids)
        assert not torch.allclose(adapted, before)
        assert torch.equal(AdaptersDisabled(lora)(ids), before)
        assert torch.equal(lora(ids), adapted)  # the context switched them back on
        merged = lora.merged().eval()
        assert type(merged) is type(backbone)
        torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)
        rebuilt = backbone_from_spec(backbone_spec(lora)).eval()
        rebuilt.load_state_dict(lora.state_dict())
        assert torch.equal(rebuilt(ids), adapted)


def test_default_targets_and_config_checks():
    assert LoRABackbone(tiny_gpt(), LoRAConfig()).config.target_modules == ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    assert LoRABackbone(tiny_gpt2(), LoRAConfig()).config.target_modules == ("c_attn",)
    with pytest.raises(ValueError, match=r"lora\.r"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        LoRAConfig(target_modules=())


def test_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without peft looks like to `import peft`
    with pytest.raises(ImportError, match=r"rlhf-lightning\[lora\]"):
        require_peft()
