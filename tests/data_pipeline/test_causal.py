"""The data side of decoder and cross-tokenizer distillation: causal packing for causal_lm teachers and
character offsets (each row's text and every teacher token's span in it), by hand and through the real
pipeline on a tiny GPT-2 with a byte-level BPE trained on the Wikipedia sample.

Values, not "it ran": rows equal the documents' tokenization + eos each, cut every max_length tokens
(built by hand from the tokenizer); the cached top-k, log-sum-exp and hidden states equal the teacher's
own forward within fp16 rounding; every token's span holds its text; a rebuild with another worker
count is byte-identical; and existing masked-LM configs keep their content hash.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from data_pipeline.config import PipelineConfig
from data_pipeline.pipeline import content_hash, preflight
from data_pipeline.rows import TokenizedText, pack_group, row_id, stable_hash
from kdlib.cache import (FORMAT_VERSION, Manifest, TransferSet, read_manifest, row_schema, rows_to_table,
                         shard_name, write_manifest, write_shard)
from kdlib.config import load_config
from kdlib.errors import ConfigError
from kdlib.runtime.io import sha256_file
from kdlib.runtime.models import ModelConfig, load_model
from kdlib.text.packing import pack_documents
from kdlib.text.readers import CorpusConfig, normalize_text, read_corpus
from tests.data_pipeline.test_pipeline import run_pipeline
from tests.tiny_models import make_tiny_bert, make_tiny_decoder
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
CLS, SEP, EOS = 1, 2, 0
DOCUMENTS, MAX_LENGTH, MIN_LENGTH, GROUPS, K = 3, 64, 8, 2, 8
ONE_WORKER = ["--direct_num_workers", "1", "--direct_running_mode", "in_memory"]


def doc(ids):
    return list(ids), [True] * len(ids)


# ---------------------------------------------------------------- packing by hand


def test_causal_packing_has_no_prefix_ends_documents_with_eos_and_cuts_every_max_length():
    # stream: 10 11 12 EOS 20 21 EOS 30 EOS -> chunks of max_length = 4
    rows = list(pack_documents([doc([10, 11, 12]), doc([20, 21]), doc([30])], max_length=4, min_length=1,
                               cls_id=None, sep_id=EOS))
    assert [r.input_ids.tolist() for r in rows] == [[10, 11, 12, 0], [20, 21, 0, 30], [0]]
    assert [r.document for r in rows] == [0, 1, 2] and [r.start for r in rows] == [0, 4, 8]
    assert [r.word_starts.tolist() for r in rows] == [[True, True, True, False], [True, True, False, True], [False]]
    assert [r.input_ids.tolist() for r in pack_documents([doc([10, 11, 12]), doc([20, 21]), doc([30])], max_length=4,
                                                         min_length=2, cls_id=None, sep_id=EOS)] == \
        [[10, 11, 12, 0], [20, 21, 0, 30]]  # the 1-token tail is below min_length


def test_cls_packing_rows_are_unchanged_and_report_their_stream_start():
    rows = list(pack_documents([doc([10, 11, 12]), doc([20, 21]), doc([30])], max_length=4, min_length=4,
                               cls_id=CLS, sep_id=SEP))
    assert [r.input_ids.tolist() for r in rows] == [[1, 10, 11, 12], [1, 2, 20, 21], [1, 2, 30, 2]]
    assert [r.start for r in rows] == [0, 3, 6]


def unit(uid, source, ids, text, spans, copy=0):
    return TokenizedText(uid, source, copy, "original", tuple(ids), (True,) * len(ids), text=text, spans=tuple(spans))


# document a: two units (lines) "ab cd" (tokens ab, cd) and "ef" (token ef); document b: "gh" (token gh)
UNITS = [unit("a#000000", "a", [10, 11], "ab cd", [(0, 2), (3, 5)]), unit("a#000001", "a", [12], "ef", [(0, 2)]),
         unit("b#000000", "b", [20], "gh", [(0, 2)])]


def spans(row):
    return row["char_offsets"].reshape(-1, 2).tolist()


def test_char_offsets_of_causal_rows_by_hand():
    for order in itertools.permutations(UNITS):
        rows = pack_group(list(order), max_length=3, min_length=1, cls_id=None, sep_id=EOS, char_offsets=True)
        # stream: 10 11 12 EOS 20 EOS -> [10 11 12] [EOS 20 EOS]; a's units joined by "\n": "ab cd\nef"
        assert [r["input_ids"].tolist() for r in rows] == [[10, 11, 12], [0, 20, 0]]
        assert rows[0]["text"] == "ab cd\nef" and spans(rows[0]) == [[0, 2], [3, 5], [6, 8]]
        assert rows[0]["text_breaks"].tolist() == [] and rows[0]["text_breaks"].dtype == np.int32
        # a row that starts with a's eos: it sits at the start of b's piece; the last eos at the end of the text
        assert rows[1]["text"] == "gh" and spans(rows[1]) == [[0, 0], [0, 2], [2, 2]]
        assert rows[1]["char_offsets"].dtype == np.int32


def test_char_offsets_across_documents_and_with_a_cls_prefix_by_hand():
    rows = pack_group(UNITS, max_length=8, min_length=1, cls_id=None, sep_id=EOS, char_offsets=True)
    assert [r["input_ids"].tolist() for r in rows] == [[10, 11, 12, 0, 20, 0]]
    # pieces "ab cd\nef" and "gh" joined by "\n"; the eos between them right after that "\n"
    assert rows[0]["text"] == "ab cd\nef\ngh" and rows[0]["text_breaks"].tolist() == [9]
    assert spans(rows[0]) == [[0, 2], [3, 5], [6, 8], [9, 9], [9, 11], [11, 11]]
    # a row starting mid-document: its piece starts at its first token's character
    rows = pack_group(UNITS, max_length=3, min_length=1, cls_id=CLS, sep_id=SEP, char_offsets=True)
    assert [r["input_ids"].tolist() for r in rows] == [[1, 10, 11], [1, 12, 2], [1, 20, 2]]
    assert [r["text"] for r in rows] == ["ab cd", "ef", "gh"]
    assert [spans(r) for r in rows] == [[[0, 0], [0, 2], [3, 5]], [[0, 0], [0, 2], [2, 2]], [[0, 0], [0, 2], [2, 2]]]
    plain = pack_group(UNITS, max_length=3, min_length=1, cls_id=CLS, sep_id=SEP)
    assert set(plain[0]) == {"id", "source_id", "augmentation", "input_ids", "word_starts"}  # off: no new keys


# ---------------------------------------------------------------- the real pipeline on a tiny GPT-2


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline-causal")


@pytest.fixture(scope="module")
def gpt2(work):
    return make_tiny_decoder(work / "gpt2", family="gpt2", tokenizer="bpe", layers=2, hidden=32, heads=4,
                             max_positions=128, vocab_size=512)


@pytest.fixture(scope="module")
def tokenizer(gpt2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2)


def causal_config(teacher: Path, out: Path, **over) -> dict:
    cfg = {
        "teacher": {"path": str(teacher), "task": "causal_lm"},
        "output_dir": str(out),
        "corpus": {"kind": "wikipedia_xml", "max_documents": DOCUMENTS},
        "max_length": MAX_LENGTH, "min_length": MIN_LENGTH,
        # one augmented copy, so documents are read line by line: several units per document
        "augment": {"copies": 1, "mask_prob": 0.1, "pos_swap_prob": 0.1, "ngram_prob": 0.2, "seed": 3},
        "char_offsets": True,
        "teacher_outputs": {"top_k": K, "hidden_layers": [1, 2], "fidelity_positions": 128},
        "num_shards": 2, "pack_groups": GROUPS, "batch_size": 32, "torch_threads": 1,
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def built(work, gpt2):
    out = work / "causal"
    run_pipeline(work, causal_config(gpt2, out))
    return out


@pytest.fixture(scope="module")
def rows(built):
    ts = TransferSet(built)
    return [ts.row(i) for i in range(len(ts))]


def expected_original_rows(tokenizer) -> tuple[dict[str, dict], dict[int, list]]:
    """The copy-0 rows by hand: per pack group, its documents in unit-id order, each the concatenation of its
    lines' tokens (spans shifted into the lines joined by "\n") + eos, the stream cut every max_length.
    Returns the rows by id, and each group's whole stream."""
    groups: dict[int, list] = {}
    for d in read_corpus(CorpusConfig(kind="wikipedia_xml", max_documents=DOCUMENTS)):
        lines = [normalize_text(p) for p in d.text.split("\n") if p.strip()]
        groups.setdefault(stable_hash(d.id) % GROUPS, []).append((d.id, lines))
    eos = tokenizer.eos_token_id
    expected, streams = {}, {}
    for group, documents in groups.items():
        documents.sort(key=lambda x: f"{x[0]}#")
        stream = streams[group] = []  # (id, document, its text, (start, end) in it, or None for the eos)
        for source, lines in documents:
            text, shift = "\n".join(lines), 0
            for line in lines:
                enc = tokenizer(line, add_special_tokens=False, return_offsets_mapping=True)
                stream += [(i, source, text, (a + shift, b + shift)) for i, (a, b) in
                           zip(enc["input_ids"], enc["offset_mapping"])]
                shift += len(line) + 1
            stream.append((eos, source, text, None))
        for index, begin in enumerate(range(0, len(stream), MAX_LENGTH)):
            chunk = stream[begin:begin + MAX_LENGTH]
            if len(chunk) >= MIN_LENGTH:
                expected[row_id(chunk[0][1], "original", index)] = {"tokens": chunk, "group": group, "index": index}
    return expected, streams


