"""Small builders shared by tests: weight perturbation for zero-initialised models, and a BPE
tokenizer in CLIP's format trained on a few sentences (no download)."""

from __future__ import annotations

import torch


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add small random values to every weight. A fresh MicroDiT outputs F = 0 (zero-initialised
    output layers), which would make tests of its outputs pass trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def clip_tokenizer(texts: list[str], max_length: int = 16):
    """A CLIP-style fast tokenizer (start/end tokens, lower case, padding) trained on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=80, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)
