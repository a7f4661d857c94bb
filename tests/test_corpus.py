"""Report corpora: every format, filters, error messages, chunking and the embedding cache."""

from __future__ import annotations

import csv
import json
import logging
import zipfile

import pytest

from clipit.corpus import CorpusError, Report, save_reports_jsonl
from clipit.corpus_passages import chunk_reports
from clipit.corpus_reader import ORGAN_PROJECTS, load_project_map, load_reports

# OCR-ish TCGA-Reports rows: redaction leftovers, odd spacing, embedded newlines, very long fields.
BREAST = (
    "SURGICAL PATHOLOGY REPORT Patient Name: Accession #: S12-3456 Specimen: A. Left breast, "
    "modified radical mastectomy. FINAL DIAGNOSIS: Invasive ductal carcinoma, Nottingham grade 3 "
    "(tubules 3, nuclei 3, mitoses 3). Tumor size 2.4 cm in greatest dimension.\nMargins: negative; "
    "closest margin deep, 0.3 cm. Lymph nodes: 2/14 positive for metastatic carcinoma (2/14). "
    "ER positive (95%), PR positive (40%), HER2 negative (1+). pT2 pN1a. "
)
COLON = (
    "DIAGNOSIS: Colon, sigmoid, resection: Adenocarcinoma, moderately differentiated, invading "
    "through the muscularis propria into pericolorectal tissue. Lymphovascular invasion: present. "
    "Twelve lymph nodes negative for carcinoma (0/12). Proximal and distal margins free of tumor. "
    "Microsatellite instability: MSI-stable.   Gross: received fresh labeled sigmoid colon. "
)
RECTUM = "Rectum, low anterior resection: adenocarcinoma, well differentiated, ypT3 N0. " * 3
LUNG = "Right upper lobe lobectomy: squamous cell carcinoma, keratinizing, 3.1 cm. pT2a N0. " * 2

TCGA_ROWS = [
    ("TCGA-BP-5195.25c0b433-5557-4165-922e-2c1eac9c26f0", BREAST * 350),  # 150k chars > csv's default limit
    ("TCGA-A2-A0CM.4e0bbc84-4d1c-4a3a-9d2e-1c2f4f7d0a11", BREAST),
    ("TCGA-AA-3514.0b8b6fd3-0ef8-4a0e-8f6b-5a7a1f3c2d11", COLON),
    ("TCGA-AG-3581.9d1b2c3e-aaaa-bbbb-cccc-111122223333", RECTUM),
    ("TCGA-05-4244.5f0e7c8d-1234-5678-9abc-def012345678", LUNG),
    ("TCGA-ZZ-0000.00000000-0000-0000-0000-000000000000", "   \n "),  # blank OCR output
]
PROJECTS = {
    "TCGA-BP-5195": "BRCA",
    "TCGA-A2-A0CM": "BRCA",
    "TCGA-AA-3514": "COAD",
    "TCGA-AG-3581": "READ",
    "TCGA-05-4244": "LUAD",
}


def words(s: str) -> int:
    return len(s.split())


@pytest.fixture
def tcga_csv(tmp_path):
    p = tmp_path / "TCGA_Reports.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["patient_filename", "text"])
        w.writerows(TCGA_ROWS)
    return p


@pytest.fixture
def map_csv(tmp_path):
    p = tmp_path / "tcga_patient_to_cancer_type.csv"
    p.write_text("patient_id,cancer_type\n" + "".join(f"{k},{v}\n" for k, v in PROJECTS.items()))
    return p


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# ------------------------------------------------------------------------------------------------ formats
def test_tcga_csv_with_project_map(tcga_csv, map_csv, caplog):
    with caplog.at_level(logging.WARNING):
        reps = load_reports(tcga_csv, project_map=map_csv)
    assert "skipped 1 report(s) with empty text" in caplog.text
    assert [r.id for r in reps] == [row[0] for row in TCGA_ROWS[:5]]
    r0 = reps[0]
    assert r0.project == "BRCA" and r0.organ is None and r0.meta == {"patient": "TCGA-BP-5195"}
    assert "\n" in r0.text and len(r0.text) > 131_072  # as written: reports.whitespace keep (the default)
    collapsed = load_reports(tcga_csv, project_map=map_csv, whitespace="collapse")[0].text
    assert collapsed == " ".join(r0.text.split()) and "\n" not in collapsed and "  " not in collapsed
    assert [r.project for r in reps] == ["BRCA", "BRCA", "COAD", "READ", "LUAD"]


def test_tcga_csv_zip_and_without_map(tcga_csv, tmp_path):
    z = tmp_path / "TCGA_Reports.csv.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(tcga_csv, "TCGA_Reports.csv")
    reps = load_reports(z)
    assert len(reps) == 5 and all(r.project is None for r in reps)