@pytest.mark.slow
def test_causal_rows_are_the_documents_tokens_each_followed_by_eos(built, rows, tokenizer):
    expected, streams = expected_original_rows(tokenizer)
    original = {r["id"]: r for r in rows if r["augmentation"] == "original"}
    assert original.keys() == expected.keys() and len(original) > 200
    for rid, want in expected.items():
        assert original[rid]["input_ids"].tolist() == [t[0] for t in want["tokens"]]
    assert tokenizer.cls_token_id is None and tokenizer.eos_token_id is not None
    # per group, the rows in index order concatenate to the whole stream (each document's tokens + eos): nothing
    # repeated, and nothing lost but a tail shorter than min_length
    for group, stream in streams.items():
        ordered = sorted((w["index"], rid) for rid, w in expected.items() if w["group"] == group)
        joined = np.concatenate([original[rid]["input_ids"] for _, rid in ordered]).tolist()
        assert joined == [t[0] for t in stream[:len(joined)]] and len(stream) - len(joined) < MIN_LENGTH
        assert sum(t[3] is None for t in stream) == len({t[1] for t in stream})  # one eos per document
    # every row (augmented copies too) is max_length long, except at most the last of each group
    short = [r for r in rows if len(r["input_ids"]) != MAX_LENGTH]
    assert all(MIN_LENGTH <= len(r["input_ids"]) < MAX_LENGTH for r in short) and len(short) <= 2 * GROUPS
    assert {r["augmentation"] for r in rows} == {"original", "copy1"}


