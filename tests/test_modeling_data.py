import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pcee.modeling.data import (
    TASKS,
    DataError,
    TextDataset,
    get_task,
    load_data,
    load_generic_file,
    load_glue_file,
    load_glue_split,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GLUE_FIXTURES = FIXTURES / "glue"
GENERIC_FIXTURES = FIXTURES / "generic"
REAL_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"

# task, GLUE directory, split, expected label indices, first text, first second text (None: single sentence)
GLUE_FIXTURE_CASES = [
    ("sst2", "SST-2", "train", [0, 0, 1, 0, 1], "hide new secretions from the parental units ", None),
    ("sst2", "SST-2", "validation", [1, 0, 1], "it 's a charming and often affecting journey . ", None),
    (
        "cola",
        "CoLA",
        "train",
        [1, 0, 1, 0],
        "Our friends won't buy this analysis, let alone the next one we propose.",
        None,
    ),
    ("cola", "CoLA", "validation", [1, 0, 1], "The sailors rode the breeze clear of the rocks.", None),
    ("mrpc", "MRPC", "train", [1, 0, 1], "Amrozi accused his brother , whom", "Referring to him as only"),
    ("mrpc", "MRPC", "validation", [1, 0], "He said the foodservice pie", '" The foodservice pie'),
    ("qqp", "QQP", "train", [0, 1, 0], "How is the life of a math student?", "Which level of prepration"),
    ("qqp", "QQP", "validation", [0, 0, 1], "Why are African-Americans so beautiful?", "Why are hispanics"),
    ("mnli", "MNLI", "train", [2, 1, 0], "Conceptually cream skimming", "Product and geography"),
    ("mnli", "MNLI", "validation", [2, 0], "The new rights are nice enough", "Everyone really likes"),
    (
        "qnli",
        "QNLI",
        "train",
        [1, 1, 0],
        "When did the third Digimon series begin?",
        "Unlike the two seasons",
    ),
    ("qnli", "QNLI", "validation", [0, 1], "What came into force after", "As of that day"),
    ("rte", "RTE", "train", [1, 0], "No Weapons of Mass Destruction", "Weapons of Mass Destruction Found"),
    ("rte", "RTE", "validation", [1, 0, 0], "Dana Reeve, the widow", "Christopher Reeve had an accident."),
]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", ["SST-2", "sst-2", "sst2", "Sst_2", "SST2"])
def test_get_task_accepts_glue_and_short_names(name):
    assert get_task(name) is TASKS["sst2"]


def test_get_task_unknown_lists_supported_tasks():
    with pytest.raises(
        DataError, match=r"unknown task 'wnli'; supported tasks: sst2 \(SST-2\), cola \(CoLA\)"
    ):
        get_task("wnli")


def test_task_specs_match_glue():
    assert {name: spec.metric for name, spec in TASKS.items()} == {
        "sst2": "accuracy",
        "cola": "matthews",
        "mrpc": "f1",
        "qqp": "f1",
        "mnli": "accuracy",
        "qnli": "accuracy",
        "rte": "accuracy",
    }
    assert [name for name, spec in TASKS.items() if not spec.is_pair] == ["sst2", "cola"]
    assert TASKS["mnli"].validation_file == "dev_matched.tsv"
    assert TASKS["mnli"].label_names == ("contradiction", "entailment", "neutral")
    assert TASKS["rte"].label_names == ("entailment", "not_entailment")


# ---------------------------------------------------------------- GLUE readers on fixtures


@pytest.mark.parametrize("task, directory, split, labels, first_text, first_pair", GLUE_FIXTURE_CASES)
def test_glue_split_reads_fixture(task, directory, split, labels, first_text, first_pair):
    spec = TASKS[task]
    dataset = load_glue_split(task, GLUE_FIXTURES / directory, split)
    assert len(dataset) == len(labels)
    assert dataset.labels == labels
    assert dataset.label_names == spec.label_names
    assert dataset.texts[0].startswith(first_text)
    assert dataset.source == str(GLUE_FIXTURES / directory / spec.split_file(split))
    if first_pair is None:
        assert dataset.text_pairs is None
    else:
        assert len(dataset.text_pairs) == len(labels)
        assert dataset.text_pairs[0].startswith(first_pair)


def test_unquoted_tsv_keeps_quote_characters():
    dataset = load_glue_file("sst2", GLUE_FIXTURES / "SST-2" / "train.tsv")
    assert dataset.texts[3] == 'the "greatest" movie ever , or so they \'d like you to think '


def test_cola_headerless_reads_sentence_column_and_last_line_without_newline():
    assert not (GLUE_FIXTURES / "CoLA" / "dev.tsv").read_bytes().endswith(b"\n")
    dataset = load_glue_file("CoLA", GLUE_FIXTURES / "CoLA" / "dev.tsv")
    assert dataset.texts == [
        "The sailors rode the breeze clear of the rocks.",
        "The rope stretched over the pulley the weights.",
        "Bill talked to Mary about himself.",
    ]


def test_mrpc_byte_order_mark_does_not_hide_label_column():
    assert (GLUE_FIXTURES / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality")
    assert load_glue_file("mrpc", GLUE_FIXTURES / "MRPC" / "train.tsv").labels == [1, 0, 1]


def test_mnli_reads_plain_sentences_not_parses():
    dataset = load_glue_file("mnli", GLUE_FIXTURES / "MNLI" / "train.tsv")
    assert dataset.texts[2] == "Gays and lesbians."
    assert dataset.text_pairs[2] == "Heterosexuals."


def test_glue_columns_found_by_header_name(tmp_path):
    path = write(tmp_path / "dev.tsv", "label\tsentence\n1\tgood film\n0\tdull\n")
    dataset = load_glue_file("sst2", path)
    assert dataset.texts == ["good film", "dull"]
    assert dataset.labels == [1, 0]


def test_blank_lines_are_skipped(tmp_path):
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\n\ngood film\t1\n  \n\ndull\t0\n\n")
    assert load_glue_file("sst2", path).labels == [1, 0]


@pytest.mark.parametrize(
    "task, directory, label_names",
    [
        ("sst2", "SST-2", ("negative", "positive")),
        ("cola", "CoLA", ("unacceptable", "acceptable")),
        ("mrpc", "MRPC", ("not_equivalent", "equivalent")),
        ("qqp", "QQP", ("not_duplicate", "duplicate")),
        ("mnli", "MNLI", ("contradiction", "entailment", "neutral")),
        ("qnli", "QNLI", ("entailment", "not_entailment")),
        ("rte", "RTE", ("entailment", "not_entailment")),
    ],
)
def test_glue_tasks_carry_their_label_names(task, directory, label_names):
    dataset = load_glue_split(task, GLUE_FIXTURES / directory, "validation")
    assert dataset.label_names == label_names


def test_glue_label_names_keep_the_files_label_order():
    dataset = load_glue_file("sst2", GLUE_FIXTURES / "SST-2" / "dev.tsv")
    assert [dataset.label_names[label] for label in dataset.labels] == ["positive", "negative", "positive"]


# ---------------------------------------------------------------- GLUE errors


def test_glue_split_missing_file_names_directory_contents(tmp_path):
    (tmp_path / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n")
    with pytest.raises(DataError, match=r"train\.tsv: no such file \(the directory holds: dev\.tsv\)"):
        load_glue_split("qnli", tmp_path, "train")


def test_glue_split_missing_directory(tmp_path):
    with pytest.raises(
        DataError, match=r"no such directory. Expected the sst2 GLUE directory \(\.\.\./SST-2\)"
    ):
        load_glue_split("sst2", tmp_path / "SST-2", "train")


def test_glue_split_unknown_split():
    with pytest.raises(DataError, match=r"split 'test' is not supported; expected one of train, validation"):
        load_glue_split("sst2", GLUE_FIXTURES / "SST-2", "test")


def test_glue_file_missing(tmp_path):
    with pytest.raises(DataError, match=r"missing\.tsv: no such file"):
        load_glue_file("sst2", tmp_path / "missing.tsv")


def test_glue_file_wrong_task_reports_missing_column():
    with pytest.raises(
        DataError, match=r"no column 'question'; available columns: 'sentence', 'label'\. Check"
    ):
        load_glue_file("qnli", GLUE_FIXTURES / "SST-2" / "dev.tsv")


def test_glue_label_outside_task_labels(tmp_path):
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\nodd\t2\n")
    with pytest.raises(DataError, match=r"dev\.tsv, line 3: label '2' is not one of '0', '1'"):
        load_glue_file("sst2", path)


@pytest.mark.parametrize(
    "task, text, line",
    [
        ("sst2", "sentence\tlabel\ngood\t1\nno label here\n", 3),
        ("cola", "gj04\t1\t\tFine.\ngj04\t0\tBroken row.\n", 2),
        ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n\n1\ta\tentailment\n", 4),
    ],
)
def test_glue_malformed_row_names_line(tmp_path, task, text, line):
    path = write(tmp_path / "train.tsv", text)
    with pytest.raises(DataError, match=rf"train\.tsv, line {line}: found \d fields, expected \d"):
        load_glue_file(task, path)


@pytest.mark.parametrize("text", ["", "\n\n", "\ufeff"])
def test_glue_empty_file(tmp_path, text):
    path = write(tmp_path / "dev.tsv", text)
    with pytest.raises(DataError, match=r"dev\.tsv: the file is empty"):
        load_glue_file("sst2", path)


def test_glue_header_without_rows(tmp_path):
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match=r"dev\.tsv: a header but no data rows"):
        load_glue_file("sst2", path)


# ---------------------------------------------------------------- generic files


def test_generic_csv_with_quotes_crlf_and_multiline_field():
    dataset = load_generic_file(
        GENERIC_FIXTURES / "reviews.csv", text_column="review", label_column="sentiment"
    )
    assert dataset.label_names == ("negative", "positive")
    assert dataset.labels == [1, 0, 1, 0]
    assert dataset.texts[1] == 'It broke after a week; "durable" my foot.'
    assert dataset.texts[3] == "Screen scratches easily,\r\nand the case is flimsy."
    assert dataset.text_pairs is None


def test_generic_tsv_pair_with_numeric_label_order():
    dataset = load_generic_file(
        GENERIC_FIXTURES / "pairs.tsv",
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="score",
    )
    assert dataset.label_names == ("1", "2", "10")
    assert dataset.labels == [2, 1, 2, 0]
    assert dataset.texts[0] == 'A man plays "guitar" on stage.'
    assert dataset.text_pairs[1] == "The dog is running."


def test_generic_jsonl_with_number_labels_and_blank_line():
    dataset = load_generic_file(GENERIC_FIXTURES / "tickets.jsonl", text_column="text", label_column="label")
    assert dataset.label_names == ("0", "1")
    assert dataset.texts == ["My invoice is wrong", "Cannot log in", "Refund please"]
    assert dataset.labels == [1, 0, 1]


def write_jsonl_labels(path: Path, labels: list) -> Path:
    lines = [json.dumps({"text": f"row {index}", "label": label}) for index, label in enumerate(labels)]
    return write(path, "\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "labels, names, indices",
    [
        ([1, 1.0, 0, 0.0, "1"], ("0", "1"), [1, 1, 0, 0, 1]),
        ([-1.0, 2, 10.0], ("-1", "2", "10"), [0, 1, 2]),
        ([True, False, True], ("false", "true"), [1, 0, 1]),
    ],
)
def test_generic_jsonl_labels_equal_as_numbers_are_one_class(tmp_path, labels, names, indices):
    dataset = load_generic_file(write_jsonl_labels(tmp_path / "data.jsonl", labels), "text", "label")
    assert dataset.label_names == names
    assert dataset.labels == indices


def test_generic_jsonl_integral_float_matches_given_label_names(tmp_path):
    path = write_jsonl_labels(tmp_path / "dev.jsonl", [1.0, 0.0])
    assert load_generic_file(path, "text", "label", label_names=["0", "1"]).labels == [1, 0]


@pytest.mark.parametrize(
    "labels, message",
    [
        ([1, 0.5], r"data\.jsonl, line 2: label 0\.5 in column 'label' is not a whole number"),
        ([1, float("nan")], r"data\.jsonl, line 2: label NaN in column 'label' is not a whole number"),
        (
            [True, 0, 1],
            r"data\.jsonl: column 'label' mixes true/false labels \(line 1: true\) with number labels \(line 2: 0\)",
        ),
    ],
)
def test_generic_jsonl_ambiguous_number_labels_are_refused(tmp_path, labels, message):
    with pytest.raises(DataError, match=message):
        load_generic_file(write_jsonl_labels(tmp_path / "data.jsonl", labels), "text", "label")


def test_generic_given_label_names_set_the_order():
    dataset = load_generic_file(
        GENERIC_FIXTURES / "reviews.csv", "review", "sentiment", label_names=["positive", "negative"]
    )
    assert dataset.labels == [0, 1, 0, 1]
    assert dataset.label_names == ("positive", "negative")


def test_generic_label_outside_given_names():
    with pytest.raises(
        DataError, match=r"reviews\.csv, line 3: label 'negative' is not one of 'positive', 'neutral'"
    ):
        load_generic_file(
            GENERIC_FIXTURES / "reviews.csv", "review", "sentiment", label_names=["positive", "neutral"]
        )


def test_generic_repeated_label_names():
    with pytest.raises(DataError, match="repeat a name"):
        load_generic_file(GENERIC_FIXTURES / "reviews.csv", "review", "sentiment", label_names=["a", "a"])


@pytest.mark.parametrize(
    "file_name, available",
    [("reviews.csv", "'id', 'review', 'sentiment'"), ("tickets.jsonl", "'text', 'label', 'lang'")],
)
def test_generic_missing_column_lists_available(file_name, available):
    with pytest.raises(DataError, match=rf"no column 'body'; available columns: {available}"):
        load_generic_file(GENERIC_FIXTURES / file_name, text_column="body", label_column="label")


def test_generic_unsupported_extension(tmp_path):
    with pytest.raises(
        DataError, match=r"unsupported extension '\.json'; expected one of \.csv, \.tsv, \.jsonl"
    ):
        load_generic_file(tmp_path / "data.json", "text", "label")


def test_generic_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data\.csv: no such file"):
        load_generic_file(tmp_path / "data.csv", "text", "label")


def test_generic_csv_malformed_row(tmp_path):
    path = write(tmp_path / "data.csv", "text,label\nfine,1\nmissing label\n")
    with pytest.raises(DataError, match=r"data\.csv, line 3: found 1 fields, expected 2 \(text, label\)"):
        load_generic_file(path, "text", "label")


@pytest.mark.parametrize("file_name", ["data.csv", "data.tsv", "data.jsonl"])
def test_generic_empty_file(tmp_path, file_name):
    path = write(tmp_path / file_name, "")
    with pytest.raises(DataError, match="the file is empty"):
        load_generic_file(path, "text", "label")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"text": "a", "label": 1}\n[1, 2]\n',
            r"line 2: found a JSON list, expected one JSON object per line",
        ),
        ('{"text": "a", "label": 1}\n{"text": \n', r"line 2: not valid JSON"),
        ('{"text": "a", "label": 1}\n{"text": "b"}\n', r"line 2: column 'label' is missing from this row"),
        (
            '{"text": null, "label": 1}\n',
            r"line 1: column 'text' holds NoneType None, expected a string or a number",
        ),
    ],
)
def test_generic_jsonl_bad_lines(tmp_path, text, message):
    path = write(tmp_path / "data.jsonl", text)
    with pytest.raises(DataError, match=message):
        load_generic_file(path, "text", "label")


