"""User files (SPEC §4.3): content sniffing, hashing, storage and metadata rows.

An upload is checked completely before anything is stored: size (413), emptiness (422) and
the MIME type sniffed from the content (415). The object is then written to the store and the
`userfile` row committed; if the database write fails the object is removed again, so a failed
upload leaves neither a row nor an object behind.
"""
from __future__ import annotations

import asyncio
import codecs
import csv
import hashlib
import io
import json
import logging
import mimetypes
import re
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import quote
from xml.parsers import expat

import filetype
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import NotFound, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from core.principal import Principal
from services.users import get_user
from storage.models import UserFile
from storage.objects import ObjectStore, user_prefix

log = logging.getLogger("sma.files")

READ_CHUNK = 1024 * 1024
MAGIC_BYTES = 8192               # what `filetype` looks at
TEXT_SAMPLE_CHARS = 64 * 1024    # what the CSV check looks at
JSON_FULL_PARSE_LIMIT = 8 * 1024 * 1024
MAX_FILENAME = 255

OCTET_STREAM = "application/octet-stream"
EXTENSIONS = {
    "application/pdf": ".pdf", "image/png": ".png", "image/jpeg": ".jpg", "text/csv": ".csv",
    "application/json": ".json", "application/xml": ".xml", "text/xml": ".xml",
    "text/plain": ".txt", "application/zip": ".zip",
}
# Sniffing says application/xml; a deployment that allows either spelling accepts XML.
MIME_ALIASES = {"application/xml": ("text/xml",), "text/xml": ("application/xml",)}
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f]")
_MIME_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+\-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+\-]{0,126}$")
# WHATWG MIME sniffing: content starting like this is HTML, which we never accept.
_HTML_PREFIXES = ("<!doctype html", "<html", "<head", "<script", "<iframe", "<h1", "<div",
                  "<font", "<table", "<a", "<style", "<title", "<b", "<body", "<br", "<p",
                  "<!--", "<svg")


# --------------------------------------------------------------------------------- sniffing

class _TextSniffer:
    """Decides, while the bytes stream past, whether they are text and which kind."""

    def __init__(self, head: bytes):
        if head.startswith(codecs.BOM_UTF8):
            encoding = "utf-8-sig"
        elif head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            encoding = "utf-16"
        else:
            encoding = "utf-8"
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self.is_text = True
        self.sample: list[str] = []
        self.sample_chars = 0
        self.truncated = False
        self.first = ""           # first non-whitespace character
        self.last = ""            # last non-whitespace character
        self._json: list[str] | None = None
        self._json_chars = 0
        self._json_big = False
        self._xml: expat.XMLParserType | None = None
        self.xml_ok = False
        self.xml_root: str | None = None

    # XML: well-formedness by a streaming parse; DTD entity declarations are refused
    # (no entity expansion tricks), which makes such a document "not XML".
    def _start_xml(self) -> None:
        parser = expat.ParserCreate(encoding="UTF-8")
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

        def refuse(*_args):
            raise ValueError("entity declarations are not accepted")

        def start(name, _attrs):
            if self.xml_root is None:
                self.xml_root = name.rsplit(":", 1)[-1].lower()

        parser.EntityDeclHandler = refuse
        parser.StartElementHandler = start
        self._xml = parser

    def _feed_xml(self, text: str, final: bool) -> None:
        if self._xml is None:
            return
        try:
            self._xml.Parse(text.encode("utf-8"), final)
            if final:
                self.xml_ok = self.xml_root is not None
        except (expat.ExpatError, ValueError, RecursionError):
            self._xml = None

    def feed(self, chunk: bytes, final: bool = False) -> None:
        if not self.is_text:
            return
        try:
            text = self._decoder.decode(chunk, final)
        except UnicodeDecodeError:
            self.is_text = False
            return
        if _CONTROL.search(text):
            self.is_text = False
            return
        stripped = text.strip()
        if stripped:
            if not self.first:
                self.first = stripped[0]
                if self.first == "<":
                    self._start_xml()
                elif self.first in "{[":
                    self._json = []
            self.last = stripped[-1]
        if self.sample_chars < TEXT_SAMPLE_CHARS:
            piece = text[: TEXT_SAMPLE_CHARS - self.sample_chars]
            self.sample.append(piece)
            self.sample_chars += len(piece)
            self.truncated = self.truncated or len(piece) < len(text)
        else:
            self.truncated = self.truncated or bool(text)
        if self._json is not None:
            self._json_chars += len(text)
            if self._json_chars > JSON_FULL_PARSE_LIMIT:
                self._json = None
                self._json_big = True
            else:
                self._json.append(text)
        self._feed_xml(text, final)

    def _is_json(self) -> bool:
        if self.first not in ("{", "["):
            return False
        if self._json is None:  # too large to parse whole: the brackets must at least match
            return self._json_big and {"{": "}", "[": "]"}[self.first] == self.last
        try:
            value = json.loads("".join(self._json))
        except (ValueError, RecursionError):
            return False
        return isinstance(value, (dict, list))

    def _is_csv(self, text: str) -> bool:
        lines = text.splitlines()
        if self.truncated and lines:
            lines = lines[:-1]  # the sample may end mid-line
        lines = [line for line in lines if line.strip()]
        if len(lines) < 2:
            return False
        sample = "\n".join(lines)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
            widths = {len(row) for row in csv.reader(io.StringIO(sample), dialect) if row}
        except (csv.Error, ValueError):
            return False
        return len(widths) == 1 and widths.pop() >= 2

    def verdict(self) -> str | None:
        if not self.is_text:
            return None
        if self._is_json():
            return "application/json"
        sample = "".join(self.sample)
        if self.xml_ok:
            if self.xml_root == "svg":
                return "image/svg+xml"
            if self.xml_root == "html":
                return "text/html"
            return "application/xml"
        head = sample.lstrip().lower()
        for prefix in _HTML_PREFIXES:
            if head.startswith(prefix) and head[len(prefix):len(prefix) + 1] in (" ", ">", ""):
                return "text/html"
        if self._is_csv(sample):
            return "text/csv"
        return "text/plain"