@pytest.mark.slow
def test_char_offsets_hold_each_tokens_text_and_breaks_mark_the_document_pieces(rows, tokenizer):
    expected, _ = expected_original_rows(tokenizer)
    eos = tokenizer.eos_token_id
    for r in rows:
        text, offsets, breaks, ids = r["text"], r["char_offsets"], r["text_breaks"], r["input_ids"]
        assert isinstance(text, str) and offsets.dtype == np.int32 and offsets.shape == (len(ids), 2)
        assert breaks.dtype == np.int32
        assert (offsets[:, 0] <= offsets[:, 1]).all() and offsets.min() >= 0 and offsets.max() <= len(text)
        special = ids == eos  # (the literal text "<|endoftext|>" does not occur in the sample)
        assert (offsets[special, 0] == offsets[special, 1]).all()
        # the pieces: runs of document tokens between eos tokens; each after the first starts after a "\n"
        runs = [k for k, g in itertools.groupby(special.tolist()) if not k]
        assert len(breaks) == len(runs) - 1 and all(text[b - 1] == "\n" for b in breaks)
        starts = [offsets[i, 0] for i in range(1, len(ids)) if special[i - 1] and not special[i]]
        assert [int(s) for s in starts[len(starts) - len(breaks):]] == breaks.tolist()
        # an eos sits where the next piece starts, or at the end of the text
        for i in np.flatnonzero(special):
            after = [j for j in range(i + 1, len(ids)) if not special[j]]
            assert offsets[i, 0] == (offsets[after[0], 0] if after else len(text))
        # each token's characters: its own decoding (bytes of one character share a span: decoded together),
        # less byte-level BPE's leading space, which the offsets leave out
        for (s, e), group in itertools.groupby(range(len(ids)), key=lambda i: tuple(offsets[i])):
            group = [i for i in group if not special[i]]
            if not group:
                continue
            decoded = tokenizer.decode(ids[group].tolist())
            if "\ufffd" in decoded and (group[0] == 0 or group[-1] == len(ids) - 1):
                continue  # a character whose bytes the row boundary splits
            assert decoded.removeprefix(" ") == text[s:e], (decoded, text[s:e])
        want = expected.get(r["id"]) if r["augmentation"] == "original" else None
        if want is None:
            continue
        # against the tokenizer's own offsets in its document: the same characters, and the text by hand
        pieces: list[list] = []
        for tok, (_, source, doc_text, span) in enumerate(want["tokens"]):
            if span is None:
                continue
            if not pieces or pieces[-1][0] != source:
                pieces.append([source, doc_text, span[0], span[1]])
            pieces[-1][3] = span[1]
            assert text[offsets[tok, 0]:offsets[tok, 1]] == doc_text[span[0]:span[1]]
        assert text == "\n".join(t[a:b] for _, t, a, b in pieces)


