"""Readers for user files (JSONL / CSV / TOFU JSON), their errors, and encode_qa's batches."""
import json

import pytest
import torch

from grip_core.data import (PROMPT_TEMPLATE, DataFileError, QAExample, encode_qa, exact_match, iter_batches,
                            read_qa_file)
from grip_core.demo.train import build_tokenizer
from grip_core.demo.world import WorldConfig, generate_world


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(generate_world(WorldConfig.quick(), 0), 512)


# ----------------------------------------------------------------------------- reading

def test_jsonl(tmp_path):
    p = write(tmp_path, "f.jsonl", '{"question": "Q1?", "answer": "A1", "domain": "d", "entity": "e", "split": "forget"}\n'
                                   '\n{"id": "x2", "question": "Q2?", "answer": 1983, "paraphrased_question": "P2?"}\n')
    a, b = read_qa_file(p)
    assert (a.id, a.question, a.answer, a.domain, a.entity, a.meta) == ("f-0", "Q1?", "A1", "d", "e", {"split": "forget"})
    assert (b.id, b.answer, b.paraphrase) == ("x2", "1983", "P2?")


def test_csv_tsv_and_text_only(tmp_path):
    rows = read_qa_file(write(tmp_path, "f.csv", 'question,answer,domain\n"Where, exactly?",Here,geo\n\nQ2,A2,\n'))
    assert [(r.question, r.answer, r.domain) for r in rows] == [("Where, exactly?", "Here", "geo"), ("Q2", "A2", "")]
    assert read_qa_file(write(tmp_path, "f.tsv", "Question\tAnswer\nQ\tA\n"))[0].answer == "A"
    texts = read_qa_file(write(tmp_path, "t.csv", "text\nSome passage to forget.\n"))
    assert texts[0].is_text_only and texts[0].text == "Some passage to forget."


def test_tofu_json_variants(tmp_path):
    recs = [{"question": "Who?", "answer": "Her.", "paraphrased_answer": "She.", "paraphrased_question": "Who is it?"},
            {"question": "When?", "answer": "Now."}]
    for name, text in [("arr.json", json.dumps(recs, indent=2)),
                       ("lines.json", "\n".join(json.dumps(r) for r in recs)),     # TOFU's .json are JSON lines
                       ("data.json", json.dumps({"data": recs}))]:
        ex = read_qa_file(write(tmp_path, name, text))
        assert [e.question for e in ex] == ["Who?", "When?"], name
        assert ex[0].paraphrase == "Who is it?" and ex[0].meta["paraphrased_answer"] == "She."


@pytest.mark.parametrize("name,text,match", [
    ("empty.jsonl", "", r"empty\.jsonl: empty file"),
    ("blank.csv", "  \n\n", r"blank\.csv: empty file"),
    ("header_only.csv", "question,answer\n", r"header_only\.csv: no examples"),
    ("bad.jsonl", '{"question": "a", "answer": "b"}\n{"question": "c", \n', r"bad\.jsonl:2: invalid JSON"),
    ("notobj.jsonl", '{"question": "a", "answer": "b"}\n["x"]\n', r"notobj\.jsonl:2: expected an object"),
    ("nocol.jsonl", '{"question": "a", "answer": "b"}\n\n{"prompt": "c", "response": "d"}\n',
     r"nocol\.jsonl:3: missing columns: need 'question' and 'answer' \(or 'text'\); found \['prompt', 'response'\]"),
    ("noans.jsonl", '{"question": "a"}\n', r"noans\.jsonl:1: missing column 'answer'"),
    ("emptyans.jsonl", '{"question": "a", "answer": "  "}\n', r"emptyans\.jsonl:1: empty answer"),
    ("cols.csv", "prompt,response\na,b\n", r"cols\.csv:1: missing columns.*header is \['prompt', 'response'\]"),
    ("extra.csv", "question,answer\na,b\nc,d,e\n", r"extra\.csv:3: 3 fields, header has 2"),
    ("emptyq.csv", "question,answer\na,b\n,d\n", r"emptyq\.csv:3: empty question"),
    ("arr.json", '[\n {"question": "a", "answer": "b"},\n {"question": "c"}\n]', r"arr\.json:3: missing column 'answer'"),
    ("broken.json", '[\n {"question": "a", "answer": "b"},\n {"question": \n]', r"broken\.json:4: invalid JSON"),
    ("scalar.json", '42', r"scalar\.json:1: expected a JSON array"),
    ("data.json", '{"data": [{"question": "a", "answer": "b"}, {"text": ""}]}', r"data\.json:item 1: empty text"),
    ("f.parquet", "x", r"unsupported file type '\.parquet'"),
])
def test_errors_name_file_and_line(tmp_path, name, text, match):
    p = write(tmp_path, name, text)
    with pytest.raises(DataFileError, match=match) as e:
        read_qa_file(p)
    assert isinstance(e.value, ValueError) and str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataFileError, match="nothere.jsonl: file not found"):
        read_qa_file(tmp_path / "nothere.jsonl")


# ----------------------------------------------------------------------------- batches

def test_encode_qa_labels_only_the_answer(tok):
    exs = [QAExample("a", "What is the capital of Velia?", "Tarsk"), QAExample("b", "Who?", "Orna Velk Junior")]
    b = encode_qa(tok, exs, max_length=64)
    B, T = b["input_ids"].shape
    assert B == 2 and all(v.dtype == torch.long and v.shape == (B, T) for v in b.values())
    for i, ex in enumerate(exs):
        n = int(b["attention_mask"][i].sum())
        assert b["attention_mask"][i, :n].all() and not b["attention_mask"][i, n:].any()     # right-padded
        assert (b["input_ids"][i, n:] == tok.pad_token_id).all()
        lab = b["labels"][i]
        ans = lab[lab != -100].tolist()
        assert ans[-1] == tok.eos_token_id and tok.decode(ans[:-1]) == " " + ex.answer
        first = int((lab != -100).nonzero()[0])
        assert tok.decode(b["input_ids"][i, :first]) == PROMPT_TEMPLATE.format(question=ex.question)
        assert (lab[first:n] == b["input_ids"][i, first:n]).all() and (lab[n:] == -100).all()


def test_encode_text_only_and_truncation(tok):
    b = encode_qa(tok, [QAExample("t", "", "", text="The capital of Velia is Tarsk.")], max_length=64)
    n = int(b["attention_mask"].sum())
    assert (b["labels"][0, :n] == b["input_ids"][0, :n]).all() and b["labels"][0, n - 1] == tok.eos_token_id
    short = encode_qa(tok, [QAExample("q", "What is the capital of Velia?", "Tarsk")], max_length=5)
    assert short["input_ids"].shape == (1, 5) and (short["labels"] == -100).all()
    with pytest.raises(ValueError):
        encode_qa(tok, [])


def test_exact_match_and_batches():
    assert exact_match("  Tarsk.", "tarsk") and exact_match("The  Silent Orchard", "the silent orchard")
    assert not exact_match("Tarsk", "Tarskholm") and not exact_match("", "a")
    xs = list(range(10))
    ep = list(iter_batches(xs, 4, seed=1))
    assert [len(b) for b in ep] == [4, 4, 2] and sorted(sum(ep, [])) == xs
    assert ep == list(iter_batches(xs, 4, seed=1)) and ep != list(iter_batches(xs, 4, seed=2))