# ---------------------------------------------------------------- load_data


def test_load_data_infers_task_from_directory_name():
    dataset = load_data(GLUE_FIXTURES / "RTE")
    assert dataset.labels == [1, 0, 0]
    assert load_data(GLUE_FIXTURES / "RTE", split="train").labels == [1, 0]


def test_load_data_directory_with_explicit_task(tmp_path):
    data_dir = tmp_path / "my_sst"
    data_dir.mkdir()
    (data_dir / "dev.tsv").write_bytes((GLUE_FIXTURES / "SST-2" / "dev.tsv").read_bytes())
    assert len(load_data(data_dir, task="sst2")) == 3


def test_load_data_directory_without_recognisable_name(tmp_path):
    with pytest.raises(
        DataError, match=r"cannot infer the GLUE task from the directory name '[^']+'; give the task"
    ):
        load_data(tmp_path)


def test_load_data_glue_file_needs_task():
    path = GLUE_FIXTURES / "MRPC" / "dev.tsv"
    assert load_data(path, task="mrpc").labels == [1, 0]
    with pytest.raises(DataError, match="cannot tell how to read this file"):
        load_data(path)


def test_load_data_generic_file():
    dataset = load_data(GENERIC_FIXTURES / "tickets.jsonl", text_column="text", label_column="label")
    assert dataset.labels == [1, 0, 1]


