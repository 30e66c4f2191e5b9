"""The customer database: CSV / YAML import with normalised numbers and a report of rejected rows
(``mailgw customers import`` run as the real command), and lookups by the number a PBX shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgw.cli import main
from mailgw.customers import number_key, parse_customers, read_entries
from mailgw.store import Store


@pytest.mark.parametrize("written", ["03-1234-5678", "0312345678", "+81312345678", "+81 3 1234 5678",
                                     "０３－１２３４－５６７８", "(03) 1234-5678"])
def test_every_way_of_writing_a_number_gives_one_key(written: str) -> None:
    assert number_key(written, "JP") == "+81312345678"


@pytest.mark.parametrize("written", ["", "abc", "12", "2000", "03-1234-5678-9999-1234"])
def test_what_is_not_a_phone_number_has_no_key(written: str) -> None:
    assert number_key(written, "JP", strict=True) is None


def test_csv_rows_that_cannot_be_used_are_rejected_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "customers.csv"
    path.write_text(
        "\ufeffname,contact,phone,fax,owner_address\n"
        "XX Corp,Yamada Taro,03-1234-5678;090-1111-2222,,tanaka@b.example\n"
        ",Nobody,03-9999-0000,,\n"
        "Bad Phone,,12ab,,\n"
        "Bad Owner,,03-2222-3333,,not-an-address\n"
        "Same Number,,+81312345678,,\n"
        "Fax Only,,,0455556666,\n"
        "\n"
        "Too Many,,03-4444-5555,,,extra\n", encoding="utf-8")
    result = parse_customers(read_entries(path), "JP")
    assert [c.name for c in result.customers] == ["XX Corp", "Fax Only"]
    assert result.customers[0].numbers == ("+81312345678", "+819011112222")
    assert result.customers[1].numbers == ("+81455556666",)
    assert [(r.where, r.reason) for r in result.rejected] == [
        ("line 3", "name is missing"),
        ("line 4", "phone '12ab' is not a phone number"),
        ("line 5", "owner_address 'not-an-address' is not a mail address"),
        ("line 6", "number +81312345678 is already the number of XX Corp (line 2)"),
        ("line 9", "more cells than the header has columns"),
    ]


def test_yaml_entries_and_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "customers.yaml"
    path.write_text("customers:\n"
                    "  - {name: ＹＹ商事, phone: '+81 6-1111-2222', owner_address: Yamada@B.example, language: ja}\n"
                    "  - {name: Typo Inc, phone: 0311112222, telephone: 1}\n"
                    "  - just a string\n", encoding="utf-8")
    result = parse_customers(read_entries(path), "JP")
    assert [(c.name, c.owner_address, c.language) for c in result.customers] == [
        ("ＹＹ商事", "yamada@b.example", "ja")]
    assert [r.where for r in result.rejected] == ["entry 2", "entry 3"]
    assert result.rejected[0].reason.startswith("unknown field 'telephone'")


def test_a_file_that_is_no_customer_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(b"\xff\xfe n\x00a\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_entries(path)
    path.write_text("phone,fax\n0312345678,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="first line must name the columns"):
        read_entries(path)


async def test_customers_import_command_reports_rejected_rows_and_stores_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "customers.csv"
    path.write_text("name,phone,owner_address\nXX Corp,03-1234-5678,tanaka@b.example\nBad,12ab,\n", encoding="utf-8")
    data = tmp_path / "var"
    code = await asyncio_to_thread(main, ["customers", "import", str(path), "--data", str(data)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"imported 1 customer(s) from {path}; rejected 1 row(s)" in out
    assert f"{path}: line 3: phone '12ab' is not a phone number" in out
    store = Store(data / "mailgw.sqlite3")
    await store.open()
    try:
        customer = await store.customer(number="+81312345678")
        assert customer is not None and customer["name"] == "XX Corp" and customer["owner_address"] == "tanaka@b.example"
        assert await store.customer(number="+81399999999") is None
    finally:
        await store.close()


async def asyncio_to_thread(fn, *args):  # noqa: ANN001, ANN201 - the command runs its own event loop
    import asyncio

    return await asyncio.to_thread(fn, *args)
