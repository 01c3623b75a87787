"""The causal-LM task: data forms and loss masks, errors, truncation, hold-out, packing (attention
must not cross examples), loss counting, evaluation sums, generation and prompt files.

Tiny GPT-2 and Llama models (random weights) are saved with small word-level tokenizers: the
GPT-2 one adds no BOS and has no pad token or chat template; the Llama one adds a BOS and has a
Jinja chat template.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import ConfigError, DataError, ModelError
from peftkit.train.causal_lm import CausalLMTask, load_causal_lm, loss_metrics, predicted_tokens, token_loss_sums
from peftkit.train.generate import generate, left_pad, read_prompts
from peftkit.train.lm_data import (IGNORE_INDEX, Encoded, LMCollate, LMEncoder, build_dataset, encode_examples,
                                   pack, packed_attention, parse_line, read_lm_examples, render_chat, single_rows,
                                   split_holdout)
from peftkit.train.models import load_tokenizer
from peftkit.train.options import TrainOptions

from conftest import tiny_bert, tiny_gpt2, tiny_llama

WORDS = ("the a cat dog sat on mat what is two plus three four five six seven yes no hello hi you how are fine "
         "thanks question answer : ? . , !").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _tokenizer(llama: bool):
    """A word-level tokenizer: GPT-2 style (``<|endoftext|>`` = 0, no BOS added, no pad) or Llama
    style (``<pad>`` 0, ``<s>`` 1 added in front, ``</s>`` 2, chat markers, a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if llama:
        specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    else:
        specials = ["<|endoftext|>", "<unk>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    if llama:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", additional_special_tokens=specials[4:])
        tok.chat_template = CHAT_TEMPLATE
        return tok
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, one_thread) -> dict[str, str]:
    root = tmp_path_factory.mktemp("causal_lm")
    gpt2, llama = tiny_gpt2(), tiny_llama()
    llama.config.bos_token_id, llama.config.eos_token_id, llama.config.pad_token_id = 1, 2, 0
    llama.generation_config.bos_token_id, llama.generation_config.eos_token_id = 1, 2
    llama.generation_config.pad_token_id = 0
    out = {}
    for name, model, tok in (("gpt2", gpt2, _tokenizer(False)), ("llama", llama, _tokenizer(True))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    bert = root / "bert"
    tiny_bert().save_pretrained(bert)
    _tokenizer(False).save_pretrained(bert)
    out["bert"], out["root"] = str(bert), str(root)
    return out


@pytest.fixture(scope="module")
def toks(dirs):
    return {k: load_tokenizer(dirs[k]) for k in ("gpt2", "llama")}


def _ex(obj: dict, line: int = 1):
    return parse_line("f.jsonl", line, json.dumps(obj))


def _tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def _write(path: Path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


# -- forms and loss masks -----------------------------------------------------------------


def test_prompt_response_masks_exactly_the_prompt(toks):
    tok = toks["gpt2"]
    ids, labels = LMEncoder(tok).encode(_ex({"prompt": "what is two plus two ?", "response": "four ."}), "f")
    assert _tokens(tok, ids) == ["what", "is", "two", "plus", "two", "?", "four", ".", "<|endoftext|>"]
    assert labels == [IGNORE_INDEX] * 6 + ids[6:]  # loss on the response and its EOS only


def test_prompt_response_with_a_bos_adding_tokenizer(toks):
    tok = toks["llama"]
    ids, labels = LMEncoder(tok).encode(_ex({"prompt": "hi", "completion": "hello you"}), "f")
    assert _tokens(tok, ids) == ["<s>", "hi", "hello", "you", "</s>"]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]


def test_text_has_loss_on_every_predicted_token(toks):
    tok = toks["llama"]
    ids, labels = LMEncoder(tok).encode(_ex({"text": "the cat sat"}), "f")
    assert _tokens(tok, ids) == ["<s>", "the", "cat", "sat", "</s>"]
    assert labels == [IGNORE_INDEX] + ids[1:]  # the first label is never predicted


def test_messages_with_a_chat_template_train_only_assistant_turns(toks):
    tok = toks["llama"]
    example = _ex({"messages": [{"role": "system", "content": "yes"}, {"role": "user", "content": "what is two"},
                                {"role": "assistant", "content": "four"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello you"}]})
    ids, labels = LMEncoder(tok).encode(example, "f")
    tokens = _tokens(tok, ids)
    assert tokens == ["<s>", "<|system|>", "yes", "<|end|>", "<|user|>", "what", "is", "two", "<|end|>",
                      "<|assistant|>", "four", "<|end|>", "<|user|>", "hi", "<|end|>", "<|assistant|>", "hello",
                      "you", "<|end|>"]
    trained = [t for t, lab in zip(tokens, labels) if lab != IGNORE_INDEX]
    assert trained == ["four", "<|end|>", "hello", "you", "<|end|>"]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))


def test_messages_without_a_template_use_the_fallback_format(toks):
    tok = toks["gpt2"]
    messages = (("user", "hi"), ("assistant", "hello"), ("user", "how are you"), ("assistant", "fine"))
    assert render_chat(tok, messages, False) == ("User: hi\nAssistant: hello<|endoftext|>\nUser: how are you\n"
                                                 "Assistant: fine<|endoftext|>")
    assert render_chat(tok, messages[:1], True) == "User: hi\nAssistant: "
    ids, labels = LMEncoder(tok).encode(_ex({"messages": [{"role": r, "content": c} for r, c in messages]}), "f")
    trained = [t for t, lab in zip(_tokens(tok, ids), labels) if lab != IGNORE_INDEX]
    assert trained == ["hello", "<|endoftext|>", "fine", "<|endoftext|>"]


def test_a_template_that_rewrites_earlier_turns_is_reported(toks, tmp_path):
    tok = _tokenizer(True)
    tok.chat_template = "{{ messages | length }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
    path = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "yes"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl line 1: the chat template does not render"):
        encode_examples(read_lm_examples(path), tok, 64, path)


def test_mixed_forms_in_one_file(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [{"prompt": "hi", "response": "yes"}, "",
                                             {"text": "the cat", "id": 7},
                                             {"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "no"}]}])
    examples = read_lm_examples(path)
    assert [(e.form, e.line) for e in examples] == [("prompt", 1), ("text", 3), ("messages", 4)]


@pytest.mark.parametrize("line, message", [
    ('{"label": 1, "sentence": "x"}', "expected 'prompt' and 'response', 'messages', or 'text'; found fields "
                                      "'label', 'sentence'"),
    ('{"prompt": "x"}', "'prompt' without 'response'"),
    ('{"response": "x"}', "'response' without 'prompt'"),
    ('{"prompt": "x", "response": 3}', "'response' must be a string, found a number"),
    ('{"prompt": "x", "text": "y"}', "found both 'prompt' and 'text'"),
    ('{"text": ["a"]}', "'text' must be a string, found an array"),
    ('{"text": "  "}', "'text' is empty"),
    ('{"messages": "hi"}', "'messages' must be a non-empty array"),
    ('{"messages": [{"role": "user"}]}', "message 1: expected .* found fields 'role'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "message 1: 'content' must be a string, found a number"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no 'assistant' message"),
    ('[1, 2]', "invalid JSON|expected a JSON object"),
    ('{"text": "a",}', "invalid JSON"),
])
def test_bad_lines_name_file_line_and_what_was_found(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad\.jsonl line 2: .*(?:{message})"):
        read_lm_examples(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_lm_examples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="file is empty"):
        read_lm_examples(tmp_path / "empty.jsonl")
    (tmp_path / "data.csv").write_text("text,label\nx,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON Lines file"):
        read_lm_examples(tmp_path / "data.csv")


# -- truncation, hold-out, packing --------------------------------------------------------


def test_truncation_is_counted_and_examples_without_loss_tokens_are_dropped(toks):
    tok = toks["gpt2"]
    examples = [_ex({"text": "the cat sat on the mat"}, 1),
                _ex({"prompt": "the cat sat on the mat", "response": "yes"}, 2),  # prompt fills max_length
                _ex({"prompt": "hi", "response": "yes"}, 3)]
    encoded, stats = encode_examples(examples, tok, 5, "f.jsonl")
    assert (stats.total, stats.truncated, stats.dropped) == (3, 2, 1)
    assert [e.line for e in encoded] == [1, 3]
    assert len(encoded[0].input_ids) == 5 and encoded[0].labels == [IGNORE_INDEX] + encoded[0].input_ids[1:]
    assert stats.lines("f.jsonl", 5) == ["warning: 2 of 3 examples in f.jsonl are longer than --max-length 5 and "
                                         "were truncated; 1 of them had no response tokens left and were dropped"]
    with pytest.raises(DataError, match="no example has a token to learn within --max-length 3"):
        build_dataset(examples[1:2], tok, 3, "f.jsonl", packing=False)


def test_holdout_is_fixed_by_the_seed():
    examples = [_ex({"text": f"t{i}"}, i + 1) for i in range(20)]
    train, held = split_holdout(examples, 0.2, 3, "f")
    assert len(held) == 4 and len(train) == 16
    assert [e.line for e in held] == sorted(e.line for e in held)  # file order
    assert split_holdout(examples, 0.2, 3, "f") == (train, held)
    assert split_holdout(examples, 0.2, 4, "f")[1] != held
    assert len(split_holdout(examples[:2], 0.2, 0, "f")[1]) == 1
    with pytest.raises(DataError, match="too few examples"):
        split_holdout(examples[:1], 0.2, 0, "f")


def _random_examples(lengths, seed=0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 120, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * 2 + ids[2:]  # a 2-token "prompt"
        out.append(Encoded(ids, labels, len(out) + 1))
    return out


def test_packing_puts_whole_examples_into_rows_best_fit():
    examples = _random_examples([5, 7, 3, 9, 4, 12])
    rows = pack(examples, 12)
    assert [r.lengths for r in rows] == [(5, 7), (3, 9), (4,), (12,)]  # 4 fits no open row: a new one
    assert all(sum(r.lengths) == len(r.input_ids) <= 12 and r.packed for r in rows)
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in examples for t in e.input_ids)


def test_packed_attention_is_block_diagonal_and_causal():
    mask, positions = packed_attention([(2, 3), (4,)], 6)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.float32
    allowed = (mask[:, 0] == 0).int()
    assert allowed[0].tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                   [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert allowed[1].tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 0]]


@pytest.fixture(scope="module")
def models(one_thread):
    return {"gpt2": tiny_gpt2(), "llama": tiny_llama()}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_loses_what_its_examples_lose_one_by_one(models, kind, attn):
    model = models[kind]
    model.config._attn_implementation = attn
    examples = _random_examples([5, 7, 3, 9, 6])
    collate = LMCollate(0)
    packed = collate(pack(examples, 16))
    assert packed["attention_mask"].dim() == 4
    all_rows = torch.ones(packed["labels"].shape[0], dtype=torch.bool)
    separate = sum(token_loss_sums(model, collate([r]), torch.ones(1, dtype=torch.bool))["loss_sum"]
                   for r in single_rows(examples))
    together = token_loss_sums(model, packed, all_rows)
    assert together["tokens"] == sum(len(e.input_ids) - 2 for e in examples)
    assert together["loss_sum"] == pytest.approx(separate, abs=1e-3)
    with torch.no_grad():  # the model's own mean loss over the packed batch, times count()
        assert float(model(**packed).loss) * int(predicted_tokens(packed["labels"]).sum()) == pytest.approx(
            separate, abs=1e-3)
    # The control: with a plain causal mask over the row, attention crosses examples and the loss moves.
    leaky = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
    assert abs(token_loss_sums(model, leaky, all_rows)["loss_sum"] - separate) > 1e-2
    model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_count_times_the_models_mean_loss_is_the_summed_token_loss(models, dirs, kind):
    model = models[kind]
    task = CausalLMTask(TrainOptions(model=dirs[kind]))
    batch = LMCollate(0)(single_rows(_random_examples([4, 9, 6], seed=2)))  # right-padded rows
    count = task.count(batch)
    assert count == 3 * -2 + 4 + 9 + 6
    sums = token_loss_sums(model, batch, torch.ones(3, dtype=torch.bool))
    with torch.no_grad():
        assert float(task.loss_sum(model, batch)) == pytest.approx(sums["loss_sum"], rel=1e-5)
    no_tokens = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    with torch.no_grad():
        assert float(task.loss_sum(model, no_tokens)) == 0.0


def test_eval_sums_respect_keep_and_finish_eval(models):
    model = models["gpt2"]
    examples = _random_examples([4, 9, 6], seed=3)
    batch = LMCollate(0)(single_rows(examples))
    each = [token_loss_sums(model, LMCollate(0)([r]), torch.ones(1, dtype=torch.bool)) for r in single_rows(examples)]
    kept = token_loss_sums(model, batch, torch.tensor([True, False, True]))
    assert kept["n"] == 2 and kept["tokens"] == each[0]["tokens"] + each[2]["tokens"]
    assert kept["loss_sum"] == pytest.approx(each[0]["loss_sum"] + each[2]["loss_sum"], rel=1e-5)
    result = loss_metrics(kept)
    assert result["loss"] == pytest.approx(kept["loss_sum"] / kept["tokens"])
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert (result["tokens"], result["n"]) == (kept["tokens"], 2)
    assert math.isnan(loss_metrics({"loss_sum": 0.0, "tokens": 0, "n": 0})["loss"])


def test_eval_sums_with_virtual_tokens_use_the_last_positions(one_thread):
    model = tiny_llama()
    peftkit.apply(model, peftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    batch = LMCollate(0)(single_rows(_random_examples([4, 7], seed=4)))
    sums = token_loss_sums(model, batch, torch.ones(2, dtype=torch.bool))
    with torch.no_grad():
        out = model(**batch)  # the hook prepends -100 to the labels: the same tokens count
    assert out.logits.shape[1] == batch["labels"].shape[1] + 3
    assert sums["loss_sum"] == pytest.approx(float(out.loss) * sums["tokens"], rel=1e-5)


# -- the task -----------------------------------------------------------------------------


def test_task_reads_data_holds_out_and_packs(dirs, tmp_path):
    lines = [{"prompt": f"what is {a} plus {b} ?", "response": "yes"} for a in ("two", "three", "four")
             for b in ("five", "six", "seven")] + [{"text": "the cat sat on the mat"}]
    data = _write(tmp_path / "train.jsonl", lines)
    options = TrainOptions(model=dirs["llama"], data=data, max_length=27, packing=True, seed=1)
    task = CausalLMTask(options)
    td = task.load_data()
    assert len(td.eval) == 2 and td.eval_source == f"{data} (held-out 20%)"
    assert td.train.examples == 8 and len(td.train) == 3  # 8 examples of 8-9 tokens in rows of 27
    assert td.train_count == 8  # what the engine reports as training examples
    assert "packing: 8 training examples in 3 rows" in " ".join(td.lines)
    batch = td.collate([td.train[0], td.train[1]])
    assert batch["attention_mask"].shape[0::2] == (2, batch["input_ids"].shape[1])
    assert td.collate([td.eval[0], td.eval[1]])["attention_mask"].dim() == 2  # evaluation is not packed
    model, path = task.load_model(td, torch.device("cpu"))
    assert path == dirs["llama"] and next(model.parameters()).dtype == torch.float32
    assert CausalLMTask(options).load_data().eval[0] == td.eval[0]  # same seed, same split
    assert (CausalLMTask.name, CausalLMTask.peft_task_type, CausalLMTask.metric, CausalLMTask.higher_is_better) == \
        ("causal-lm", "CAUSAL_LM", "loss", False)


def test_task_errors(dirs, tmp_path):
    data = _write(tmp_path / "t.jsonl", [{"text": "the cat"}, {"text": "a dog"}])
    with pytest.raises(ConfigError, match="--task causal-lm needs --data"):
        CausalLMTask(TrainOptions(model=dirs["gpt2"])).load_data()
    with pytest.raises(ConfigError, match="--packing does not work with --method prompt"):
        CausalLMTask(TrainOptions(model=dirs["gpt2"], data=data, packing=True, method="prompt")).load_data()
    with pytest.raises(ModelError, match=r"bert.*not a causal \(decoder\) language model"):
        load_causal_lm(dirs["bert"], torch.device("cpu"))
    with pytest.raises(ConfigError, match="--max-length 100: the model has only 64 positions"):
        task = CausalLMTask(TrainOptions(model=dirs["gpt2"], data=data, max_length=100))
        task.load_model(task.load_data(), torch.device("cpu"))


def test_a_missing_pad_token_comes_from_eos(dirs, toks):
    assert toks["gpt2"].pad_token_id == toks["gpt2"].eos_token_id == 0


# -- generation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(dirs, one_thread) -> dict[str, str]:
    """LoRA adapters on the tiny Llama: one at its identity init, one with random B."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, init in (("identity", True), ("random", False)):
        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_pretrained(dirs["llama"])
        peftkit.apply(model, peftkit.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                                init_lora_weights=init))
        out[name] = str(Path(dirs["root"]) / f"adapter-{name}")
        peftkit.save(model, out[name])
    return out


PROMPTS = ["what is two plus three ?", "hi", "the cat sat on the"]


def test_greedy_generation_is_deterministic_batched_and_changed_by_the_adapter(dirs, adapters):
    def run(adapter, **kw):
        return generate(dirs["llama"], adapter, PROMPTS, max_new_tokens=6, **kw)

    base = run(adapters["identity"])
    assert [r["prompt"] for r in base] == PROMPTS and all(isinstance(r["completion"], str) for r in base)
    assert run(adapters["identity"]) == base
    assert run(adapters["identity"], batch_size=1) == base  # left padding changes nothing
    tuned = run(adapters["random"])
    assert tuned != base


def test_greedy_generation_matches_a_manual_decode(dirs, adapters, toks):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dirs["llama"]).eval()  # the identity adapter is the base
    tok = toks["llama"]
    ids = torch.tensor([LMEncoder(tok).prompt_ids(PROMPTS[0])])
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    new = ids[0, -4:].tolist()
    new = new[:new.index(2)] if 2 in new else new
    got = generate(dirs["llama"], adapters["identity"], PROMPTS[:1], max_new_tokens=4)[0]["completion"]
    assert got == tok.decode(new, skip_special_tokens=True)


def test_sampling_is_seeded_and_chat_prompts_use_the_template(dirs, adapters, toks):
    def run(seed, **kw):
        return generate(dirs["llama"], adapters["random"], PROMPTS, max_new_tokens=8, do_sample=True,
                        temperature=1.5, top_k=0, seed=seed, **kw)

    assert run(1) == run(1)
    assert run(1) != run(2)
    encoder = LMEncoder(toks["llama"])
    assert _tokens(toks["llama"], encoder.prompt_ids("hi", chat=True)) == ["<s>", "<|user|>", "hi", "<|end|>",
                                                                           "<|assistant|>"]
    assert len(run(1, chat=True)) == 3


def test_generation_settings_are_checked(dirs, adapters):
    for kw, flag in (({"max_new_tokens": 0}, "--max-new-tokens"), ({"temperature": 0.0}, "--temperature"),
                     ({"top_p": 1.5}, "--top-p"), ({"max_new_tokens": 70}, "the model has 64")):
        with pytest.raises(ConfigError, match=flag):
            generate(dirs["llama"], adapters["identity"], ["hi"], **kw)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("what is two ?\n\n  the cat  \n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == ["what is two ?", "  the cat  "]
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a\nb"}, "", {"prompt": "c", "id": 2}])
    assert read_prompts(path) == ["a\nb", "c"]
    _write(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: expected \{\"prompt\": \"...\"\}, found fields 'text'"):
        read_prompts(tmp_path / "bad.jsonl")
    _write(tmp_path / "bad2.jsonl", [{"prompt": 3}])
    with pytest.raises(DataError, match="line 1: 'prompt' must be a string, found a number"):
        read_prompts(tmp_path / "bad2.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


# -- the commands -------------------------------------------------------------------------

NUMBERS = ["two", "three", "four", "five", "six", "seven"]


def _sums(start: int, stop: int) -> list[dict]:
    lines = []
    for i, a in enumerate(NUMBERS[start:stop]):
        for b in NUMBERS:
            if i % 2:
                lines.append({"messages": [{"role": "user", "content": f"what is {a} plus {b} ?"},
                                           {"role": "assistant", "content": "yes the answer is fine"}]})
            else:
                lines.append({"prompt": f"what is {a} plus {b} ?", "response": "yes the answer is fine"})
    return lines


@pytest.fixture(scope="module")
def cli_run(dirs, tmp_path_factory) -> dict[str, str]:
    from click.testing import CliRunner

    from peftkit.cli import cli

    work = tmp_path_factory.mktemp("lm_cli")
    train = _write(work / "train.jsonl", _sums(0, 4) + [{"text": "the cat sat on the mat"}])
    evaluation = _write(work / "eval.jsonl", _sums(4, 6))
    out = work / "run"
    result = CliRunner().invoke(cli, ["train", "--task", "causal-lm", "--model", dirs["llama"], "--data", train,
                                      "--eval-data", evaluation, "--max-steps", "6", "--batch-size", "8",
                                      "--lr", "2e-2", "--packing", "--max-length", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {"out": str(out), "output": result.output, "eval": evaluation, "train": train, "work": str(work)}


def _invoke(*args):
    from click.testing import CliRunner

    from peftkit.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_train_causal_lm_lowers_the_eval_loss(cli_run):
    summary = json.loads((Path(cli_run["out"]) / "summary.json").read_text())
    assert summary["eval"]["loss"] < summary["eval_before"]["loss"] - 0.1, cli_run["output"]
    assert {"perplexity", "tokens", "n"} <= set(summary["eval"]) and summary["eval"]["n"] == 12
    assert summary["train_examples"] == len(Path(cli_run["train"]).read_text().splitlines())
    assert summary["train_rows"] < summary["train_examples"]  # packed
    args = json.loads((Path(cli_run["out"]) / "adapter" / "train_args.json").read_text())
    assert args["task"] == "causal-lm"
    assert json.loads((Path(cli_run["out"]) / "adapter" / "adapter_config.json").read_text())["task_type"] == \
        "CAUSAL_LM"


def test_eval_merge_and_generate_on_the_run(cli_run, dirs):
    summary = json.loads((Path(cli_run["out"]) / "summary.json").read_text())
    result = _invoke("eval", "--adapter", cli_run["out"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-4) and metrics["n"] == 12

    merged = Path(cli_run["work"]) / "merged"
    result = _invoke("merge", "--adapter", cli_run["out"], "--out", merged)
    assert result.exit_code == 0, result.output
    assert "AutoModelForCausalLM" in result.output
    model = load_causal_lm(str(merged), torch.device("cpu"))
    batch = LMCollate(0)([r for r in build_dataset(read_lm_examples(cli_run["eval"]), load_tokenizer(str(merged)),
                                                   32, "e", False)[0].rows])
    sums = token_loss_sums(model, batch, torch.ones(batch["labels"].shape[0], dtype=torch.bool))
    assert loss_metrics(sums)["loss"] == pytest.approx(metrics["loss"], rel=1e-4)

    prompts = _write(Path(cli_run["work"]) / "prompts.jsonl", [{"prompt": "what is two plus six ?"}, {"prompt": "hi"}])
    result = _invoke("generate", "--adapter", cli_run["out"], "--prompts", prompts, "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["what is two plus six ?", "hi"]
    taught = set("yes the answer is fine".split())  # the responses' words: what the run taught it
    assert lines[0]["completion"] and set(lines[0]["completion"].split()) <= taught, lines
    again = _invoke("generate", "--adapter", cli_run["out"], "--prompt", "what is two plus six ?", "--prompt", "hi",
                    "--max-new-tokens", 5)
    assert [json.loads(x) for x in again.stdout.strip().splitlines()] == lines


def test_generate_command_errors(cli_run, tmp_path):
    result = _invoke("generate", "--adapter", cli_run["out"])
    assert result.exit_code != 0 and "--prompt TEXT" in result.output
    bad = _write(tmp_path / "p.jsonl", [{"text": "x"}])
    result = _invoke("generate", "--adapter", cli_run["out"], "--prompts", bad)
    assert result.exit_code == 1 and "p.jsonl line 1: expected" in result.output
    result = _invoke("generate", "--adapter", cli_run["out"], "--prompt", "hi", "--top-p", "0")
    assert result.exit_code == 1 and "--top-p" in result.output
