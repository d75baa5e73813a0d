"""User data sources refuse bad files with a `DataError` naming the file (and the line or row), and a wrong
column name is a `ConfigError` when the run config loads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from restuning import ConfigError, DataError
from restuning.data import hf_dataset, image_folder, text_table
from restuning.data.sources import load_image, table_columns
from restuning.train.config import TrainConfig, check_data_files, from_dict, load_config


def _png(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    pixels = (torch.rand(12, 10, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


# --- encodings and malformed lines -------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_latin1_table_names_the_file_the_line_and_utf8(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    rows = ["text,label", "good,pos", "café,neg"] if suffix == ".csv" else [
        '{"text": "good", "label": "pos"}', '{"text": "café", "label": "neg"}']
    path.write_bytes("\n".join(rows).encode("latin-1") + b"\n")
    line = 3 if suffix == ".csv" else 2
    with pytest.raises(DataError, match=rf"a\{suffix}, line {line}: not UTF-8 .*expected UTF-8"):
        text_table(path)


def test_a_utf16_csv_is_refused_with_a_hint(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\ngood,pos\nbad,neg\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"a\.csv, line 1: not UTF-8 .*UTF-16"):
        text_table(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("text,label\ngood,pos\nbad,neg\n", encoding="utf-16-le")  # no BOM
    with pytest.raises(DataError, match=r"b\.csv, line 1: .*UTF-16.*expected UTF-8"):
        text_table(tmp_path / "b.csv")


def test_a_utf8_bom_is_dropped(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbftext,label\r\ngood,pos\r\nbad,neg\r\n")
    data = text_table(tmp_path / "a.csv")
    assert data.inputs == ["good", "bad"] and data.classes == ["neg", "pos"]
    assert table_columns(tmp_path / "a.csv") == ["text", "label"]
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    assert text_table(tmp_path / "a.jsonl").labels.tolist() == [1, 0]


def test_malformed_and_non_object_jsonl_lines_name_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0\n')
    with pytest.raises(DataError, match=r"a\.jsonl, line 3: not valid JSON"):
        text_table(path)
    path.write_text('{"text": "good", "label": 1}\n["bad", 0]\n')
    with pytest.raises(DataError, match=r"a\.jsonl, line 2: expected a JSON object .*got a list"):
        text_table(path)


def test_a_json_array_file_reads_like_jsonl(tmp_path):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    assert text_table(tmp_path / "a.json").inputs == ["good", "bad"]
    assert table_columns(tmp_path / "a.json") == ["text", "label"]


def test_a_csv_record_spanning_lines_is_one_row_and_later_errors_name_their_line(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"two\nlines",pos\nbad,neg\nworse,\n')
    with pytest.raises(DataError, match=r"a\.csv, line 5: .*label"):
        text_table(tmp_path / "a.csv")


def test_duplicate_and_missing_headers_are_refused(tmp_path):
    (tmp_path / "a.csv").write_text("text,label,text\ngood,pos,x\n")
    with pytest.raises(DataError, match=r"a\.csv, line 1: column 'text' appears twice"):
        table_columns(tmp_path / "a.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: empty; expected a header row"):
        text_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"header\.csv: no rows"):
        text_table(tmp_path / "header.csv")


# --- images ------------------------------------------------------------------------------------
def test_truncated_and_undecodable_images_name_the_file(tmp_path):
    (tmp_path / "half.png").write_bytes(_png_bytes()[: len(_png_bytes()) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("half.png", "text.png"):
        with pytest.raises(DataError, match=rf"{name}: not a readable image"):
            load_image(tmp_path / name)
    with pytest.raises(DataError, match=r"gone\.png: no such image file"):
        load_image(tmp_path / "gone.png")
    for name in ("cat", "dog"):
        _png(tmp_path / "images" / name / "0.png")
    (tmp_path / "images" / "dog" / "1.png").write_bytes(_png_bytes()[:100])
    with pytest.raises(DataError, match=r"dog/1\.png: not a readable image"):
        image_folder(tmp_path / "images", 8)


def test_image_folders_need_two_classes_each_with_images(tmp_path):
    _png(tmp_path / "images" / "cat" / "0.png")
    with pytest.raises(DataError, match=r"images: 1 class folder \['cat'\]; expected one subfolder .* at least 2"):
        image_folder(tmp_path / "images", 8)
    (tmp_path / "images" / "dog").mkdir()
    (tmp_path / "images" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"images/dog: no images \(.*\.png.*\); every class folder needs"):
        image_folder(tmp_path / "images", 8)
    with pytest.raises(DataError, match=r"nowhere: no such folder"):
        image_folder(tmp_path / "nowhere", 8)


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    for name in ("cat", "dog"):
        _png(tmp_path / "images" / name / "0.png")
    (tmp_path / "images" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "images" / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork
    data = image_folder(tmp_path / "images", 8)
    assert data.classes == ["cat", "dog"] and data.inputs.shape == (2, 3, 8, 8)


# --- labels and texts --------------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ("text,label\ngood,pos\nbad,\n", r"a\.csv, line 3: the label \(column 'label'\) is missing or blank"),
    ("text,label\ngood,pos\nbad\n", r"a\.csv, line 3: the label \(column 'label'\) is missing or blank"),
    ("text,label\ngood,pos\n  ,neg\n", r"a\.csv, line 3: the text \(column 'text'\) is missing or blank"),
    ("text,label\ngood,pos\nbad,pos\n", r"a\.csv: every row has the label 'pos'; classification needs at least 2"),
])
def test_blank_labels_texts_and_one_class_are_refused_in_csv(tmp_path, content, message):
    (tmp_path / "a.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        text_table(tmp_path / "a.csv")


@pytest.mark.parametrize("row,message", [
    ({"text": "bad", "label": None}, r"line 2: the label \(column 'label'\) is missing or blank"),
    ({"text": "bad"}, r"line 2: the label \(column 'label'\) is missing or blank"),
    ({"text": "bad", "label": " "}, r"line 2: the label \(column 'label'\) is missing or blank"),
    ({"text": None, "label": 0}, r"line 2: the text \(column 'text'\) is missing or blank"),
    ({"text": ["bad"], "label": 0}, r"line 2: the text \(column 'text'\) is a list; expected a string"),
    ({"text": "bad", "label": {"id": 0}}, r"line 2: the label \(column 'label'\) is a dict; expected a class"),
])
def test_blank_or_odd_values_are_refused_in_jsonl(tmp_path, row, message):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "good", "label": 1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"a\.jsonl, {message}"):
        text_table(tmp_path / "a.jsonl")


def test_labels_may_be_names_or_integers_sorted_numerically(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\na,10\nb,2\nc,-1\nd,2\n")
    data = text_table(tmp_path / "a.csv")
    assert data.classes == ["-1", "2", "10"] and data.labels.tolist() == [2, 1, 0, 1]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                              for t, y in [("a", 3), ("b", "1"), ("c", 3)]))
    assert text_table(tmp_path / "b.jsonl").classes == ["1", "3"]
    (tmp_path / "c.csv").write_text("text,label\na,²\nb,1\n")  # a digit str.isdigit() accepts but int() refuses
    assert text_table(tmp_path / "c.csv").classes == ["1", "²"]


# --- columns at config time --------------------------------------------------------------------
def test_table_columns_reads_only_the_header(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"sentence,y\ngood,1\ncaf\xe9,0\n")  # a bad byte after the header
    assert table_columns(tmp_path / "a.csv") == ["sentence", "y"]
    (tmp_path / "a.jsonl").write_text('{"sentence": "good", "y": 1}\nnot json\n')
    assert table_columns(tmp_path / "a.jsonl") == ["sentence", "y"]
    with pytest.raises(DataError, match=r"gone\.csv: no such file"):
        table_columns(tmp_path / "gone.csv")


def test_a_wrong_column_is_reported_when_the_config_loads(tmp_path):
    (tmp_path / "a.csv").write_text("sentence,y\ngood,1\nbad,0\n")
    run = tmp_path / "run.yaml"
    run.write_text(f"data: {{name: text_table, path: {tmp_path / 'a.csv'}, text_column: sentence}}\n")
    with pytest.raises(ConfigError, match=r"data.label_column: .*a\.csv has no column 'label'; its columns are "
                                          r"\['sentence', 'y'\]"):
        load_config(run)
    config = load_config(run, {"data.label_column": "y"})
    assert config.data.label_column == "y"
    with pytest.raises(ConfigError, match=r"data.text_column: .*no column 'text'"):
        check_data_files(from_dict(TrainConfig, {"data": {"name": "hf", "path": str(tmp_path / "a.csv"),
                                                          "label_column": "y"}}))


def test_the_hf_config_check_skips_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"sentence": ["good", "bad"], "y": [1, 0]}).save_to_disk(str(tmp_path / "saved"))
    config = from_dict(TrainConfig, {"data": {"name": "hf", "path": str(tmp_path / "saved")}})
    check_data_files(config)
    assert config.data.path == str(tmp_path / "saved")  # columns are checked when the data loads


# --- the hf source -----------------------------------------------------------------------------
def test_hf_source_errors_are_data_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved: no column 'text'; columns are \['label', 'sentence'\]"):
        hf_dataset(tmp_path / "saved")
    datasets.Dataset.from_dict({"text": [], "label": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"empty: not a readable saved dataset .*empty or damaged"):
        hf_dataset(tmp_path / "empty")  # `datasets` cannot load a saved dataset of no rows
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"header\.csv: could not be read as csv .*empty, damaged"):
        hf_dataset(tmp_path / "header.csv")
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, None]}).save_to_disk(str(tmp_path / "blank"))
    with pytest.raises(DataError, match=r"blank, row 2: the label \(column 'label'\) is missing or blank"):
        hf_dataset(tmp_path / "blank")
    (tmp_path / "rows.txt").write_text("good\n")
    with pytest.raises(DataError, match=r"rows\.txt: expected a saved dataset folder \(save_to_disk\) or a \.csv"):
        hf_dataset(tmp_path / "rows.txt")
    with pytest.raises(DataError, match=r"gone\.csv: no such file or folder"):
        hf_dataset(tmp_path / "gone.csv")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a"], "label": [0]})}).save_to_disk(
        str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict: no split 'train'; its splits are \['test'\]"):
        hf_dataset(tmp_path / "dict")


def test_hf_csv_blank_label_and_bad_encoding(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "a.csv").write_text("text,label\ngood,1\nbad,\n")
    with pytest.raises(DataError, match=r"a\.csv, row 2: the label \(column 'label'\) is missing or blank"):
        hf_dataset(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_bytes(b"text,label\ngood,1\ncaf\xe9,0\n")
    with pytest.raises(DataError, match=r"b\.csv: .*could not be read"):
        hf_dataset(tmp_path / "b.csv")