@pytest.mark.slow
def test_cached_outputs_equal_the_teachers_own_forward(rows, gpt2):
    model = load_model(ModelConfig(path=str(gpt2), task="causal_lm"))

    def fp16_close(stored, exact):  # fp16 keeps 11 significant bits: half a unit in the last place, plus noise
        return torch.all((stored - exact).abs() <= exact.abs() * 2.0 ** -11 + 1e-5)

    checked = 0
    for r in rows[::max(1, len(rows) // 30)]:
        ids = torch.tensor(r["input_ids"].astype(np.int64))[None]
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        logits = out.logits[0].float()
        top = torch.topk(logits, K, dim=-1)
        stored_ids = torch.tensor(r["topk_ids"].astype(np.int64)).view(-1, K)
        stored = torch.tensor(r["topk_logits"].astype(np.float32)).view(-1, K)
        # the stored ids are a top-k of the teacher's logits (ties aside: their logits are the k largest)
        assert torch.allclose(logits.gather(-1, stored_ids), top.values, atol=1e-5, rtol=0)
        assert fp16_close(stored, logits.gather(-1, stored_ids))
        assert torch.allclose(torch.tensor(r["lse"]), torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-6)
        for layer in (1, 2):
            hidden = torch.tensor(r[f"hidden_{layer}"].astype(np.float32)).view(ids.shape[1], -1)
            assert fp16_close(hidden, out.hidden_states[layer][0].float())
        checked += 1
    assert checked >= 25 and rows[0]["topk_ids"].dtype == np.uint16


@pytest.mark.slow
def test_manifest_records_causal_packing_char_offsets_and_the_teacher_tokenizer(built, tokenizer):
    m = read_manifest(built)
    assert m.cached["packing"] == "causal" and m.cached["char_offsets"] is True and m.cached["mlm"] is False
    assert len(tokenizer) == 512
    assert m.teacher["tokenizer"] == {"class": type(tokenizer).__name__, "size": 512,
                                      "eos_token": "<|endoftext|>", "eos_token_id": tokenizer.eos_token_id,
                                      "bos_token": "<|endoftext|>", "bos_token_id": tokenizer.bos_token_id}
    assert m.teacher["num_layers"] == 2 and m.teacher["hidden_size"] == 32 and m.teacher["model_type"] == "gpt2"
    assert m.dtypes["text"] == "string" and m.dtypes["char_offsets"] == "int32[]" and m.dtypes["text_breaks"] == "int32[]"
    assert m.config["char_offsets"] is True and m.packing == "causal" and m.char_offsets is True


def test_manifests_from_before_causal_packing_read_as_cls_packed():
    def manifest(cached, config):
        return Manifest(format_version=FORMAT_VERSION, teacher={"fingerprint": "t"}, tokenizer_fingerprint="k",
                        config=config, config_hash="x", cached=cached, dtypes={}, max_length=8, shards=[], totals={},
                        fidelity={})

    old_corpus = manifest({"top_k": 8, "mlm": True}, {"corpus": {"kind": "wikipedia_xml"}, "task": None})
    old_task = manifest({"dense_logits": True}, {"corpus": None, "task": {"kind": "fasttext"}})
    assert (old_corpus.packing, old_corpus.char_offsets) == ("cls", False)
    assert (old_task.packing, old_task.char_offsets) == (None, False)
    assert manifest({"packing": "causal", "char_offsets": True}, {}).packing == "causal"


@pytest.mark.slow
def test_reader_batches_leave_text_out_unless_asked(built, rows):
    ts = TransferSet(built)
    indices = [0, 5, len(ts) - 1]
    plain, with_text = ts.batch(indices), ts.batch(indices, text=True)
    assert not {"texts", "char_offsets", "text_breaks"} & set(plain)
    assert set(with_text) - set(plain) == {"texts", "char_offsets", "text_breaks"}
    assert all(torch.equal(plain[k], with_text[k]) for k in plain if isinstance(plain[k], torch.Tensor))
    assert with_text["texts"] == [rows[i]["text"] for i in indices]
    for got, i in zip(with_text["char_offsets"], indices):
        assert got.dtype == np.int32 and np.array_equal(got, rows[i]["char_offsets"])
    assert all(np.array_equal(a, rows[i]["text_breaks"]) for a, i in zip(with_text["text_breaks"], indices))
    via_rows = ts.collate(ts.rows(indices), text=True)
    assert via_rows["texts"] == with_text["texts"]
    assert all(np.array_equal(a, b) for a, b in zip(via_rows["char_offsets"], with_text["char_offsets"]))
    narrow = TransferSet(built)
    narrow.read_only(["topk_ids", "topk_logits", "teacher_lse", "texts"])
    assert narrow.batch(indices, text=True)["texts"] == with_text["texts"]
    narrower = TransferSet(built)
    narrower.read_only(["topk_ids", "topk_logits", "teacher_lse"])
    with pytest.raises(ValueError, match="texts: the transfer set keeps no text"):
        narrower.batch(indices, text=True)


def test_a_keep_text_task_set_gives_its_texts_the_same_way(tmp_path):
    schema = row_schema(vocab_size=100, dense_logits=True, has_labels=True, keep_text=True)
    rows = [{"id": f"r{i}", "source_id": f"s{i}", "augmentation": "original", "input_ids": np.arange(3 + i, dtype=np.int32),
             "label": i % 2, "text": f"text {i}", "text_b": None if i else "second", "logits": np.zeros(2, np.float32)}
            for i in range(3)]
    info = write_shard(tmp_path, shard_name(0, 1), rows_to_table(rows, schema))
    write_manifest(tmp_path, Manifest(format_version=FORMAT_VERSION, teacher={"fingerprint": "t", "hidden_size": 4},
                                      tokenizer_fingerprint="k", config={}, config_hash="x",
                                      cached={"dense_logits": True, "text": True}, dtypes={}, max_length=8,
                                      shards=[info], totals={}, fidelity={}))
    batch = TransferSet(tmp_path).batch([2, 0], text=True)
    assert batch["texts"] == ["text 2", "text 0"] and batch["texts_b"] == [None, "second"]
    assert "char_offsets" not in batch and "texts" not in TransferSet(tmp_path).batch([2, 0])


@pytest.mark.slow
def test_a_rebuild_with_one_worker_is_byte_identical(work, gpt2, built):
    out = work / "causal-one-worker"
    run_pipeline(work, causal_config(gpt2, out), ONE_WORKER)
    a, b = read_manifest(built), read_manifest(out)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert [sha256_file(built / s.file) for s in a.shards] == [sha256_file(out / s.file) for s in b.shards]
    assert a.config_hash == b.config_hash and pq.read_metadata(out / b.shards[0].file).num_rows == b.shards[0].rows


# ---------------------------------------------------------------- config errors and content hashes


def write(tmp: Path, cfg: dict, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("over, field, words", [
    ({"masking": {"prob": 0.15}, "char_offsets": False}, "masking.prob", "a causal LM predicts the next token"),
    ({"masking": {"prob": 0.15}, "teacher": {"path": "t", "task": "masked_lm"}}, "char_offsets",
     "masked ids no longer match the text"),
    ({"corpus": None, "task": {"kind": "fasttext", "path": "gensim:pang_lee_polarity.cor"},
      "teacher": {"path": "t", "task": "sequence_classification"}, "teacher_outputs": {"dense_logits": True}},
     "char_offsets", "applies to corpus sets"),
])
def test_config_errors_name_the_field_and_the_file(tmp_path, over, field, words):
    path = write(tmp_path, {**causal_config(Path("t"), tmp_path / "never"), **over}, field.replace(".", "-"))
    with pytest.raises(ConfigError) as err:
        load_config(path, PipelineConfig)
    assert str(err.value).startswith(f"{path}: field '{field}': ") and words in str(err.value)


@pytest.mark.slow
def test_a_causal_teacher_without_an_eos_token_is_refused_in_preflight_naming_its_folder(work, tmp_path):
    from transformers import AutoTokenizer

    folder = make_tiny_decoder(tmp_path / "no-eos", family="gpt2", layers=2, hidden=32, heads=4)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = None
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).eos_token_id is None
    path = write(tmp_path, causal_config(folder, tmp_path / "never"), "no-eos")
    with pytest.raises(ConfigError, match="field 'teacher.path': the causal_lm teacher's tokenizer in .*no-eos has no "
                                          "eos token") as err:
        preflight(load_config(path, PipelineConfig), str(path))
    assert str(err.value).startswith(str(path)) and not (tmp_path / "never").exists()


# content_hash of shipped configs as computed by the code before causal packing and char_offsets existed
SHIPPED = {"configs/demo_pipeline.yaml": "499e052c594289b79c659edd9048a4fd0c252e0bc6289fe27a4ac0d58bc7c072",
           "configs/example_task_pipeline.yaml": "fe34b246a6f5f18b6df767fbc229adfeacc5427c527cdebf4bbbb46fc75f12ce"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_existing_configs_keep_their_content_hash(name):
    cfg = load_config(ROOT / name, PipelineConfig)
    assert content_hash(cfg) == SHIPPED[name]
    assert content_hash(load_config(ROOT / name, PipelineConfig, {"char_offsets": False})) == SHIPPED[name]


@pytest.mark.slow
def test_char_offsets_and_causal_packing_change_the_content_hash(tmp_path, work):
    teacher = make_tiny_bert(work / "bert", task="masked_lm", layers=2, hidden=32, heads=4)
    base = {**causal_config(teacher, tmp_path / "x", char_offsets=False), "teacher": {"path": str(teacher),
                                                                                     "task": "masked_lm"}}
    hashes = {content_hash(load_config(write(tmp_path, dict(base, **over), str(i)), PipelineConfig))
              for i, over in enumerate([{}, {"char_offsets": True}, {"teacher": {"path": str(teacher),
                                                                                 "task": "causal_lm"}}])}
    assert len(hashes) == 3