@dataclass
class ScanResult:
    size: int
    sha256: str
    mime: str
    too_large: bool = False


def scan(stream: BinaryIO, max_bytes: int) -> ScanResult:
    """One pass over the upload: size, SHA-256 and the MIME type sniffed from the content.

    Stops as soon as the size passes `max_bytes` (then `too_large` is set). Blocking: run it
    in a thread.
    """
    digest = hashlib.sha256()
    size = 0
    head = b""
    text: _TextSniffer | None = None
    while chunk := stream.read(READ_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            return ScanResult(size=size, sha256="", mime="", too_large=True)
        digest.update(chunk)
        if len(head) < MAGIC_BYTES:
            head += chunk[: MAGIC_BYTES - len(head)]
        if text is None:
            text = _TextSniffer(head)
        text.feed(chunk)
    if size == 0:
        return ScanResult(size=0, sha256=digest.hexdigest(), mime="")
    kind = filetype.guess(head)
    if kind is not None:
        mime = kind.mime
    else:
        text.feed(b"", final=True)
        mime = text.verdict() or OCTET_STREAM
    return ScanResult(size=size, sha256=digest.hexdigest(), mime=mime)


def sniff_bytes(data: bytes) -> str:
    """The sniffed MIME type of an in-memory payload ('' when empty)."""
    return scan(io.BytesIO(data), max_bytes=len(data) + 1).mime


def is_allowed(mime: str, allowed: frozenset[str]) -> bool:
    return mime in allowed or any(alias in allowed for alias in MIME_ALIASES.get(mime, ()))


# ------------------------------------------------------------------------------- names

def sanitize_filename(name: str | None, mime: str) -> str:
    """A display name safe to store and to echo in Content-Disposition."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C" and ch not in '<>:"|?*')
    name = re.sub(r"\s+", " ", name).strip().lstrip(".").strip()
    if not name:
        name = "upload" + extension_for(mime)
    if len(name) > MAX_FILENAME:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext) <= 16:
            name = stem[: MAX_FILENAME - len(ext) - 1] + "." + ext
        else:
            name = name[:MAX_FILENAME]
    return name


def normalize_declared_mime(value: str | None) -> str | None:
    if not value:
        return None
    mime = value.split(";", 1)[0].strip().lower()
    return mime if _MIME_RE.match(mime) else None


def extension_for(mime: str) -> str:
    return EXTENSIONS.get(mime) or mimetypes.guess_extension(mime) or ""


def object_key(user_id: uuid.UUID, file_id: uuid.UUID, mime: str) -> str:
    return f"{user_prefix(user_id)}{file_id}{extension_for(mime)}"


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback plus the exact UTF-8 name."""
    fallback = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode()
    fallback = re.sub(r'[^A-Za-z0-9._ ()\-\[\]]', "_", fallback).strip() or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


# ------------------------------------------------------------------------------- service

async def upload_file(session: AsyncSession, objects: ObjectStore, *, user_id: uuid.UUID,
                      stream: BinaryIO, filename: str | None, declared_mime: str | None,
                      max_bytes: int, allowed: frozenset[str]) -> UserFile:
    """Check, store and record an upload. Commits: object and row succeed or fail together."""
    result = await asyncio.to_thread(scan, stream, max_bytes)
    if result.too_large:
        raise PayloadTooLarge(f"The file exceeds the limit of {max_bytes} bytes",
                              details={"max_bytes": max_bytes})
    if result.size == 0:
        raise ValidationFailed("The uploaded file is empty",
                               details=[{"loc": ["body", "upload"], "msg": "file is empty",
                                         "type": "empty_file"}])
    declared = normalize_declared_mime(declared_mime)
    if not is_allowed(result.mime, allowed):
        raise UnsupportedMediaType(
            f"Files of type {result.mime} are not accepted",
            details={"sniffed_mime": result.mime, "declared_mime": declared,
                     "allowed": sorted(allowed)})
    await get_user(session, user_id)

    file_id = uuid.uuid4()
    key = object_key(user_id, file_id, result.mime)
    await asyncio.to_thread(stream.seek, 0)
    await objects.put(key, stream, result.size, result.mime)
    row = UserFile(id=file_id, user_id=user_id, s3_key=key,
                   filename=sanitize_filename(filename, result.mime), mime=result.mime,
                   declared_mime=declared, size_bytes=result.size, sha256=result.sha256)
    try:
        session.add(row)
        await session.flush()
        await session.commit()
    except BaseException:
        await _discard(objects, key)
        raise
    return row


async def _discard(objects: ObjectStore, key: str) -> None:
    try:
        await asyncio.shield(objects.delete(key))
    except Exception:  # noqa: BLE001 - the original error matters more; log the orphan
        log.error("could not remove object %s after a failed upload", key)


async def get_file(session: AsyncSession, principal: Principal, file_id: uuid.UUID) -> UserFile:
    row = await session.get(UserFile, file_id)
    if row is None:
        raise NotFound("Unknown file", details={"file_id": str(file_id)})
    principal.ensure_owner(row.user_id, "file")
    return row


async def list_files(session: AsyncSession, *, user_id: uuid.UUID, limit: int,
                     offset: int) -> tuple[list[UserFile], int]:
    await get_user(session, user_id)
    condition = UserFile.user_id == user_id
    total = await session.scalar(select(func.count()).select_from(UserFile).where(condition))
    rows = await session.scalars(select(UserFile).where(condition)
                                 .order_by(UserFile.uploaded_at.desc(), UserFile.id)
                                 .limit(limit).offset(offset))
    return list(rows), total or 0


@dataclass
class Download:
    """Either a URL to redirect to (S3) or the bytes to stream (local store)."""
    row: UserFile
    disposition: str
    url: str | None = None
    chunks: AsyncIterator[bytes] | None = None


async def open_download(objects: ObjectStore, row: UserFile) -> Download:
    disposition = content_disposition(row.filename)
    if not await objects.exists(row.s3_key):
        raise NotFound("The stored content of this file is missing", code="object_not_found",
                       details={"file_id": str(row.id)})
    url = await objects.presigned_url(row.s3_key, content_type=row.mime,
                                      content_disposition=disposition)
    if url is not None:
        return Download(row=row, disposition=disposition, url=url)
    return Download(row=row, disposition=disposition, chunks=await objects.open(row.s3_key))


async def delete_file(session: AsyncSession, objects: ObjectStore, principal: Principal,
                      file_id: uuid.UUID) -> None:
    """Row first (flushed, not yet committed), then the object: if the object store fails the
    row is rolled back and the call can be retried; deleting a missing object is a no-op."""
    row = await get_file(session, principal, file_id)
    await session.delete(row)
    await session.flush()
    await objects.delete(row.s3_key)
