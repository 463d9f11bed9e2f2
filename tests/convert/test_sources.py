"""Source adapters on their published formats: the real files of ../shared/data, and small inputs
built in tmp_path in the real layouts (CC3M/CC12M TSV, YFCC dump, img2dataset's own output)."""
import csv
import io
import json
import os
import re
import shutil
import tarfile
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tools.convert.sources import SOURCES, SourceError, SourceOptions, TarMember, get_source


def listed(name, path, **options):
    return list(get_source(name)(str(path), SourceOptions(**options)))


def assert_well_formed(records):
    keys = [r.source_key for r in records]
    assert len(set(keys)) == len(keys)
    for r in records:
        if not isinstance(r.image, TarMember):
            assert os.path.isabs(r.image) and os.path.isfile(r.image)
        assert r.captions == [c.strip() for c in r.captions if c.strip()]
        json.dumps(r.meta, allow_nan=False)


def flickr_rows(shared_data):
    with open(shared_data / "flickr8k-1k" / "captions.txt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def images(shared_data):
    """Eight real Flickr8k JPEG paths."""
    return sorted((shared_data / "flickr8k-1k" / "images").glob("*.jpg"))[:8]


def test_registry_names_and_unknown_source():
    assert set(SOURCES) == {"coco", "coco-karpathy", "flickr", "cc", "yfcc", "img2dataset", "table"}
    with pytest.raises(SourceError, match="valid sources: coco, coco-karpathy"):
        get_source("laion")


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_missing_input_is_a_source_error(name, tmp_path):
    missing = tmp_path / ("nothing.tsv" if name != "coco" else "captions_x.json")
    with pytest.raises(SourceError, match=re.escape(f"{missing}: not found; pass --input")):
        listed(name, missing, image_column="a", caption_column="b")


# --- COCO ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("split, n_images", [("train2017", 80), ("val2017", 159)])
def test_coco_official(shared_data, split, n_images):
    path = shared_data / "coco-mini" / "annotations" / f"captions_{split}.json"
    data = json.loads(path.read_text())
    records = listed("coco", path)
    assert len(records) == n_images
    assert_well_formed(records)
    assert [r.image_name for r in records] == [i["file_name"] for i in data["images"]]
    licenses = {lic["id"]: lic for lic in data["licenses"]}
    for r, img in zip(records, data["images"]):
        assert r.image == str(shared_data / "coco-mini" / split / img["file_name"])
        assert r.source_key == Path(img["file_name"]).stem
        assert r.captions == [a["caption"].strip() for a in data["annotations"]
                              if a["image_id"] == img["id"]]
        assert len(r.captions) == 5
        assert r.meta["image_id"] == img["id"]
        assert (r.meta["width"], r.meta["height"]) == (img["width"], img["height"])
        assert r.meta["license"] == licenses[img["license"]]["name"]
        assert r.meta["license_url"] == licenses[img["license"]]["url"]
        assert r.meta["coco_url"].endswith(img["file_name"]) and "flickr_url" in r.meta


def test_coco_images_root_fallback_and_override(shared_data, tmp_path):
    official = shared_data / "coco-mini" / "annotations" / "captions_val2017.json"
    copy = tmp_path / "captions_val2017.json"  # no ../val2017 beside the copy: use its folder
    shutil.copy(official, copy)
    assert Path(listed("coco", copy)[0].image).parent == tmp_path
    root = shared_data / "coco-mini" / "val2017"
    assert all(os.path.isfile(r.image) for r in listed("coco", copy, images_root=str(root)))


def test_coco_rejects_the_other_layout(shared_data):
    karpathy = shared_data / "coco-mini" / "karpathy" / "coco_mini_train.json"
    with pytest.raises(SourceError, match="coco-karpathy"):
        listed("coco", karpathy)
    official = shared_data / "coco-mini" / "annotations" / "captions_train2017.json"
    with pytest.raises(SourceError, match="--source coco "):
        listed("coco-karpathy", official)


def test_coco_karpathy_train_groups_rows_by_image(shared_data):
    path = shared_data / "coco-mini" / "karpathy" / "coco_mini_train.json"
    rows = json.loads(path.read_text())
    records = listed("coco-karpathy", path)
    assert len(records) == 80 and all(len(r.captions) == 5 for r in records)
    assert_well_formed(records)
    assert [r.image_name for r in records] == list(dict.fromkeys(row["image"] for row in rows))
    for r in records:
        assert r.image == str(shared_data / "coco-mini" / r.image_name)
        assert r.captions == [row["caption"].strip() for row in rows
                              if row["image"] == r.image_name]
        assert r.meta == {"image_id": r.source_key.lstrip("0")}
    official = listed("coco", shared_data / "coco-mini" / "annotations" / "captions_train2017.json")
    assert {r.source_key: r.captions for r in records} == \
        {r.source_key: r.captions for r in official}


def test_coco_karpathy_test_rows(shared_data):
    path = shared_data / "coco-mini" / "karpathy" / "coco_mini_test.json"
    rows = json.loads(path.read_text())
    records = listed("coco-karpathy", path)
    assert len(records) == 159
    assert_well_formed(records)
    for r, row in zip(records, rows):
        assert (r.image_name, r.captions, r.meta) == (row["image"], row["caption"], {})
        assert r.image.startswith(str(shared_data / "coco-mini" / "val2017"))


# --- Flickr -------------------------------------------------------------------------------------

def test_flickr_captions_csv(shared_data):
    records = listed("flickr", shared_data / "flickr8k-1k" / "captions.txt")
    assert len(records) == 1000 and all(len(r.captions) == 5 for r in records)
    assert_well_formed(records)
    by_key = {r.source_key: r for r in records}
    # A quoted CSV field holding a comma stays one caption.
    assert ("A dog shakes its head near the shore , a red ball next to it ."
            in by_key["1012212859_01547e3f17"].captions)
    assert Path(records[0].image).parent == shared_data / "flickr8k-1k" / "images"
    rows = flickr_rows(shared_data)
    assert [r.image_name for r in records] == list(dict.fromkeys(row["image"] for row in rows))


def test_flickr30k_pipe_csv(shared_data, tmp_path):
    rows = flickr_rows(shared_data)[:10]
    lines = ["image_name| comment_number| comment"]
    lines += [f"{row['image']}| {i % 5}| {row['caption']}" for i, row in enumerate(rows)]
    lines.append(f"{rows[0]['image']}| 5")  # the Kaggle file's one broken row: no caption
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    records = listed("flickr", tmp_path / "results.csv",
                     images_root=str(shared_data / "flickr8k-1k" / "images"))
    assert [len(r.captions) for r in records] == [5, 5]
    assert records[0].captions == [row["caption"].strip() for row in rows[:5]]
    assert_well_formed(records)


def test_flickr_karpathy_json_and_split(shared_data, tmp_path):
    rows = flickr_rows(shared_data)
    names = list(dict.fromkeys(row["image"] for row in rows))[:6]
    splits = ["train", "train", "val", "test", "test", "train"]
    data = {"dataset": "flickr8k", "images": [
        {"filename": name, "imgid": i, "split": split, "sentids": [],
         "sentences": [{"raw": row["caption"], "tokens": [], "imgid": i}
                       for row in rows if row["image"] == name]}
        for i, (name, split) in enumerate(zip(names, splits))]}
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps(data))
    root = str(shared_data / "flickr8k-1k" / "images")
    records = listed("flickr", path, images_root=root)
    assert [r.image_name for r in records] == names
    assert records[2].meta == {"image_id": 2, "split": "val"} and len(records[2].captions) == 5
    assert_well_formed(records)
    assert [r.source_key for r in listed("flickr", path, images_root=root, split="test")] == \
        [Path(n).stem for n in names[3:5]]


