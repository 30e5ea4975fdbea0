"""Data: files with errors that name the line, leak-free splits, seeded partitions."""

from __future__ import annotations


import pytest

from common.config import DataConfig
from common.data import (DataError, TextDataset, held_out, load_icd10, partition, read_records,
                         split_by_group)

LABELS = ("flu", "fracture")


def test_csv_and_jsonl_read_the_same_records(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('note,dx\n"high fever, cough",flu\nbroken femur,fracture\n')
    jsonl_path = tmp_path / "a.jsonl"
    jsonl_path.write_text('{"note": "high fever, cough", "dx": "flu"}\n\n'
                          '{"note": "broken femur", "dx": "fracture"}\n')
    a = read_records(csv_path, "note", "dx", LABELS)
    b = read_records(jsonl_path, "note", "dx", LABELS)
    assert a.texts == b.texts == ("high fever, cough", "broken femur")
    assert a.labels == b.labels == (0, 1)
    assert a.label_names == LABELS


@pytest.mark.parametrize("name, content, message", [
    ("unknown.csv", "note,dx\nfever,flu\nrash,dermatitis\n", "unknown.csv:3: unknown label 'dermatitis'"),
    ("empty.csv", "", "no records (the file is empty)"),
    ("header_only.csv", "note,dx\n", "no records"),
    ("nocol.csv", "text,dx\nfever,flu\n", "nocol.csv:2: missing column 'note'"),
    ("blank.csv", "note,dx\nfever,flu\n ,flu\n", "blank.csv:3: empty or non-text value in 'note'"),
    ("ragged.csv", "note,dx\nfever,flu,extra\n", "ragged.csv:2: expected 2 fields"),
    ("bad.jsonl", '{"note": "fever", "dx": "flu"}\n{"note": "x", \n', "bad.jsonl:2: invalid JSON"),
    ("list.jsonl", '["fever", "flu"]\n', "list.jsonl:1: expected a JSON object"),
    ("notes.txt", "fever\n", "unsupported file type '.txt'"),
])
def test_bad_files_are_reported_with_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_records(path, "note", "dx", LABELS)
    assert message in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "nope.csv", "note", "dx", LABELS)


def _toy(n_groups: int = 40, per_group: int = 5) -> TextDataset:
    texts, labels, groups = [], [], []
    for g in range(n_groups):
        for k in range(per_group):
            texts.append(f"code {g}.{k}")
            labels.append(g % 3)
            groups.append(f"G{g:02d}")
    return TextDataset(tuple(texts), tuple(labels), tuple(groups), ("a", "b", "c"))


def test_split_by_group_keeps_groups_whole_and_is_seeded():
    ds = _toy()
    rest, out = split_by_group(ds, 0.25, seed=3)
    assert not set(rest.groups) & set(out.groups)
    assert len(rest) + len(out) == len(ds)
    assert 0.2 <= len(out) / len(ds) <= 0.35
    again, _ = split_by_group(ds, 0.25, seed=3)
    assert again == rest
    other, _ = split_by_group(ds, 0.25, seed=4)
    assert other != rest


@pytest.fixture(scope="module")
def icd():
    return load_icd10()


def test_icd10_task_is_chapters_1_to_18_of_leaf_codes(icd):
    assert len(icd.label_names) == 18
    assert icd.label_names[0] == "Certain infectious and parasitic diseases"
    assert 24_000 < len(icd) < 25_500
    counts = icd.label_counts()
    assert min(counts) > 100 and max(counts) / len(icd) < 0.35


def test_icd10_test_split_shares_no_category_with_training(icd):
    pool, test = held_out(DataConfig())
    assert not set(pool.groups) & set(test.groups)
    assert all(len(g) == 3 for g in test.groups)
    assert 0.17 < len(test) / (len(pool) + len(test)) < 0.23


def test_dirichlet_partitions_are_seeded_disjoint_and_skewed(icd):
    cfg = DataConfig(alpha=0.3, seed=1)
    parts = partition(icd, 4, cfg)
    assert parts == partition(icd, 4, cfg)
    assert parts != partition(icd, 4, DataConfig(alpha=0.3, seed=2))
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == len(icd)
    shares = [icd.subset(p).label_counts() for p in parts]
    # label skew: some label is at least 3x more common (relatively) at one site than another
    ratios = []
    for label in range(18):
        fractions = [s[label] / sum(s) for s in shares]
        ratios.append(max(fractions) / max(min(fractions), 1e-9))
    assert max(ratios) > 3


def test_quantity_skew_changes_site_sizes(icd):
    even = [len(p) for p in partition(icd, 4, DataConfig(partition="iid"))]
    skewed = [len(p) for p in partition(icd, 4, DataConfig(partition="iid", quantity_skew=1.0))]
    assert max(even) - min(even) <= 4
    assert max(skewed) / min(skewed) > 1.5
