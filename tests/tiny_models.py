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


def clip_tokenizer(texts: list[str], max_length: int = 16, vocab_size: int = 80):
    """A CLIP-style fast tokenizer (start/end tokens, lower case, padding) trained on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)


def tiny_clip(vocab_size: int, image_size: int, layers: int = 1):
    """A randomly initialised CLIPModel (width 32, patch 8, 16-d projection) for a tokenizer of
    ``vocab_size`` from :func:`clip_tokenizer`; seed torch first for reproducible weights."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16))
