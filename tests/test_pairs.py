"""vtn_tf.io.pairs: pairs files as spreadsheets write them, bad ones on one line, shards."""

import os

import pytest

from vtn_tf.io import InputError, pairs


def write(tmp_path, payload, name="pairs.csv"):
    path = tmp_path / name
    path.write_bytes(payload if isinstance(payload, bytes) else payload.encode("utf-8"))
    return path


def test_excel_csv_utf8_with_bom_crlf_quotes_blank_and_comment_lines(tmp_path):
    # What Excel's "CSV UTF-8" writes: a byte-order mark, CRLF, quotes around cells holding
    # the separator, ",,," for an empty row; plus a comment line and columns in another order.
    text = ("\ufeffOut,moving_labels,Fixed,Moving,subject\r\n"
            "# the first cohort\r\n"
            'reg/s1,"labels/s1 a.nii.gz;labels/s1 b.nii.gz",fixed.nii.gz,"scans/s1, rescan.nii.gz",s1\r\n'
            ",,,,\r\n"
            "\r\n"
            'reg/s2, ,/data/fixed.nii.gz, "my scans/s2.nii.gz",s2\r\n')
    rows = pairs.read_pairs(write(tmp_path, text))
    assert [row["line"] for row in rows] == [3, 6] and [row["index"] for row in rows] == [0, 1]
    assert rows[0]["fixed"] == str(tmp_path / "fixed.nii.gz")
    assert rows[0]["moving"] == str(tmp_path / "scans" / "s1, rescan.nii.gz")
    assert rows[0]["out"] == str(tmp_path / "reg" / "s1")
    assert rows[0]["moving_labels"] == [str(tmp_path / "labels" / "s1 a.nii.gz"),
                                        str(tmp_path / "labels" / "s1 b.nii.gz")]
    assert rows[1]["fixed"] == "/data/fixed.nii.gz" and rows[1]["moving_labels"] == []
    assert rows[1]["moving"] == str(tmp_path / "my scans" / "s2.nii.gz")


@pytest.mark.parametrize("separator", [";", "\t"])
def test_semicolon_and_tab_separated_files(tmp_path, separator):
    text = separator.join(["fixed", "moving", "out", "moving_labels"]) + "\n" + separator.join(
        ["a.nii.gz", "b.nii.gz", "o", '"l1.nii.gz;l2.nii.gz"']) + "\n"
    (row,) = pairs.read_pairs(write(tmp_path, text))
    assert row["moving"] == str(tmp_path / "b.nii.gz") and len(row["moving_labels"]) == 2


def test_the_current_plain_format_reads_as_before(tmp_path):
    rows = pairs.read_pairs(write(tmp_path, "fixed,moving,out\na.nii.gz,b.nii.gz,o1\n/x/c.nii.gz,d.nii.gz,o2"))
    assert [(r["fixed"], r["line"]) for r in rows] == [(str(tmp_path / "a.nii.gz"), 2), ("/x/c.nii.gz", 3)]


BAD = {
    "missing": (None, r"pairs file .*absent.csv does not exist"),
    "empty": (b"", r"pairs.csv is empty"),
    "header only": ("fixed,moving,out\r\n\r\n# nothing\r\n", r"pairs.csv holds no pairs"),
    "no out column": ("fixed,moving\na,b\n", r"pairs.csv, line 1: no column 'out' .*it reads 'fixed,moving'"),
    "misspelt column": ("fixed,moving,out,moving_label\na,b,c,d\n",
                        r"line 1: unknown column 'moving_label'; did you mean 'moving_labels'\?"),
    "column twice": ("fixed,moving,out,Fixed\na,b,c,d\n", r"line 1: the column 'fixed' appears twice"),
    "unquoted comma": ("# scans\nfixed,moving,out\na.nii.gz,scans/s1, rescan.nii.gz,o\n",
                       r"pairs.csv, line 3: 4 cells, but the header has 3 \(quote a path"),
    "empty cell": ("fixed,moving,out\na,b,c\na,,c\n", r"pairs.csv, line 3: the 'moving' cell is empty"),
    "short row": ("fixed,moving,out\na,b\n", r"line 2: the 'out' cell is empty"),
    "open quote": ('fixed,moving,out\na,"b,c\n', r"pairs.csv, line \d: not valid CSV"),
    "latin-1": ("fixed,moving,out\nscans/é.nii.gz,b,c\n".encode("latin-1"),
                r"pairs.csv, line 2: not UTF-8 text \(byte 0xe9\); save the file as CSV UTF-8"),
    "utf-16": ("fixed,moving,out\n".encode("utf-16"), r"pairs.csv is UTF-16 text; save it as CSV UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pairs_files_are_refused_on_one_line(tmp_path, case):
    payload, message = BAD[case]
    path = tmp_path / "absent.csv" if payload is None else write(tmp_path, payload)
    with pytest.raises(InputError, match=message) as raised:
        pairs.read_pairs(path)
    assert "\n" not in str(raised.value)


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="is a folder; a CSV file is required"):
        pairs.read_pairs(tmp_path)


def test_rows_sharing_an_output_folder_are_found(tmp_path):
    rows = pairs.read_pairs(write(tmp_path, "fixed,moving,out\na,b,o\nc,d,x/../o\ne,f,p\n"))
    assert pairs.shared_outputs(rows) == {3: 2}


def test_shards_are_disjoint_cover_the_file_and_stay_put_when_rows_are_appended(tmp_path):
    lines = "".join(f"f{i}.nii.gz,m{i}.nii.gz,o{i}\n" for i in range(11))
    rows = pairs.read_pairs(write(tmp_path, "fixed,moving,out\n# c\n" + lines))
    parts = [pairs.shard(rows, k, 3) for k in range(3)]
    outs = [row["out"] for part in parts for row in part]
    assert sorted(outs) == sorted(row["out"] for row in rows) and len(set(outs)) == len(rows)
    assert [len(part) for part in parts] == [4, 4, 3]
    more = pairs.read_pairs(write(tmp_path, "fixed,moving,out\n# c\n" + lines + "f,m,new\n"))
    for k in range(3):
        assert pairs.shard(more, k, 3)[:len(parts[k])] == parts[k]


@pytest.mark.parametrize("text,message", [("1/1", "0 <= K < N"), ("4/4", "0 <= K < N"), ("a/4", "takes K/N"),
                                          ("2", "takes K/N"), ("0/0", "0 <= K < N")])
def test_bad_shards_are_refused(text, message):
    with pytest.raises(InputError, match=message):
        pairs.parse_shard(text)
    assert pairs.parse_shard("3/4") == (3, 4)


def test_home_folder_paths_are_expanded(tmp_path):
    (row,) = pairs.read_pairs(write(tmp_path, "fixed,moving,out\n~/a.nii.gz,b,c\n"))
    assert row["fixed"] == os.path.join(os.path.expanduser("~"), "a.nii.gz")
