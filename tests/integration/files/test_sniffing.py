"""Content sniffing and name handling of services/files.py (pure functions, no services)."""
from __future__ import annotations

import hashlib
import io
import json

import pytest

from core.settings import DEFAULT_ALLOWED_MIME, Settings
from services.files import (content_disposition, is_allowed, normalize_declared_mime,
                            sanitize_filename, scan, sniff_bytes)


@pytest.mark.parametrize("content,expected", [
    (b"%PDF-1.7\n...", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 32, "image/png"),
    (b"\xff\xd8\xff\xdb" + b"\x00" * 32, "image/jpeg"),
    (b"PK\x03\x04" + b"\x00" * 40, "application/zip"),
    (b"\x7fELF\x02\x01\x01" + b"\x00" * 60, "application/x-executable"),
    (b"a,b,c\n1,2,3\n4,5,6\n", "text/csv"),
    (b"a\tb\n1\t2\n", "text/csv"),
    (b"a,b\n1,2,3\n", "text/plain"),                  # ragged: not CSV
    (b"just one line, with a comma\n", "text/plain"),
    (b"hello\n", "text/plain"),
    (b"  [1, 2, 3]  ", "application/json"),
    (b'{"a": {"b": [true, null]}}', "application/json"),
    (b"42", "text/plain"),                            # scalars are not documents
    (b'{"a": 1', "text/plain"),                       # broken JSON is just text
    (b"[" * 100000 + b"]" * 100000, "text/plain"),    # too deep to be a document we accept
    (b"<a><b/></a>", "application/xml"),
    (b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e 'boom'>]><x>&e;</x>", "text/plain"),
    (b"<data><x></data>", "text/plain"),              # not well-formed, not HTML
    (b"<a href=x>link", "text/html"),
    (b"<html><body>x", "text/html"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
    (b"caf\xc3\xa9\n", "text/plain"),
    (b"caf\xe9\n", "application/octet-stream"),       # not UTF-8
    (b"line\x1b[31mred\n", "application/octet-stream"),  # terminal escapes are not text we keep
    (b"", ""),
])
def test_sniff(content, expected):
    assert sniff_bytes(content) == expected


def test_scan_hashes_streams_and_stops_at_the_limit():
    data = b"x" * (3 * 1024 * 1024 + 5)
    result = scan(io.BytesIO(data), max_bytes=len(data))
    assert result.size == len(data) and not result.too_large
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    over = scan(io.BytesIO(data), max_bytes=len(data) - 1)
    assert over.too_large


def test_large_json_is_recognised_without_a_full_parse():
    big = json.dumps([{"i": i, "note": "x" * 50} for i in range(200_000)]).encode()
    assert len(big) > 8 * 1024 * 1024
    assert sniff_bytes(big) == "application/json"


def test_allowed_list():
    allowed = Settings().allowed_mime_set()
    assert allowed == frozenset(DEFAULT_ALLOWED_MIME.split(","))
    assert is_allowed("application/xml", frozenset({"text/xml"}))
    assert not is_allowed("text/html", allowed)
    assert not is_allowed("image/svg+xml", allowed)


@pytest.mark.parametrize("raw,expected", [
    ("report.pdf", "report.pdf"),
    ("C:\\Users\\me\\report.pdf", "report.pdf"),
    ("../../etc/passwd", "passwd"),
    ("  ..hidden  ", "hidden"),
    ("a\u0000b\u202ec.txt", "abc.txt"),
    ('what?*<>|":.csv', "what.csv"),
    ("", "upload.pdf"),
    (None, "upload.pdf"),
    ("e\u0301.txt", "\u00e9.txt"),                     # NFC
])
def test_sanitize_filename(raw, expected):
    assert sanitize_filename(raw, "application/pdf") == expected


def test_declared_mime_and_disposition():
    assert normalize_declared_mime("Text/CSV; charset=utf-8") == "text/csv"
    assert normalize_declared_mime("nonsense") is None
    assert normalize_declared_mime("a/b\r\nX-Evil: 1") is None
    assert normalize_declared_mime(None) is None
    header = content_disposition('Blutwerte "März".pdf')
    assert header == ("attachment; filename=\"Blutwerte _Marz_.pdf\"; "
                      "filename*=UTF-8''Blutwerte%20%22M%C3%A4rz%22.pdf")