def test_load_data_label_names_must_match_glue_task():
    assert len(load_data(GLUE_FIXTURES / "SST-2", label_names=["negative", "positive"])) == 3
    with pytest.raises(
        DataError, match=r"the task's labels are \['negative', 'positive'\], but label_names \['neg', 'pos'\]"
    ):
        load_data(GLUE_FIXTURES / "SST-2", label_names=["neg", "pos"])


@pytest.mark.parametrize(
    "data, options, message",
    [
        (
            "generic/reviews.csv",
            {"task": "sst2", "text_column": "review", "label_column": "sentiment"},
            "not both",
        ),
        ("generic/reviews.csv", {"text_column": "review"}, "needs both text_column and label_column"),
        (
            "glue/SST-2",
            {"text_column": "sentence", "label_column": "label"},
            "is a directory, but column options",
        ),
        ("glue/NOPE", {"task": "sst2"}, "no such file or directory"),
    ],
)
def test_load_data_ambiguous_or_missing(data, options, message):
    with pytest.raises(DataError, match=message):
        load_data(FIXTURES / data, **options)


# ---------------------------------------------------------------- TextDataset


def test_subset_keeps_pairs_and_metadata():
    dataset = load_glue_file("rte", GLUE_FIXTURES / "RTE" / "dev.tsv")
    subset = dataset.subset(np.array([2, 0]))
    assert subset == TextDataset(
        texts=[dataset.texts[2], dataset.texts[0]],
        text_pairs=[dataset.text_pairs[2], dataset.text_pairs[0]],
        labels=[0, 1],
        label_names=dataset.label_names,
        source=dataset.source,
    )