def test_project_map_sources(map_csv, tmp_path):
    assert load_project_map(map_csv)["TCGA-AG-3581"] == "READ"
    # sample barcodes and "TCGA-" project ids are normalised to patient barcode -> short project
    assert load_project_map({"tcga-bp-5195-01a": "TCGA-BRCA"}) == {"TCGA-BP-5195": "BRCA"}
    j = tmp_path / "m.json"
    j.write_text(json.dumps({"TCGA-AA-3514": "COAD"}))
    assert load_project_map(j) == {"TCGA-AA-3514": "COAD"}
    bad = tmp_path / "bad.csv"
    bad.write_text("who,what\nTCGA-AA-3514,COAD\n")
    with pytest.raises(CorpusError, match="needs a patient column"):
        load_project_map(bad)


def test_jsonl_fields_meta_and_overrides(tmp_path):
    p = write_jsonl(
        tmp_path / "demo.jsonl",
        [
            {"id": "d0", "text": "Benign breast tissue.", "organ": "Breast", "demo_class": "Normal"},
            {"id": "d1", "text": "Colon adenoma.", "project": "TCGA-COAD"},
            {"id": "d2", "text": ""},
        ],
    )
    reps = load_reports(p)
    assert reps[0] == Report("d0", "Benign breast tissue.", "Breast", None, {"demo_class": "Normal"})
    assert reps[1].project == "COAD" and len(reps) == 2
    q = write_jsonl(tmp_path / "other.jsonl", [{"key": "a", "body": "x y"}, {"key": "b", "body": "z"}])
    assert [r.id for r in load_reports(q, text_field="body", id_field="key")] == ["a", "b"]


def test_txt_one_report_per_line(tmp_path):
    p = tmp_path / "text_colo.txt"
    p.write_text(COLON + "\n\n" + RECTUM + "\n")
    reps = load_reports(p)
    assert [r.id for r in reps] == ["text_colo-0", "text_colo-2"]  # 0-based line index, blank line skipped
    assert reps[1].text == " ".join(RECTUM.split())


def test_parquet(tmp_path):
    p = tmp_path / "r.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(CorpusError, match="pip install pyarrow"):
            load_reports(p)
        return
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["t1", "t2"], "organ": ["breast", "colon"]}), p)
    assert [r.organ for r in load_reports(p, organ="colo")] == ["colon"]


def test_save_jsonl_round_trip(tcga_csv, map_csv, tmp_path):
    reps = load_reports(tcga_csv, project_map=map_csv)
    reps += chunk_reports(reps[:1], 50, words)[:2]
    out = tmp_path / "sub" / "corpus.jsonl"
    save_reports_jsonl(reps, out)
    assert load_reports(out) == reps
    assert not [f for f in out.parent.iterdir() if f.name != "corpus.jsonl"]  # no temp files left


# ------------------------------------------------------------------------------------------------ filters
def test_filter_by_organ_via_projects(tcga_csv, map_csv):
    colon = load_reports(tcga_csv, organ="colo", project_map=map_csv)
    assert [r.project for r in colon] == ["COAD", "READ"]
    assert {r.project for r in load_reports(tcga_csv, organ="Breast", project_map=map_csv)} == {"BRCA"}
    assert ORGAN_PROJECTS["colon"] == ("COAD", "READ")


def test_filter_by_project_set(tcga_csv, map_csv):
    assert len(load_reports(tcga_csv, projects={"COAD", "READ"}, project_map=map_csv)) == 2
    assert len(load_reports(tcga_csv, projects="TCGA-BRCA", project_map=map_csv)) == 2
    both = load_reports(tcga_csv, organ="colon", projects=["READ"], project_map=map_csv)
    assert [r.project for r in both] == ["READ"]


def test_partial_project_map_warns(tcga_csv, caplog):
    with caplog.at_level(logging.WARNING):
        reps = load_reports(tcga_csv, projects=["COAD"], project_map={"TCGA-AA-3514": "COAD"})
    assert [r.id[:12] for r in reps] == ["TCGA-AA-3514"]
    assert "4 of 5 reports have no project in project_map" in caplog.text


def test_filter_by_organ_field_substring(tmp_path):
    p = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "a", "text": "t", "organ": "Colon, NOS"},
            {"id": "b", "text": "t", "organ": "Sigmoid colon"},
            {"id": "c", "text": "t", "organ": "Breast, NOS"},
            {"id": "d", "text": "t", "organ": "Rectum, NOS"},
        ],
    )
    assert [r.id for r in load_reports(p, organ="colo")] == ["a", "b"]  # the reference's keyword semantics


