"""Tokenizer and tiny models: round trips through save_pretrained, padding-safe scoring."""

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_lit.hf.models import HFModel, ScalarModel, TinyModel, lm_inputs, load_scalar_model
from rlhf_lit.hf.tokenizer import HFTokenizer, ensure_pad, tokenizer_fingerprint
from rlhf_lit.math.ops import pad_sequences


def test_trained_tokenizer_round_trip(tok, tokenizer_dir, tmp_path):
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    text = "\n\nHuman: List 3 fruits.\n\nAssistant: apple, pear, plum."
    assert tok.decode(tok(text)["input_ids"]) == text
    tok.save_pretrained(tmp_path / "again")
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.padding_side == "right"
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)


def test_tokenizer_without_pad_reuses_eos_unless_asked_to_add_one(tok):
    n = len(tok)
    tok.pad_token = None
    reused = ensure_pad(tok, add_pad_token=False, where="x")
    assert reused.pad_token_id == reused.eos_token_id and len(reused) == n  # vocabulary unchanged
    tok.pad_token = None
    added = ensure_pad(tok, add_pad_token=True, where="x")
    assert added.pad_token == "<pad>" and len(added) == n  # the BPE already had '<pad>' as a token


def test_added_pad_row_is_deterministic_and_the_same_in_every_model(tok):
    """An added token's embedding row is the mean row in every model built from the checkpoint (not
    transformers' random mean-resizing draw), so actor and reference agree and KL starts at 0."""
    from rlhf_lit.hf.models import fit_vocab

    base = TinyModel(family="llama", hidden_size=32, num_layers=1, num_heads=4, ffn_size=64).build_causal_lm(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<new>"]})
    a = fit_vocab(base, tok)
    b = fit_vocab(
        TinyModel(family="llama", hidden_size=32, num_layers=1, num_heads=4, ffn_size=64).build_causal_lm(
            AutoTokenizer.from_pretrained(tok.name_or_path)
        ),
        tok,
    )
    emb_a, emb_b = a.get_input_embeddings().weight, b.get_input_embeddings().weight
    assert emb_a.size(0) == len(tok)
    torch.testing.assert_close(emb_a, emb_b)
    torch.testing.assert_close(emb_a[-1], emb_a[:-1].mean(0))


def test_missing_local_model_path_is_one_clear_error():
    from rlhf_lit.hf.hub import HubUnavailable

    with pytest.raises(HubUnavailable, match="does/not/exist"):
        HFModel("does/not/exist").build_causal_lm(None)
    with pytest.raises(HubUnavailable):
        HFTokenizer("does/not/exist").load()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_round_trip_and_left_padding(family, tok, tmp_path):
    spec = TinyModel(family=family, hidden_size=32, num_layers=1, num_heads=4, ffn_size=64, max_positions=64)
    model = spec.build_causal_lm(tok).eval()
    ids, mask = pad_sequences([tok("hello there friend")["input_ids"], tok("hi")["input_ids"]], tok.pad_token_id)
    with torch.no_grad():
        logits = model(**lm_inputs(model, ids, mask)).logits
    model.save_pretrained(tmp_path / family)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**lm_inputs(loaded, ids, mask)).logits, logits)
    # Left padding must not change the last token's logits (explicit position_ids where needed).
    left, lmask = pad_sequences(
        [tok("hello there friend")["input_ids"], tok("hi")["input_ids"]], tok.pad_token_id, "left"
    )
    with torch.no_grad():
        left_logits = model(**lm_inputs(model, left, lmask)).logits
    torch.testing.assert_close(left_logits[1, -1], logits[1, int(mask[1].sum()) - 1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama"])
def test_scalar_model_scores_last_attended_token_and_round_trips(family, tok, tmp_path):
    spec = TinyModel(family=family, hidden_size=32, num_layers=1, num_heads=4, ffn_size=64, max_positions=64)
    model = spec.build_scalar(tok).eval()
    seqs = [tok("a b c d")["input_ids"], tok("a")["input_ids"]]
    right, rmask = pad_sequences(seqs, tok.pad_token_id, "right")
    left, lmask = pad_sequences(seqs, tok.pad_token_id, "left")
    with torch.no_grad():
        values = model(right, rmask)
        scores_right, scores_left = model.score(right, rmask), model.score(left, lmask)
    expected = torch.stack([values[0, len(seqs[0]) - 1], values[1, len(seqs[1]) - 1]])
    torch.testing.assert_close(scores_right, expected)
    torch.testing.assert_close(scores_left, scores_right, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "rm", meta={"score_mean": 1.0, "score_std": 2.0})
    tok.save_pretrained(tmp_path / "rm")
    loaded = load_scalar_model(str(tmp_path / "rm")).eval()
    assert loaded.meta == {"score_mean": 1.0, "score_std": 2.0}
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(right, rmask), scores_right)


def test_opt_head_reads_word_embed_proj_dim(tok):
    spec = TinyModel(family="opt", hidden_size=32, num_layers=1, num_heads=4, ffn_size=64)
    spec.kwargs["word_embed_proj_dim"] = 16  # OPT-350m style projection
    model = spec.build_scalar(tok)
    assert isinstance(model, ScalarModel) and model.value_head.in_features == 16
    ids, mask = pad_sequences([tok("a b")["input_ids"]], tok.pad_token_id)
    assert model.score(ids, mask).shape == (1,)


def test_tiny_models_are_seeded():
    spec = TinyModel(seed=3, hidden_size=32, num_layers=1, num_heads=4, ffn_size=64)

    class T:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return 50

    a, b = spec.build_causal_lm(T()), spec.build_causal_lm(T())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