def test_subset_of_single_sentence_dataset():
    dataset = load_glue_file("sst2", GLUE_FIXTURES / "SST-2" / "train.tsv")
    subset = dataset.subset(range(1, 3))
    assert subset.text_pairs is None
    assert subset.labels == [0, 1]
    assert len(subset) == 2


# ---------------------------------------------------------------- real GLUE files


def real_glue_dir(name: str) -> Path:
    directory = REAL_GLUE / name
    if not directory.is_dir():
        pytest.skip(f"real GLUE data not present at {directory}")
    return directory


def test_real_sst2_counts():
    directory = real_glue_dir("SST-2")
    train = load_data(directory, split="train")
    dev = load_data(directory)
    assert (len(train), len(dev)) == (67_349, 872)
    assert Counter(train.labels) == {0: 29_780, 1: 37_569}
    assert Counter(dev.labels) == {0: 428, 1: 444}


def test_real_cola_counts():
    directory = real_glue_dir("CoLA")
    train = load_glue_split("cola", directory, "train")
    dev = load_glue_split("cola", directory, "validation")
    assert (len(train), len(dev)) == (8_551, 1_043)
    assert Counter(train.labels) == {0: 2_528, 1: 6_023}
    assert Counter(dev.labels) == {0: 322, 1: 721}


def test_real_qnli_dev_counts():
    dev = load_data(real_glue_dir("QNLI"), split="validation")
    assert len(dev) == 5_463
    assert len(dev.text_pairs) == 5_463
    assert Counter(dev.labels) == {0: 2_702, 1: 2_761}