# ------------------------------------------------------------------------------------------------- errors
def test_errors(tmp_path, tcga_csv, map_csv):
    with pytest.raises(CorpusError, match="not found"):
        load_reports(tmp_path / "nope.csv")
    (tmp_path / "r.xml").write_text("x")
    with pytest.raises(CorpusError, match=r"unknown report format '\.xml'.*reports\.format"):
        load_reports(tmp_path / "r.xml")
    with pytest.raises(CorpusError, match="unknown report format 'xml'"):
        load_reports(tcga_csv, fmt="xml")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CorpusError, match=r"no reports \(2 empty texts skipped\)"):
        load_reports(tmp_path / "empty.txt")
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(CorpusError, match="duplicate report id 'a' \\(line 1 and line 2\\)"):
        load_reports(dup)
    noid = write_jsonl(tmp_path / "noid.jsonl", [{"text": "x"}])
    with pytest.raises(CorpusError, match="no id field.*reports.id_field"):
        load_reports(noid)
    notext = write_jsonl(tmp_path / "notext.jsonl", [{"id": "a", "body": "x"}])
    with pytest.raises(CorpusError, match="no text field.*reports.text_field"):
        load_reports(notext)
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "x"}\n{oops\n')
    with pytest.raises(CorpusError, match="line 2 is not valid JSON"):
        load_reports(tmp_path / "bad.jsonl")
    with pytest.raises(CorpusError, match="no report has an organ or project.*reports.project_map"):
        load_reports(tcga_csv, organ="breast")
    with pytest.raises(CorpusError, match=r"filter organ='kidney'.*kept 0 of 5.*projects: \['BRCA', 'COAD'"):
        load_reports(tcga_csv, organ="kidney", project_map=map_csv)
    with pytest.raises(CorpusError, match=r"projects=\['KIRC'\] kept 0"):
        load_reports(tcga_csv, projects={"KIRC"}, project_map=map_csv)


# ----------------------------------------------------------------------------------------------- chunking
def _check_passages(reps, passages, max_tokens, count):
    assert all(count(p.text) <= max_tokens for p in passages)
    for r in reps:
        mine = [p for p in passages if p.parent_id == r.id]
        assert [p.id for p in mine] == [f"{r.id}#p{k}" for k in range(len(mine))]
        assert " ".join(p.text for p in mine).split() == r.text.split()  # all words, in order, once
        assert all(p.project == r.project and p.meta == r.meta for p in mine)


def test_chunk_word_counter(tcga_csv, map_csv):
    reps = load_reports(tcga_csv, project_map=map_csv)
    passages = chunk_reports(reps, 40, words)
    _check_passages(reps, passages, 40, words)
    assert len([p for p in passages if p.parent_id == reps[0].id]) > 50
    short = chunk_reports(reps[4:], 40, words)  # the lung report fits: one passage, still with #p0
    # passages are built from the whitespace-collapsed text
    assert [(p.id, p.text) for p in short] == [(reps[4].id + "#p0", " ".join(reps[4].text.split()))]
    # sentences are never cut when they fit: every passage of the colon report ends a sentence
    assert all(p.text.endswith(".") for p in chunk_reports(reps[2:3], 40, words))


def test_chunk_overlong_sentence_and_word():
    long_sentence = " ".join(f"w{i}" for i in range(25)) + "."
    r = Report("r", f"Short one. {long_sentence} Tail here.")
    ps = chunk_reports([r], 10, words)
    _check_passages([r], ps, 10, words)
    assert ps[0].text == "Short one." and ps[1].text.startswith("w0")  # an overlong sentence starts afresh
    assert ps[-1].text.endswith("w24. Tail here.")  # ...and its last piece packs with what follows
    blob = Report("b", "ok " + "-" * 50 + " end")
    chars = lambda s: len(s)  # noqa: E731 - a char counter makes a single word overlong
    ps = chunk_reports([blob], 20, chars)
    assert all(len(p.text) <= 20 for p in ps)
    assert "".join(p.text for p in ps).replace(" ", "") == blob.text.replace(" ", "")
    with pytest.raises(ValueError, match="cannot hold a single character"):
        chunk_reports([blob], 1, lambda s: len(s) + 1)


def test_chunk_stride_windows():
    r = Report("r", " ".join(f"w{i}" for i in range(30)))
    ps = chunk_reports([r], 10, words, stride_words=5)
    assert [p.text.split()[0] for p in ps] == ["w0", "w5", "w10", "w15", "w20"]
    assert all(words(p.text) <= 10 for p in ps) and ps[-1].text.split()[-1] == "w29"
    wide = chunk_reports([r], 10, words, stride_words=50)  # stride > window: clamped, no word skipped
    assert " ".join(p.text for p in wide).split() == r.text.split()


def test_chunk_with_clip_tokenizer(tcga_csv, map_csv):
    open_clip = pytest.importorskip("open_clip")
    tok = open_clip.get_tokenizer("ViT-B-32")  # offline BPE; CONCH uses the same 77/128-context scheme

    def count(s: str) -> int:
        return int((tok([s])[0] != 0).sum()) - 2  # minus <start>/<end>

    reps = load_reports(tcga_csv, project_map=map_csv)[1:4]
    ps = chunk_reports(reps, 60, count)  # 60 < 75 so the tokenizer's own truncation never hides overflow
    _check_passages(reps, ps, 60, count)
    assert len(ps) > len(reps)
