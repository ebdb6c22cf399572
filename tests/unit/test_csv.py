"""CSV without a database: bad files refused clearly, formula injection defused, size limit and header variants."""

from __future__ import annotations

import pytest

from kana.imports import csvfile


@pytest.mark.parametrize("value", ["=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)", "\tTab", "\rCR",
                                   "'quoted", "''=x", "plain", "a=b"])
def test_protect_roundtrips_and_defuses_formulas(value):
    cell = csvfile.protect(value)
    assert cell[0] not in "=+-@\t\r"
    assert csvfile.unprotect(cell) == value


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("user_id,name\nu1,Zoë\n".encode("latin-1"), "not UTF-8 encoded (byte 0xeb on line 2)"),
        ("user_id\nu1\n".encode("utf-16"), "UTF-16"),
        (b"PK\x03\x04\x14\x00\x00\x00", "spreadsheet workbook"),
        (b"user_id\nu1\x00\n", "not a CSV text file (line 2 contains a NUL byte)"),
        (b"", "The file is empty"),
        (b" \n\n", "The file is empty"),
        (b"u1,ann@example.com\nu2,bob@example.com\n", "Missing header: line 1 must name the columns"),
        (b"user_id,email,tier\nu1,a@example.com,pro\n", "Unknown column 'tier' in the header (line 1)"),
        (b"user_id,email,email\n", "Column 'email' appears twice"),
        (b"user_id;email\nu1;a@example.com\n", "separated by ';'"),
    ],
)
def test_bad_files_are_refused_with_a_clear_message(data, message):
    with pytest.raises(csvfile.CsvError) as info:
        csvfile.parse(data)
    assert message in info.value.message


def test_size_limit_and_header_variants():
    with pytest.raises(csvfile.CsvError, match="limit is 1 MB"):
        csvfile.parse(b"user_id\n" + b"x\n" * (1024 * 1024), max_bytes=1024 * 1024)
    parsed = csvfile.parse("\ufeffUser ID,E-mail\r\nu1,a@example.com\r\n".encode())  # BOM, spreadsheet-style names
    assert parsed.columns == ["user_id", "email"] and parsed.total == 1


