"""SPEC §4.3 files, against the local directory store and a real S3 server (moto)."""
from __future__ import annotations

import hashlib
import io
import random
import struct
import uuid
import zipfile
import zlib

import httpx

import services.files as files_service
from api.context import AppContext
from api.profile_app import build_profile_app
from storage.models import UserFile
from storage.objects import user_prefix
from tests.support.actors import asgi_client


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_bytes(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("notes.txt", "sleep 8h\n")
    return buf.getvalue()


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 64 + b"\xff\xd9"
CSV = b"date,metric,value\n2024-01-01,weight,80.5\n2024-01-02,weight,80.1\n2024-01-03,weight,79.9\n"
JSON = b'{"steps": [1200, 3400], "unit": "count"}'
XML = b'<?xml version="1.0" encoding="UTF-8"?>\n<records><r type="hr">62</r></records>\n'
TEXT = "Slept well, felt rested. Größe: 180 cm.\n".encode()
ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + b"\x02\x00\x3e\x00" + bytes(range(256)) * 4
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 44 + b"PE\x00\x00" + b"\x00" * 200
RANDOM = random.Random(20240101).randbytes(4096)
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
HTML = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"


async def download(caller, file_id) -> httpx.Response:
    """Download through the API; an S3 redirect is followed over real HTTP, without our token."""
    r = await caller.client.get("/downloadUserFile", params={"file_id": str(file_id)})
    if r.status_code == 307:
        async with httpx.AsyncClient(timeout=10) as plain:
            return await plain.get(r.headers["location"])
    return r


async def stored_keys(objects, user_id) -> list[str]:
    return await objects.list_keys(user_prefix(user_id))


# ------------------------------------------------------------------------------ happy path

async def test_upload_list_get_download_delete(alice, upload, objects, file_row, object_store_kind):
    content = PDF + b"%" + b"x" * 5000 + b"\n"
    r = await upload(alice, alice.user_id, content, "Blood work.pdf", "application/pdf")
    assert r.status_code == 201, r.text
    record = r.json()["data"]
    assert record["user_id"] == str(alice.user_id)
    assert record["filename"] == "Blood work.pdf"
    assert record["mime"] == "application/pdf"
    assert record["declared_mime"] == "application/pdf"
    assert record["size_bytes"] == len(content)
    assert record["sha256"] == sha256(content)
    assert record["uploaded_at"].endswith(("Z", "+00:00"))
    assert "s3_key" not in record

    row = await file_row(record["id"])
    assert row.s3_key == f"users/{alice.user_id}/{record['id']}.pdf"
    assert await objects.exists(row.s3_key)
    assert await objects.get(row.s3_key) == content

    r = await alice.client.get("/getUserFile", params={"file_id": record["id"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "data": record}

    r = await alice.client.get("/listUserFiles", params={"user_id": str(alice.user_id)})
    assert r.status_code == 200, r.text
    page = r.json()["data"]
    assert page["total"] == 1 and page["items"] == [record]
    assert page["limit"] == 50 and page["offset"] == 0

    r = await alice.client.get("/downloadUserFile", params={"file_id": record["id"]})
    if object_store_kind == "local":
        assert r.status_code == 200, r.text
        body = r.content
        assert r.headers["content-type"] == "application/pdf"
        assert r.headers["content-length"] == str(len(content))
        assert r.headers["x-content-type-options"] == "nosniff"
    else:
        assert r.status_code == 307, r.text
        location = r.headers["location"]
        assert "X-Amz-Signature=" in location and "X-Amz-Expires=300" in location
        # The presigned URL works on its own, over real HTTP, without our bearer token.
        async with httpx.AsyncClient(timeout=10) as plain:
            fetched = await plain.get(location)
        assert fetched.status_code == 200, fetched.text
        body = fetched.content
        assert fetched.headers["content-type"] == "application/pdf"
        r = fetched
    assert body == content and sha256(body) == record["sha256"]
    assert r.headers["content-disposition"].startswith('attachment; filename="Blood work.pdf"')
    assert "filename*=UTF-8''Blood%20work.pdf" in r.headers["content-disposition"]

    r = await alice.client.delete("/deleteUserFile", params={"file_id": record["id"]})
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert await file_row(record["id"]) is None
    assert not await objects.exists(row.s3_key)
    assert await stored_keys(objects, alice.user_id) == []
    for route in ("/getUserFile", "/downloadUserFile"):
        r = await alice.client.get(route, params={"file_id": record["id"]})
        assert r.status_code == 404, r.text
    r = await alice.client.delete("/deleteUserFile", params={"file_id": record["id"]})
    assert r.status_code == 404, r.text


ACCEPTED = {  # case: (content, declared type, filename, sniffed type, stored extension)
    "pdf": (PDF, "application/pdf", "a.pdf", "application/pdf", ".pdf"),
    "png": (png_bytes(), "image/png", "a.png", "image/png", ".png"),
    "jpeg": (JPEG, "image/jpeg", "a.jpeg", "image/jpeg", ".jpg"),
    "csv": (CSV, "text/csv", "a.csv", "text/csv", ".csv"),
    "json": (JSON, "application/json", "a.json", "application/json", ".json"),
    "xml": (XML, "application/xml", "a.xml", "application/xml", ".xml"),
    "text": (TEXT, "text/plain", "a.txt", "text/plain", ".txt"),
    "zip": (zip_bytes(), "application/zip", "a.zip", "application/zip", ".zip"),
    # Sniffed from the content, not taken from the declaration or the name.
    "png-declared-pdf": (png_bytes(), "application/pdf", "scan.pdf", "image/png", ".png"),
    "csv-declared-text": (CSV, "text/plain", "export.txt", "text/csv", ".csv"),
    "json-declared-binary": (JSON, "application/octet-stream", "data", "application/json", ".json"),
    "csv-bom-semicolons": (b"\xef\xbb\xbfname;age\nada;36\nbob;41\n", "", "s.csv", "text/csv", ".csv"),
    "utf16-text": ("line one\nline two\n".encode("utf-16"), "text/plain", "u.txt", "text/plain", ".txt"),
}
REFUSED = {  # case: (content, sniffed type)
    "elf": (ELF, "application/x-executable"),
    "exe": (EXE, "application/x-msdownload"),
    "random": (RANDOM, "application/octet-stream"),
    "svg": (SVG, "image/svg+xml"),
    "html": (HTML, "text/html"),
    "nul-text": (b"\x00\x01\x02binary with a text-ish tail, but NULs in front", "application/octet-stream"),
}


async def test_mime_is_sniffed_from_content(alice, upload, file_row):
    for case, (content, declared, name, sniffed, ext) in ACCEPTED.items():
        r = await upload(alice, alice.user_id, content, name, declared)
        assert r.status_code == 201, (case, r.text)
        data = r.json()["data"]
        assert data["mime"] == sniffed, case
        assert data["declared_mime"] == (declared or None), case
        assert data["sha256"] == sha256(content) and data["size_bytes"] == len(content), case
        assert (await file_row(data["id"])).s3_key.endswith(data["id"] + ext), case
        downloaded = await download(alice, data["id"])
        assert downloaded.content == content, case
        assert downloaded.headers["content-type"] == sniffed, case


async def test_disallowed_type_is_415_and_nothing_stored(alice, upload, objects, count_rows):
    for case, (content, sniffed) in REFUSED.items():
        r = await upload(alice, alice.user_id, content, "harmless.pdf", "application/pdf")
        assert r.status_code == 415, (case, r.text)
        body = r.json()
        assert body["status"] == "error" and body["error"]["code"] == "unsupported_media_type"
        assert body["error"]["details"]["sniffed_mime"] == sniffed, case
        assert body["error"]["details"]["declared_mime"] == "application/pdf"
    assert await count_rows(UserFile, UserFile.user_id == alice.user_id) == 0
    assert await stored_keys(objects, alice.user_id) == []


async def test_size_limit(alice, upload, objects, count_rows, profile_ctx):
    limit = profile_ctx.settings.max_upload_bytes
    exact = b"a" * (limit - 1) + b"\n"
    r = await upload(alice, alice.user_id, exact, "exact.txt", "text/plain")
    assert r.status_code == 201, r.text
    assert r.json()["data"]["size_bytes"] == limit

    # One byte over: the body passes the route's body limit; the file check refuses it.
    r = await upload(alice, alice.user_id, exact + b"b", "over.txt", "text/plain")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    # Far over: refused by the body limit before the route runs.
    r = await upload(alice, alice.user_id, b"c" * (limit * 4), "huge.txt", "text/plain")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"

    assert await count_rows(UserFile, UserFile.user_id == alice.user_id) == 1
    assert len(await stored_keys(objects, alice.user_id)) == 1


async def test_upload_route_allows_more_than_the_default_body_limit(profile_ctx, alice, upload):
    settings = profile_ctx.settings.model_copy(update={"max_upload_bytes": 3 * 1024 * 1024})
    ctx = AppContext.from_settings("profile", settings)
    try:
        app = build_profile_app(settings, ctx=ctx)
        client = asgi_client(app, alice.token)
        content = (b"0123456789abcdef" * 65536 + b"\n") * 2  # ~2 MiB of text
        r = await client.post("/uploadUserFile", params={"user_id": str(alice.user_id)},
                              files={"upload": ("big.txt", content, "text/plain")})
        assert r.status_code == 201, r.text
        assert r.json()["data"]["sha256"] == sha256(content)
        assert await ctx.objects.get(f"users/{alice.user_id}/{r.json()['data']['id']}.txt") == content
        # Every other route keeps the 1 MiB default.
        r = await client.post("/upsertMeasurement", content=b"{" + b" " * (1024 * 1024 + 10) + b"}",
                              headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        await client.aclose()
    finally:
        await ctx.aclose()


async def test_empty_file_is_422_and_nothing_stored(alice, upload, objects, count_rows):
    r = await upload(alice, alice.user_id, b"", "empty.txt", "text/plain")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"][0]["loc"] == ["body", "upload"]
    assert await count_rows(UserFile, UserFile.user_id == alice.user_id) == 0
    assert await stored_keys(objects, alice.user_id) == []


async def test_filename_is_sanitized(alice, upload):
    # Built by hand: httpx would percent-encode the control character itself.
    body = (b'--b0undary\r\nContent-Disposition: form-data; name="upload"; '
            b'filename="..\\..\\etc/pa\x07ss<wd>.txt"\r\nContent-Type: text/plain\r\n\r\n'
            + TEXT + b"\r\n--b0undary--\r\n")
    r = await alice.client.post("/uploadUserFile", params={"user_id": str(alice.user_id)},
                                content=body,
                                headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 201, r.text
    assert r.json()["data"]["filename"] == "passwd.txt"
    r = await upload(alice, alice.user_id, TEXT, "../../etc/passwd.txt", "text/plain")
    assert r.json()["data"]["filename"] == "passwd.txt"
    r = await upload(alice, alice.user_id, TEXT, "..", "text/plain")
    assert r.status_code == 201, r.text
    assert r.json()["data"]["filename"] == "upload.txt"
    long_name = "ä" * 300 + ".csv"
    r = await upload(alice, alice.user_id, CSV, long_name, "text/csv")
    assert r.status_code == 201, r.text
    name = r.json()["data"]["filename"]
    assert len(name) == 255 and name.endswith(".csv")
    r = await download(alice, r.json()["data"]["id"])
    assert r.status_code == 200
    assert r.headers["content-disposition"].startswith('attachment; filename="')


async def test_list_is_newest_first_and_paginated(alice, bob, upload):
    ids = []
    for i in range(3):
        r = await upload(alice, alice.user_id, f"note {i}\n".encode(), f"n{i}.txt", "text/plain")
        assert r.status_code == 201, r.text
        ids.append(r.json()["data"]["id"])
    r = await upload(bob, bob.user_id, b"bob's\n", "b.txt", "text/plain")
    assert r.status_code == 201
    r = await alice.client.get("/listUserFiles", params={"user_id": str(alice.user_id), "limit": 2})
    page = r.json()["data"]
    assert page["total"] == 3 and [i["id"] for i in page["items"]] == ids[::-1][:2]
    r = await alice.client.get("/listUserFiles",
                               params={"user_id": str(alice.user_id), "limit": 2, "offset": 2})
    assert [i["id"] for i in r.json()["data"]["items"]] == ids[:1]
    for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}):
        r = await alice.client.get("/listUserFiles", params={"user_id": str(alice.user_id), **bad})
        assert r.status_code == 422, r.text


# ------------------------------------------------------------------------------ auth

async def test_requires_a_token(anonymous, alice, upload):
    r = await upload(alice, alice.user_id, TEXT, "a.txt", "text/plain")
    file_id = r.json()["data"]["id"]
    calls = [
        anonymous.post("/uploadUserFile", params={"user_id": str(alice.user_id)},
                       files={"upload": ("a.txt", TEXT, "text/plain")}),
        anonymous.get("/listUserFiles", params={"user_id": str(alice.user_id)}),
        anonymous.get("/getUserFile", params={"file_id": file_id}),
        anonymous.get("/downloadUserFile", params={"file_id": file_id}),
        anonymous.delete("/deleteUserFile", params={"file_id": file_id}),
    ]
    for call in calls:
        r = await call
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"


async def test_users_cannot_touch_each_others_files(alice, bob, upload, objects, file_row,
                                                    count_rows):
    r = await upload(bob, bob.user_id, CSV, "bob.csv", "text/csv")
    bob_file = r.json()["data"]["id"]
    for route in ("/getUserFile", "/downloadUserFile"):
        r = await alice.client.get(route, params={"file_id": bob_file})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
    r = await alice.client.delete("/deleteUserFile", params={"file_id": bob_file})
    assert r.status_code == 404, r.text
    r = await alice.client.get("/listUserFiles", params={"user_id": str(bob.user_id)})
    assert r.status_code == 403, r.text
    r = await upload(alice, bob.user_id, TEXT, "planted.txt", "text/plain")
    assert r.status_code == 403, r.text
    assert await count_rows(UserFile, UserFile.user_id == bob.user_id) == 1
    assert await objects.exists((await file_row(bob_file)).s3_key)


async def test_service_acts_on_any_user(service, bob, upload, objects, file_row):
    r = await upload(service, bob.user_id, JSON, "from-ui.json", "application/json")
    assert r.status_code == 201, r.text
    file_id = r.json()["data"]["id"]
    assert r.json()["data"]["user_id"] == str(bob.user_id)
    r = await service.client.get("/listUserFiles", params={"user_id": str(bob.user_id)})
    assert r.json()["data"]["total"] == 1
    r = await service.client.get("/getUserFile", params={"file_id": file_id})
    assert r.status_code == 200
    r = await download(service, file_id)
    assert r.status_code == 200 and r.content == JSON
    key = (await file_row(file_id)).s3_key
    r = await service.client.delete("/deleteUserFile", params={"file_id": file_id})
    assert r.status_code == 204
    assert not await objects.exists(key)
    # bob sees his file gone too
    r = await bob.client.get("/listUserFiles", params={"user_id": str(bob.user_id)})
    assert r.json()["data"]["total"] == 0


# ------------------------------------------------------------------------------ validation

async def test_malformed_and_unknown_ids(alice, service, upload, objects):
    for route in ("/getUserFile", "/downloadUserFile"):
        r = await alice.client.get(route, params={"file_id": "not-a-uuid"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["details"][0]["loc"] == ["query", "file_id"]
        r = await alice.client.get(route, params={"file_id": str(uuid.uuid4())})
        assert r.status_code == 404, r.text
    r = await alice.client.delete("/deleteUserFile", params={"file_id": "123"})
    assert r.status_code == 422, r.text
    r = await alice.client.delete("/deleteUserFile", params={"file_id": str(uuid.uuid4())})
    assert r.status_code == 404, r.text
    r = await alice.client.get("/listUserFiles", params={"user_id": "nope"})
    assert r.status_code == 422, r.text
    r = await upload(alice, "nope", TEXT)
    assert r.status_code == 422, r.text
    ghost = uuid.uuid4()
    r = await upload(service, ghost, TEXT, "a.txt", "text/plain")
    assert r.status_code == 404, r.text
    assert await stored_keys(objects, ghost) == []
    r = await service.client.get("/listUserFiles", params={"user_id": str(ghost)})
    assert r.status_code == 404, r.text


async def test_malformed_upload_bodies(alice, objects):
    params = {"user_id": str(alice.user_id)}
    r = await alice.client.post("/uploadUserFile", params=params)
    assert r.status_code == 422, r.text
    r = await alice.client.post("/uploadUserFile", params=params, files={"other": ("a.txt", b"x")})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"][0]["loc"] == ["body", "upload"]
    r = await alice.client.post("/uploadUserFile", params=params, data={"upload": "just text"})
    assert r.status_code == 422, r.text
    r = await alice.client.post("/uploadUserFile", params=params,
                                files=[("upload", ("a.txt", b"one\n")), ("upload", ("b.txt", b"two\n"))])
    assert r.status_code == 400, r.text  # one file per upload
    r = await alice.client.post("/uploadUserFile", params=params, content=b"--x\r\ngarbage",
                                headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code in (400, 422), r.text
    r = await alice.client.post("/uploadUserFile", params=params, json={"upload": "x"})
    assert r.status_code == 422, r.text
    assert await stored_keys(objects, alice.user_id) == []


async def test_failed_database_write_leaves_no_object(alice, upload, objects, count_rows,
                                                      monkeypatch):
    real = files_service.UserFile

    def orphan_row(**kw):  # a row the database refuses (unknown user: foreign key violation)
        return real(**{**kw, "user_id": uuid.uuid4()})

    monkeypatch.setattr(files_service, "UserFile", orphan_row)
    r = await upload(alice, alice.user_id, TEXT, "a.txt", "text/plain")
    assert r.status_code >= 500, r.text
    assert r.json()["status"] == "error"
    assert await stored_keys(objects, alice.user_id) == []
    assert await count_rows(UserFile) == 0


async def test_missing_object_is_404_not_500(alice, upload, objects, file_row):
    r = await upload(alice, alice.user_id, TEXT, "a.txt", "text/plain")
    file_id = r.json()["data"]["id"]
    await objects.delete((await file_row(file_id)).s3_key)
    r = await alice.client.get("/downloadUserFile", params={"file_id": file_id})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "object_not_found"
    r = await alice.client.delete("/deleteUserFile", params={"file_id": file_id})
    assert r.status_code == 204, r.text


async def test_streamed_body_over_the_limit_is_413(alice, objects, count_rows, profile_ctx):
    """Without a Content-Length (chunked), the body limit still applies while reading."""
    limit = profile_ctx.settings.max_upload_bytes
    head = (b'--b0undary\r\nContent-Disposition: form-data; name="upload"; filename="a.txt"\r\n'
            b"Content-Type: text/plain\r\n\r\n")

    async def body():
        yield head
        for _ in range(limit // 8192 * 4):
            yield b"z" * 8192
        yield b"\r\n--b0undary--\r\n"

    r = await alice.client.post("/uploadUserFile", params={"user_id": str(alice.user_id)},
                                content=body(),
                                headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert await count_rows(UserFile, UserFile.user_id == alice.user_id) == 0
    assert await stored_keys(objects, alice.user_id) == []