def test_flickr_albef_list(shared_data, tmp_path):
    rows = flickr_rows(shared_data)[:15]
    (tmp_path / "annotation").mkdir()
    os.symlink(shared_data / "flickr8k-1k" / "images", tmp_path / "flickr8k-images")
    albef = [{"image": f"flickr8k-images/{row['image']}", "caption": row["caption"],
              "image_id": i // 5} for i, row in enumerate(rows)]
    (tmp_path / "annotation" / "flickr_train.json").write_text(json.dumps(albef))
    records = listed("flickr", tmp_path / "annotation" / "flickr_train.json")
    assert [r.meta["image_id"] for r in records] == [0, 1, 2]
    assert all(len(r.captions) == 5 for r in records)
    assert_well_formed(records)


# --- CC3M / CC12M -------------------------------------------------------------------------------

@pytest.fixture
def cc_dir(tmp_path, images):
    (tmp_path / "images").mkdir()
    for i, src in enumerate(images[:4]):
        shutil.copy(src, tmp_path / "images" / f"{i:09d}.jpg")
    return tmp_path


CC_CAPTIONS = ['actor attends the premiere of "film" , in city', "a dog, a ball and the sea",
               "person walks down the runway", "  padded caption  "]


def test_cc3m_without_header(cc_dir):
    lines = [f"{c}\timages/{i:09d}.jpg" for i, c in enumerate(CC_CAPTIONS)]
    (cc_dir / "Train_GCC-training.tsv").write_text("\n".join(lines) + "\n")
    records = listed("cc", cc_dir / "Train_GCC-training.tsv")
    assert [r.captions for r in records] == [[c.strip()] for c in CC_CAPTIONS]
    assert [r.source_key for r in records] == [f"{i:09d}" for i in range(4)]
    assert [r.meta for r in records] == [{"row": i} for i in range(4)]
    assert records[0].image_name == "images/000000000.jpg"
    assert_well_formed(records)


def test_cc12m_order_absolute_and_file_urls(cc_dir):
    paths = [str(cc_dir / "images" / f"{i:09d}.jpg") for i in range(4)]
    urls = [paths[0], "file://" + urllib.parse.quote(paths[1]), paths[2], paths[0]]
    (cc_dir / "cc12m.tsv").write_text("".join(f"{u}\t{c}\n" for u, c in zip(urls, CC_CAPTIONS)))
    records = listed("cc", cc_dir / "cc12m.tsv")
    assert [r.image for r in records] == [paths[0], paths[1], paths[2], paths[0]]
    assert records[1].image_name == urls[1]
    assert records[0].captions == [CC_CAPTIONS[0]]
    # The same image listed twice keeps a unique key.
    assert [r.source_key for r in records] == ["000000000", "000000001", "000000002", "000000000_3"]
    assert_well_formed(records)


def test_cc_with_header_and_extra_columns(cc_dir):
    lines = ["caption\timage\tsimilarity"]
    lines += [f"{c}\timages/{i:09d}.jpg\t0.{i}" for i, c in enumerate(CC_CAPTIONS[:3])]
    (cc_dir / "cc.tsv").write_text("\n".join(lines) + "\n")
    records = listed("cc", cc_dir / "cc.tsv")
    assert len(records) == 3
    assert records[2].meta == {"row": 2, "similarity": "0.2"}
    assert records[1].captions == [CC_CAPTIONS[1]]
    assert_well_formed(records)


def test_cc_remote_urls_point_to_img2dataset(cc_dir):
    (cc_dir / "remote.tsv").write_text("a cat on a mat\thttps://example.com/cat.jpg\n")
    with pytest.raises(SourceError,
                       match=r"remote\.tsv: row 0 .*img2dataset.*--source img2dataset"):
        listed("cc", cc_dir / "remote.tsv")


def test_cc_ambiguous_columns(cc_dir):
    (cc_dir / "odd.tsv").write_text("a cat\ta dog\n")
    with pytest.raises(SourceError, match="add a header row"):
        listed("cc", cc_dir / "odd.tsv")


# --- YFCC ---------------------------------------------------------------------------------------

YFCC_COLUMNS = ["photoid", "filepath", "title", "description", "usertags", "downloadurl",
                "licensename", "licenseurl"]


@pytest.fixture
def yfcc_rows(tmp_path, images):
    (tmp_path / "data").mkdir()
    for src in images[:3]:
        shutil.copy(src, tmp_path / "data" / src.name)
    return [
        ["6985418911", f"data/{images[0].name}", "A+day+at+the+beach", "Sun%2C+sand+%26+sea",
         "beach,new+york,summer", "http://farm8.staticflickr.com/a.jpg",
         "Attribution-NonCommercial-ShareAlike+License",
         "http://creativecommons.org/licenses/by-nc-sa/2.0/"],
        ["4360744405", f"data/{images[1].name}", "IMG_0042", "", "", "", "Attribution+License", ""],
        ["2843225561", f"data/{images[2].name}", "", "", "", "", "", ""],
    ]


@pytest.mark.parametrize("mode, expected", [
    ("title+description", [["A day at the beach", "Sun, sand & sea"], ["IMG_0042"], []]),
    ("title", [["A day at the beach"], ["IMG_0042"], []]),
    ("description", [["Sun, sand & sea"], [], []]),
    ("tags", [["beach, new york, summer"], [], []]),
    ("all", [["A day at the beach", "Sun, sand & sea", "beach, new york, summer"],
             ["IMG_0042"], []]),
])
def test_yfcc_dump_tsv(tmp_path, yfcc_rows, mode, expected):
    path = tmp_path / "yfcc15m.tsv"
    path.write_text("\n".join("\t".join(r) for r in [YFCC_COLUMNS] + yfcc_rows) + "\n")
    records = listed("yfcc", path, yfcc_caption=mode)
    assert [r.captions for r in records] == expected
    assert [r.source_key for r in records] == [r[0] for r in yfcc_rows]
    assert records[0].meta == {
        "photoid": "6985418911", "url": "http://farm8.staticflickr.com/a.jpg",
        "license": "Attribution-NonCommercial-ShareAlike License",
        "license_url": "http://creativecommons.org/licenses/by-nc-sa/2.0/"}
    assert_well_formed(records)


def test_yfcc_decoded_parquet(tmp_path, yfcc_rows):
    table = {c: [r[i] for r in yfcc_rows] for i, c in enumerate(YFCC_COLUMNS)}
    table["photoid"] = [int(p) for p in table["photoid"]]
    table["title"] = ["C++ code on a screen", "100% cotton", None]
    table["usertags"] = [["new york", "beach"], [], None]
    pq.write_table(pa.table(table), tmp_path / "yfcc.parquet")
    records = listed("yfcc", tmp_path / "yfcc.parquet", yfcc_caption="all")
    assert records[0].captions == ["C++ code on a screen", "Sun, sand & sea", "new york, beach"]
    assert records[1].captions == ["100% cotton"]
    assert records[0].source_key == "6985418911"
    assert_well_formed(records)


def test_yfcc_errors(tmp_path, yfcc_rows):
    path = tmp_path / "no_path.csv"
    path.write_text("photoid,title\n1,hello\n")
    with pytest.raises(SourceError, match=r"no image path column .*'photoid', 'title'"):
        listed("yfcc", path)
    with pytest.raises(SourceError, match="title\\+description"):
        listed("yfcc", path, yfcc_caption="titles")


# --- img2dataset --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def img2dataset_out(shared_data, tmp_path_factory):
    """img2dataset's own output for 20 real images via file:// URLs, in both layouts.

    img2dataset runs offline on file:// URLs; it needs wandb off and (spawned workers) a guarded
    __main__, which pytest has. The env var stops albumentations phoning home at import.
    """
    root = tmp_path_factory.mktemp("img2dataset")
    srcs = sorted((shared_data / "flickr8k-1k" / "images").glob("*.jpg"))[:20]
    captions = {f"file://{p}": f"photo {i}, from \"Flickr8k\"" for i, p in enumerate(srcs)}
    pq.write_table(pa.table({"url": list(captions), "caption": list(captions.values())}),
                   root / "urls.parquet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
        download = pytest.importorskip("img2dataset").download
        for fmt in ("webdataset", "files"):
            download(url_list=str(root / "urls.parquet"), input_format="parquet", url_col="url",
                     caption_col="caption", output_format=fmt, output_folder=str(root / fmt),
                     processes_count=1, thread_count=4, resize_mode="no", enable_wandb=False,
                     number_sample_per_shard=8)
    return root, captions


@pytest.mark.slow  # the img2dataset run both layouts share starts its own interpreters: ~7 s
def test_img2dataset_webdataset_layout(img2dataset_out):
    root, captions = img2dataset_out
    records = listed("img2dataset", root / "webdataset")
    assert len(records) == 20
    assert_well_formed(records)
    tars = sorted((root / "webdataset").glob("*.tar"))
    assert [r.image.tar_path for r in records] == sorted(r.image.tar_path for r in records)
    for tar_path in tars:  # tar order inside each shard
        with tarfile.open(tar_path) as tar:
            order = [m.name[:-4] for m in tar if m.name.endswith(".jpg")]
        assert [r.source_key for r in records if r.image.tar_path == str(tar_path)] == order
    for r in records:
        assert r.captions == [captions[r.meta["url"]]]
        assert r.image_name == f"{Path(r.image.tar_path).stem}/{r.source_key}.jpg"
        assert r.meta["key"] == r.source_key and "status" not in r.meta
        with open(r.image.tar_path, "rb") as f:
            f.seek(r.image.offset)
            data = f.read(r.image.size)
        with tarfile.open(r.image.tar_path) as tar:
            assert data == tar.extractfile(r.image.name).read()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.format == "JPEG"
            assert im.size == (r.meta["original_width"], r.meta["original_height"])
    single = listed("img2dataset", tars[0])
    assert [r.source_key for r in single] == [r.source_key for r in records[:len(single)]]


@pytest.mark.slow  # the img2dataset run above (module-scoped)
def test_img2dataset_files_layout(img2dataset_out):
    root, captions = img2dataset_out
    records = listed("img2dataset", root / "files")
    assert len(records) == 20
    assert_well_formed(records)
    assert [r.image_name for r in records] == sorted(r.image_name for r in records)
    for r in records:
        assert r.image == str(root / "files" / r.image_name)
        assert r.captions == [captions[r.meta["url"]]]
    tars = listed("img2dataset", root / "webdataset")
    assert {(r.source_key, r.image_name, r.captions[0]) for r in records} == \
        {(r.source_key, r.image_name, r.captions[0]) for r in tars}


def test_img2dataset_without_shards(tmp_path):
    (tmp_path / "00000.parquet").write_bytes(b"")
    with pytest.raises(SourceError, match="output_format='webdataset' or 'files'"):
        listed("img2dataset", tmp_path)


# --- generic table ------------------------------------------------------------------------------

@pytest.fixture
def table_rows(tmp_path, images):
    (tmp_path / "imgs").mkdir()
    for src in images[:3]:
        shutil.copy(src, tmp_path / "imgs" / src.name)
    return [{"path": f"imgs/{src.name}", "text": f"caption, \"{i}\"", "score": i / 4,
             "source": "web"} for i, src in enumerate(images[:3])]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_table_csv_tsv(tmp_path, table_rows, suffix):
    path = tmp_path / f"pairs{suffix}"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table_rows[0]),
                                delimiter="," if suffix == ".csv" else "\t")
        writer.writeheader()
        writer.writerows(table_rows)
    records = listed("table", path, image_column="path", caption_column="text")
    assert [r.captions for r in records] == [[row["text"]] for row in table_rows]
    assert records[1].meta == {"score": "0.25", "source": "web"}
    assert records[1].source_key == Path(table_rows[1]["path"]).stem
    assert_well_formed(records)


def test_table_jsonl_and_json_with_list_captions(tmp_path, table_rows):
    rows = [dict(r, text=[r["text"], " second ", ""], key=f"k{i}")
            for i, r in enumerate(table_rows)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    for name in ("pairs.jsonl", "pairs.json"):
        records = listed("table", tmp_path / name, image_column="path", caption_column="text")
        assert records[0].captions == [rows[0]["text"][0], "second"]
        assert [r.source_key for r in records] == ["k0", "k1", "k2"]
        assert records[2].meta == {"score": 0.5, "source": "web", "key": "k2"}
        assert_well_formed(records)


def test_table_parquet_meta_is_json(tmp_path, table_rows):
    pq.write_table(pa.table({
        "image": [r["path"] for r in table_rows],
        "captions": [[table_rows[0]["text"]], ["a", "b"], None],
        "score": [0.5, float("nan"), None],
        "when": pa.array([0, 1, 2], pa.timestamp("s")),
        "jpg": [b"\xff\xd8", b"", None],
    }), tmp_path / "pairs.parquet")
    records = listed("table", tmp_path / "pairs.parquet", image_column="image",
                     caption_column="captions", images_root=str(tmp_path))
    assert [r.captions for r in records] == [[table_rows[0]["text"]], ["a", "b"], []]
    assert records[1].meta == {"score": None, "when": "1970-01-01T00:00:01"}
    assert records[2].meta == {"score": None, "when": "1970-01-01T00:00:02", "jpg": None}
    assert_well_formed(records)


def test_table_errors(tmp_path, table_rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in table_rows))
    with pytest.raises(SourceError, match="--image-column NAME --caption-column NAME"):
        listed("table", path, image_column="path")
    with pytest.raises(SourceError, match=r"pairs\.jsonl: no column 'caption'; available columns: "
                                          r"\['path', 'text', 'score', 'source'\]"):
        listed("table", path, image_column="path", caption_column="caption")
    with pytest.raises(SourceError, match="unknown table suffix '.xlsx'"):
        listed("table", tmp_path / "pairs.xlsx", image_column="path", caption_column="text")


def test_identity_is_the_path_under_the_images_root_unique_in_every_source(tmp_path, images):
    """Two folders holding the same file names are different images: table and yfcc (whose source
    keys are file stems) give them one source key but two identities."""
    from tools.convert.sources.base import image_identity

    rows = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i, src in enumerate(images[:2]):
            shutil.copy(src, tmp_path / folder / f"{i:09d}.jpg")
            rows.append({"path": f"{folder}/{i:09d}.jpg", "filepath": f"./{folder}//{i:09d}.jpg", "text": "x"})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = listed("table", tmp_path / "t.jsonl", image_column="path", caption_column="text")
    yfcc = listed("yfcc", tmp_path / "t.jsonl")
    want = ["a/000000000.jpg", "a/000000001.jpg", "b/000000000.jpg", "b/000000001.jpg"]
    for records in (table, yfcc):
        assert [r.identity for r in records] == want
        assert [r.source_key for r in records] == ["000000000", "000000001"] * 2
    assert image_identity("a\\b\\c.jpg") == "a/b/c.jpg" and image_identity("/abs/./x.jpg") == "/abs/x.jpg"
    assert image_identity("file:///x%20y.jpg") == "file:///x%20y.jpg"
