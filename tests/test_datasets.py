"""Benchmark loaders: fixtures written here in each release's own layout load into the common schema;
malformed fixtures raise DataFormatError naming the file and the line (or record)."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from grape_rewards.datasets import (
    BENCHMARKS,
    CIRR,
    CVLUE,
    XM3600,
    CorpusItem,
    DataFormatError,
    Flickr30kCN,
    Query,
    WikiLongform,
    load_benchmark,
    wit_image_filename,
)
from grape_rewards.datasets.wiki_longform import WIT_COLUMNS

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 0, 0), (9, 9, 9)]


def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), COLORS[i % len(COLORS)]).save(buf, format=fmt)
    return buf.getvalue()


def draw(path: Path, i: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(i, fmt))


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def jl(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


def assert_names(err: pytest.ExceptionInfo[DataFormatError], filename: str, where: str) -> None:
    message = str(err.value)
    assert filename in message, message
    assert where in message, message


# --------------------------------------------------------------------------------------- schema


def test_schema_is_frozen_and_validated() -> None:
    item = CorpusItem(id="a", image="/x.jpg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.id = "b"  # type: ignore[misc]
    with pytest.raises(ValueError):
        CorpusItem(id="", image="/x.jpg")
    with pytest.raises(ValueError):
        CorpusItem(id="a")
    q = Query(query_id="1", text="t", target_ids=("a",), reference_id="r")
    assert q.task == "multilingual" and q.excluded_ids == ("r",)
    with pytest.raises(ValueError):
        Query(query_id="1", text="t", target_ids=["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Query(query_id="1", text="t", target_ids=(), task="captioning")  # type: ignore[arg-type]


def test_data_format_error_message() -> None:
    e = DataFormatError("/d/f.jsonl", "missing key 'text'", line=3)
    assert str(e) == "/d/f.jsonl, line 3: missing key 'text'"
    assert isinstance(e, ValueError) and e.line == 3 and e.path == "/d/f.jsonl"
    assert str(DataFormatError("/d/c.json", "bad", record=2)) == "/d/c.json, record 2: bad"


# --------------------------------------------------------------------------------- Flickr30k-CN


def write_flickr(root: Path, split: str = "test") -> None:
    tsv = [f"{1000 + i}\t{base64.b64encode(image_bytes(i)).decode()}" for i in range(3)]
    write_lines(root / f"{split}_imgs.tsv", tsv)
    write_lines(root / f"{split}_texts.jsonl", [
        jl({"text_id": 1, "text": "一只狗在草地上奔跑", "image_ids": [1000]}),
        jl({"text_id": 2, "text": "两个人在海边", "image_ids": [1001, 1002]}),
        "",
        jl({"text_id": 3, "text": "一辆红色的汽车", "image_ids": [1002]}),
    ])


def test_flickr30k_cn_loads(tmp_path: Path) -> None:
    write_flickr(tmp_path)
    bench = Flickr30kCN(tmp_path, "test", progress=False)
    items = list(bench.corpus())
    assert [i.id for i in items] == ["1000", "1001", "1002"]
    for i, item in enumerate(items):
        assert item.image == str(tmp_path / "images" / "test" / f"{item.id}.jpg")
        assert Path(item.image).read_bytes() == image_bytes(i)
        with Image.open(item.image) as im:
            assert im.size == (8, 6)
    queries = list(bench.queries())
    assert [q.query_id for q in queries] == ["1", "2", "3"]
    assert queries[1].target_ids == ("1001", "1002")
    assert queries[0].text == "一只狗在草地上奔跑"
    assert all(q.language == "zh" and q.split == "test" and q.task == "multilingual" for q in queries)


def test_flickr30k_cn_extraction_is_resumable_and_atomic(tmp_path: Path) -> None:
    write_flickr(tmp_path)
    out = tmp_path / "extracted"
    bench = Flickr30kCN(tmp_path, "test", image_dir=out, progress=False)
    gen = bench.corpus()
    next(gen)  # interrupted after the first image
    gen.close()
    assert sorted(p.name for p in out.iterdir()) == ["1000.jpg"]
    (out / "1000.jpg").write_bytes(b"sentinel")  # existing files are skipped, never rewritten
    assert bench.extract_images() == 3
    assert (out / "1000.jpg").read_bytes() == b"sentinel"
    assert sorted(p.name for p in out.iterdir()) == ["1000.jpg", "1001.jpg", "1002.jpg"]  # no temp files left
    (out / "1001.jpg").unlink()
    assert bench.extract_images() == 3
    assert (out / "1001.jpg").read_bytes() == image_bytes(1)


def test_flickr30k_cn_test_texts_without_pairs(tmp_path: Path) -> None:
    write_flickr(tmp_path)
    write_lines(tmp_path / "test_texts.jsonl", [jl({"text_id": 9, "text": "无标注", "image_ids": []})])
    [q] = list(Flickr30kCN(tmp_path, progress=False).queries())
    assert q.target_ids == ()


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"text_id": 4, "text": "坏的 JSON"', "invalid JSON"),
        (jl({"text_id": 4, "image_ids": [1000]}), "missing key 'text'"),
        (jl({"text_id": 4, "text": "x", "image_ids": "1000"}), "'image_ids' must be list"),
        (jl({"text_id": 4.5, "text": "x", "image_ids": [1000]}), "text_id"),
        (jl({"text_id": 4, "text": "x", "image_ids": [4242]}), "4242 is not in test_imgs.tsv"),
        (jl({"text_id": 1, "text": "x", "image_ids": [1000]}), "duplicate text_id 1"),
    ],
)
def test_flickr30k_cn_malformed_texts(tmp_path: Path, line: str, fragment: str) -> None:
    write_flickr(tmp_path)
    with open(tmp_path / "test_texts.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    with pytest.raises(DataFormatError) as err:
        list(Flickr30kCN(tmp_path, progress=False).queries())
    assert_names(err, "test_texts.jsonl", "line 5")
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [("1003", "expected 2 tab-separated columns"), ("1003\t!!!notbase64", "invalid base64"),
     ("1003\ta\tb", "got 3"), ("../x\taGVsbG8=", "bad image id"),
     ("1000\t" + base64.b64encode(b"x").decode(), "duplicate image id 1000")],
)
def test_flickr30k_cn_malformed_tsv(tmp_path: Path, line: str, fragment: str) -> None:
    write_flickr(tmp_path)
    with open(tmp_path / "test_imgs.tsv", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    with pytest.raises(DataFormatError) as err:
        list(Flickr30kCN(tmp_path, progress=False).corpus())
    assert_names(err, "test_imgs.tsv", "line 4")
    assert fragment in str(err.value)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "images" / "test").iterdir())


def test_flickr30k_cn_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"valid_imgs\.tsv"):
        list(Flickr30kCN(tmp_path, "valid", progress=False).corpus())
    with pytest.raises(DataFormatError, match=r"valid_texts\.jsonl"):
        list(Flickr30kCN(tmp_path, "valid", validate_targets=False, progress=False).queries())
    with pytest.raises(ValueError, match="split"):
        Flickr30kCN(tmp_path, "val")


# ---------------------------------------------------------------------------------------- CVLUE

CVLUE_PANDA = "images/val/A/1-panda/A-1-34.png"
CVLUE_COW = "images/val/A/2-cow/A-2-270.png"


def write_cvlue(root: Path, name: str = "val.json", image_root: Path | None = None) -> None:
    records = [
        {"image": CVLUE_PANDA, "caption": ["四只熊猫在地上玩耍", "一堆木头和四只熊猫", "动物在地上"]},
        {"image": CVLUE_COW, "caption": ["草地上站着三头牛", "动物在地上"]},
    ]
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    for i, rel in enumerate([CVLUE_PANDA, CVLUE_COW]):
        draw((image_root or root) / rel, i, "PNG")


def test_cvlue_loads_gold_layout(tmp_path: Path) -> None:
    write_cvlue(tmp_path)
    bench = CVLUE(tmp_path, "val")
    items = list(bench.corpus())
    assert [i.id for i in items] == [CVLUE_PANDA, CVLUE_COW]
    assert items[0].image == str(tmp_path / CVLUE_PANDA)
    queries = list(bench.queries())
    assert [q.text for q in queries] == ["四只熊猫在地上玩耍", "一堆木头和四只熊猫", "动物在地上", "草地上站着三头牛"]
    # Like the official eval_itr.py, a caption shared by two images is one query with both as targets.
    assert queries[2].target_ids == (CVLUE_PANDA, CVLUE_COW)
    assert queries[3].query_id == "2-1" and queries[3].target_ids == (CVLUE_COW,)
    unmerged = list(CVLUE(tmp_path, "val", merge_duplicate_captions=False).queries())
    assert len(unmerged) == 5 and all(len(q.target_ids) == 1 for q in unmerged)


def test_cvlue_baseline_file_names_and_image_root(tmp_path: Path) -> None:
    write_cvlue(tmp_path / "data", "IC/new_val.json", image_root=tmp_path / "pics")
    bench = CVLUE(tmp_path / "data", "val", image_root=tmp_path / "pics")
    assert bench.ann_file == tmp_path / "data" / "IC" / "new_val.json"
    assert [Path(i.image).exists() for i in bench.corpus()] == [True, True]


def test_cvlue_training_records_with_one_caption(tmp_path: Path) -> None:
    records = [{"image": CVLUE_PANDA, "caption": "熊猫", "image_id": 1},
               {"image": CVLUE_PANDA, "caption": "竹子旁的熊猫", "image_id": 1}]
    (tmp_path / "train.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    bench = CVLUE(tmp_path, "train", check_images=False)
    assert [i.id for i in bench.corpus()] == [CVLUE_PANDA]
    assert [q.target_ids for q in bench.queries()] == [(CVLUE_PANDA,), (CVLUE_PANDA,)]


@pytest.mark.parametrize(
    ("record", "fragment"),
    [({"image": CVLUE_COW}, "missing key 'caption'"), ({"image": CVLUE_COW, "caption": [1, 2]}, "list of strings"),
     ({"caption": ["x"]}, "missing key 'image'"), (["not", "an", "object"], "expected an object")],
)
def test_cvlue_malformed_record(tmp_path: Path, record: object, fragment: str) -> None:
    records = [{"image": CVLUE_PANDA, "caption": ["熊猫"]}, record]
    (tmp_path / "val.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        list(CVLUE(tmp_path, "val", check_images=False).queries())
    assert_names(err, "val.json", "record 2")
    assert fragment in str(err.value)


def test_cvlue_bad_json_and_missing_image(tmp_path: Path) -> None:
    (tmp_path / "val.json").write_text('[\n {"image": "a.png",\n  "caption": ["x"]\n ,,]', encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        list(CVLUE(tmp_path, "val").corpus())
    assert_names(err, "val.json", "line 4")
    write_cvlue(tmp_path)
    (tmp_path / CVLUE_COW).unlink()
    with pytest.raises(DataFormatError) as err:
        list(CVLUE(tmp_path, "val").corpus())
    assert_names(err, "val.json", "record 2")
    assert "does not exist" in str(err.value)
    with pytest.raises(DataFormatError, match="missing CVLUE annotation file"):
        CVLUE(tmp_path, "test")


# --------------------------------------------------------------------------------------- XM3600

XM_KEYS = ["000411001ff7dd4f", "0005c4d8e3b9a2f1", "00f1a2b3c4d5e6f7"]


def xm_record(key: str, i: int) -> dict[str, object]:
    rec: dict[str, object] = {"image/key": key, "image/locale": "zh"}
    languages = {"zh": [f"图片{i}的描述", f"第{i}张图"], "en": [f"a photo number {i}"], "de": [f"Bild {i}"]}
    for lang, caps in languages.items():
        lower = [c.lower() for c in caps]
        rec[lang] = {"caption": caps, "caption/tokenized": caps, "caption/tokenized/lowercase": lower}
    return rec


def write_xm3600(root: Path) -> None:
    write_lines(root / "captions.jsonl", [jl(xm_record(k, i)) for i, k in enumerate(XM_KEYS)])
    for i, k in enumerate(XM_KEYS):
        draw(root / "images" / f"{k}.jpg", i)


def test_xm3600_loads(tmp_path: Path) -> None:
    write_xm3600(tmp_path)
    zh = XM3600(tmp_path, language="zh")
    items = list(zh.corpus())
    assert [i.id for i in items] == XM_KEYS
    assert items[0].image == str(tmp_path / "images" / f"{XM_KEYS[0]}.jpg")
    queries = list(zh.queries())
    assert len(queries) == 6
    assert queries[0].query_id == f"{XM_KEYS[0]}/zh/0" and queries[0].target_ids == (XM_KEYS[0],)
    assert queries[3].text == "第1张图" and queries[3].language == "zh"
    en = list(load_benchmark("xm3600", tmp_path, language="en").queries())
    assert [q.text for q in en] == ["a photo number 0", "a photo number 1", "a photo number 2"]


def test_xm3600_malformed(tmp_path: Path) -> None:
    write_xm3600(tmp_path)
    rec = xm_record(XM_KEYS[1], 1)
    del rec["zh"]
    lines = (tmp_path / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    lines[1] = jl(rec)
    write_lines(tmp_path / "captions.jsonl", lines)
    with pytest.raises(DataFormatError) as err:
        list(XM3600(tmp_path, language="zh").queries())
    assert_names(err, "captions.jsonl", "line 2")
    assert "missing key 'zh'" in str(err.value)
    assert len(list(XM3600(tmp_path, language="en").queries())) == 3

    write_xm3600(tmp_path)
    (tmp_path / "images" / f"{XM_KEYS[2]}.jpg").unlink()
    with pytest.raises(DataFormatError) as err:
        list(XM3600(tmp_path).corpus())
    assert_names(err, "captions.jsonl", "line 3")

    with pytest.raises(ValueError, match="language"):
        XM3600(tmp_path, language="xx")
    with pytest.raises(ValueError, match="test"):
        XM3600(tmp_path, "val")


# --------------------------------------------------------------------------------- wiki-longform

LONG = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. " * 20


def test_wiki_longform_jsonl(tmp_path: Path) -> None:
    write_lines(tmp_path / "test.jsonl", [
        jl({"id": "q1", "image": "images/eiffel.jpg", "text": LONG}),
        jl({"id": "q2", "image": "images/louvre.jpg", "text": "The Louvre is the world's most-visited museum. " * 10}),
        jl({"id": "q3", "image": "images/eiffel.jpg", "text": "Another passage about the tower. " * 10}),
    ])
    draw(tmp_path / "images" / "eiffel.jpg", 0)
    draw(tmp_path / "images" / "louvre.jpg", 1)
    bench = load_benchmark("wiki-longform", tmp_path)
    assert isinstance(bench, WikiLongform) and bench.task == "longform"
    assert [(i.id, i.image) for i in bench.corpus()] == [
        ("images/eiffel.jpg", str(tmp_path / "images" / "eiffel.jpg")),
        ("images/louvre.jpg", str(tmp_path / "images" / "louvre.jpg")),
    ]
    queries = list(bench.queries())
    assert [(q.query_id, q.target_ids) for q in queries] == [
        ("q1", ("images/eiffel.jpg",)), ("q2", ("images/louvre.jpg",)), ("q3", ("images/eiffel.jpg",))]
    assert queries[0].text == LONG and queries[0].task == "longform"


def test_wiki_longform_jsonl_malformed(tmp_path: Path) -> None:
    draw(tmp_path / "a.jpg", 0)
    write_lines(tmp_path / "test.jsonl", [jl({"id": "q1", "image": "a.jpg", "text": LONG}),
                                          jl({"id": "q2", "image": "a.jpg"})])
    with pytest.raises(DataFormatError) as err:
        list(WikiLongform(tmp_path).queries())
    assert_names(err, "test.jsonl", "line 2")
    write_lines(tmp_path / "test.jsonl", [jl({"id": "q1", "image": "missing.jpg", "text": LONG})])
    with pytest.raises(DataFormatError) as err:
        list(WikiLongform(tmp_path).corpus())
    assert_names(err, "test.jsonl", "line 1")


def wit_row(**values: str) -> list[str]:
    defaults = {c: "" for c in WIT_COLUMNS}
    defaults.update(original_height="600", original_width="800", is_main_image="true", mime_type="image/jpeg",
                    attribution_passes_lang_id="true", page_changed_recently="false")
    defaults.update(values)
    return [defaults[c] for c in WIT_COLUMNS]


def write_tsv(path: Path, rows: list[list[str]], gz: bool = False) -> None:
    text = "".join("\t".join(r) + "\n" for r in [list(WIT_COLUMNS), *rows])
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())


def test_wiki_longform_wit_tsv(tmp_path: Path) -> None:
    url1 = "https://upload.wikimedia.org/wikipedia/commons/a/a8/Tour_Eiffel_Wikimedia_Commons.jpg"
    url2 = "https://upload.wikimedia.org/wikipedia/commons/6/66/Louvre%20Museum.JPG"
    url3 = "https://upload.wikimedia.org/wikipedia/commons/0/00/Not_downloaded.jpg"
    write_tsv(tmp_path / "wit_v1.train.all-00000-of-00010.tsv.gz", [
        wit_row(language="en", image_url=url1, page_title="Eiffel Tower", context_section_description=LONG),
        wit_row(language="fr", image_url=url1, context_section_description="La tour Eiffel est une tour. " * 5),
        wit_row(language="en", image_url=url3, context_section_description="Never downloaded."),
        wit_row(language="en", image_url=url2, context_page_description="The Louvre, page text. " * 8),
        wit_row(language="en", image_url=url2),  # no text: skipped
    ], gz=True)
    images = tmp_path / "wit_images"
    draw(images / wit_image_filename(url1), 0)
    draw(images / wit_image_filename(url2), 1)
    assert wit_image_filename(url1) == hashlib.sha1(url1.encode()).hexdigest() + ".jpg"

    bench = WikiLongform(tmp_path, format="wit", image_dir=images, language="en")
    assert [i.id for i in bench.corpus()] == [url1, url2]
    queries = list(bench.queries())
    assert [(q.query_id, q.target_ids) for q in queries] == [
        ("wit_v1.train.all-00000-of-00010.tsv.gz:2", (url1,)), ("wit_v1.train.all-00000-of-00010.tsv.gz:5", (url2,))]
    assert queries[0].text == LONG and queries[1].text.startswith("The Louvre, page text.")
    assert len(list(WikiLongform(tmp_path, format="wit", image_dir=images).queries())) == 3  # all languages

    by_name = tmp_path / "by_name"
    draw(by_name / "Louvre Museum.JPG", 1)
    named = WikiLongform(tmp_path, format="wit", image_dir=by_name, image_naming="basename")
    assert [i.image for i in named.corpus()] == [str(by_name / "Louvre Museum.JPG")]

    with pytest.raises(DataFormatError) as err:
        list(WikiLongform(tmp_path, format="wit", image_dir=images, skip_missing_images=False).queries())
    assert_names(err, "wit_v1.train.all-00000-of-00010.tsv.gz", "line 4")


def test_wiki_longform_wit_malformed(tmp_path: Path) -> None:
    path = tmp_path / "part.tsv"
    write_tsv(path, [wit_row(language="en", image_url="https://x/a.jpg", context_section_description="t"),
                     wit_row(language="en")[:5]])
    with pytest.raises(DataFormatError) as err:
        list(WikiLongform(tmp_path, format="wit", image_dir=tmp_path).queries())
    assert_names(err, "part.tsv", "line 3")
    assert "expected 17 columns, got 5" in str(err.value)
    path.write_text("language\timage_url\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        list(WikiLongform(tmp_path, format="wit").queries())
    assert_names(err, "part.tsv", "line 1")


# ----------------------------------------------------------------------------------------- CIRR

CIRR_IMAGES = [f"dev-{i}-0-img{i % 2}" for i in range(8)]  # dev-6 and dev-7 are in no query


def cirr_records(test: bool = False) -> list[dict[str, object]]:
    img = CIRR_IMAGES
    recs: list[dict[str, object]] = [
        {"pairid": 7, "reference": img[0], "target_hard": img[1], "target_soft": {img[1]: 1.0},
         "caption": "make the dog smaller", "img_set": {"id": 1, "members": [img[0], img[1], img[2], img[3], img[4],
                                                                               img[5]], "reference_rank": 0,
                                                         "target_rank": 1}},
        {"pairid": 8, "reference": img[2], "target_hard": img[3], "target_soft": {img[3]: 1.0},
         "caption": "add a second cat", "img_set": {"id": 2, "members": [img[1], img[2], img[3], img[4], img[5],
                                                                           img[0]], "reference_rank": 1,
                                                     "target_rank": 2}},
    ]
    if test:
        for r in recs:
            for key in ("target_hard", "target_soft"):
                r.pop(key)
            r["img_set"].pop("target_rank")  # type: ignore[union-attr]
    return recs


def write_cirr(root: Path, split: str = "val", records: list[dict[str, object]] | None = None) -> None:
    folder = {"val": "dev", "test1": "test1"}[split]
    names = [n.replace("dev", folder) for n in CIRR_IMAGES] if folder != "dev" else CIRR_IMAGES
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits" / f"split.rc2.{split}.json").write_text(
        json.dumps({n: f"./{folder}/{n}.png" for n in names}, indent=1))
    recs = records if records is not None else cirr_records(test=split == "test1")
    text = json.dumps(recs, indent=1)
    if folder != "dev":
        text = text.replace("dev-", f"{folder}-")
    (root / "captions" / f"cap.rc2.{split}.json").write_text(text)
    for i, n in enumerate(names):
        draw(root / "img_raw" / folder / f"{n}.png", i, "PNG")


def test_cirr_val(tmp_path: Path) -> None:
    write_cirr(tmp_path)
    bench = load_benchmark("cirr", tmp_path, split="val")
    assert isinstance(bench, CIRR) and bench.task == "composed" and bench.has_labels
    items = list(bench.corpus())
    # The gallery is every image of the split, including images no query mentions.
    assert [i.id for i in items] == CIRR_IMAGES
    assert items[6].image == str(tmp_path / "img_raw" / "dev" / f"{CIRR_IMAGES[6]}.png")
    q7, q8 = list(bench.queries())
    assert q7.query_id == "7" and q7.text == "make the dog smaller"
    assert q7.reference_id == CIRR_IMAGES[0] and q7.target_ids == (CIRR_IMAGES[1],)
    assert q7.subset_ids == tuple(CIRR_IMAGES[1:6])  # members minus the reference
    assert q8.subset_ids == (CIRR_IMAGES[1], CIRR_IMAGES[3], CIRR_IMAGES[4], CIRR_IMAGES[5], CIRR_IMAGES[0])
    assert q7.reference_id not in q7.subset_ids and q7.excluded_ids == (CIRR_IMAGES[0],)
    assert q7.task == "composed" and q7.split == "val"


def test_cirr_test_split_has_no_targets(tmp_path: Path) -> None:
    write_cirr(tmp_path, "test1")
    bench = CIRR(tmp_path, "test")  # alias of test1
    assert bench.split == "test1" and not bench.has_labels
    assert len(list(bench.corpus())) == 8
    queries = list(bench.queries())
    assert [q.target_ids for q in queries] == [(), ()]
    assert queries[0].reference_id == "test1-0-0-img0" and len(queries[0].subset_ids or ()) == 5


def test_cirr_image_root(tmp_path: Path) -> None:
    write_cirr(tmp_path)
    (tmp_path / "img_raw").rename(tmp_path / "raw")
    with pytest.raises(DataFormatError) as err:
        list(CIRR(tmp_path).corpus())
    assert_names(err, "split.rc2.val.json", "record 1")
    assert len(list(CIRR(tmp_path, image_root=tmp_path / "raw").corpus())) == 8


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [(lambda r: r.pop("caption"), "missing key 'caption'"),
     (lambda r: r.update(target_hard="dev-99-0-img0"), "target_hard 'dev-99-0-img0' is not in split.rc2.val.json"),
     (lambda r: r.update(reference="nope"), "reference 'nope' is not in"),
     (lambda r: r.update(pairid="8"), "'pairid' must be int"),
     (lambda r: r.update(pairid=7), "duplicate pairid 7"),
     (lambda r: r["img_set"].pop("members"), "missing key 'members'")],
)
def test_cirr_malformed_records(tmp_path: Path, edit, fragment: str) -> None:  # type: ignore[no-untyped-def]
    recs = cirr_records()
    edit(recs[1])
    write_cirr(tmp_path, records=recs)
    with pytest.raises(DataFormatError) as err:
        list(CIRR(tmp_path).queries())
    assert_names(err, "cap.rc2.val.json", "record 2")
    assert fragment in str(err.value)


def test_cirr_bad_json_and_missing_files(tmp_path: Path) -> None:
    write_cirr(tmp_path)
    (tmp_path / "captions" / "cap.rc2.val.json").write_text('[\n{"pairid": 1,\n "caption": }\n]')
    with pytest.raises(DataFormatError) as err:
        list(CIRR(tmp_path).queries())
    assert_names(err, "cap.rc2.val.json", "line 3")
    with pytest.raises(DataFormatError, match=r"split\.rc2\.train\.json"):
        list(CIRR(tmp_path, "train").corpus())
    with pytest.raises(ValueError, match="split"):
        CIRR(tmp_path, "dev")


# ------------------------------------------------------------------------------------- registry


def test_registry() -> None:
    assert set(BENCHMARKS) == {"flickr30k-cn", "cvlue", "xm3600", "wiki-longform", "cirr"}
    for name, cls in BENCHMARKS.items():
        assert cls.name == name
    with pytest.raises(ValueError) as err:
        load_benchmark("coco", "/nowhere")
    for name in BENCHMARKS:
        assert name in str(err.value)


def test_loaders_stream(tmp_path: Path) -> None:
    write_flickr(tmp_path)
    bench = load_benchmark("flickr30k-cn", tmp_path, progress=False)
    gen = bench.queries()
    assert iter(gen) is gen  # a generator, read lazily
    assert next(gen).query_id == "1"
