"""User files (SPEC §4.3): upload, list, metadata, download, delete."""
from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.datastructures import UploadFile

from api.deps import CurrentPrincipal, Ctx, Session
from api.envelope import Envelope, ErrorEnvelope, Page
from api.schemas_common import Limit, Model, Offset
from core.errors import ValidationFailed
from services import files

router = APIRouter(tags=["files"])

UPLOAD_FIELD = "upload"
# Extra bytes the request body may carry on top of the file itself (multipart framing and
# headers); the exact file size limit is enforced while the upload is scanned.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class UserFileOut(Model):
    id: uuid.UUID
    user_id: uuid.UUID
    filename: str
    mime: str
    declared_mime: str | None
    size_bytes: int
    sha256: str
    uploaded_at: datetime


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [UPLOAD_FIELD],
            "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary",
                                          "description": "The file"}},
        }}},
    }
}


def _missing_upload(msg: str = "Field required", type_: str = "missing") -> ValidationFailed:
    return ValidationFailed("The request is not valid",
                            details=[{"loc": ["body", UPLOAD_FIELD], "msg": msg, "type": type_}])


@router.post(
    "/uploadUserFile", operation_id="uploadUserFile", status_code=status.HTTP_201_CREATED,
    response_model=Envelope[UserFileOut], openapi_extra=_UPLOAD_BODY,
    responses={400: {"model": ErrorEnvelope, "description": "Malformed multipart body"},
               413: {"model": ErrorEnvelope, "description": "File larger than the configured limit"},
               415: {"model": ErrorEnvelope,
                     "description": "File type (sniffed from the content) not allowed"}},
    summary="Upload a file for a user (multipart field `upload`)")
async def upload_user_file(user_id: uuid.UUID, request: Request, session: Session,
                           principal: CurrentPrincipal, ctx: Ctx):
    principal.ensure_user(user_id)
    # The body is read only now, after authentication: callers without a valid token are
    # turned away before their upload is spooled anywhere.
    async with request.form(max_files=1, max_fields=8, max_part_size=64 * 1024) as form:
        uploads = form.getlist(UPLOAD_FIELD)
        if not uploads:
            raise _missing_upload()
        upload = uploads[0]
        if len(uploads) > 1 or not isinstance(upload, UploadFile):
            raise _missing_upload("Expected exactly one file", "file_expected")
        row = await files.upload_file(
            session, ctx.objects, user_id=user_id, stream=upload.file, filename=upload.filename,
            declared_mime=upload.content_type, max_bytes=ctx.settings.max_upload_bytes,
            allowed=ctx.settings.allowed_mime_set())
    return Envelope(data=UserFileOut.model_validate(row))


@router.get("/listUserFiles", operation_id="listUserFiles",
            response_model=Envelope[Page[UserFileOut]], summary="A user's files, newest first")
async def list_user_files(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal,
                          limit: Limit = 50, offset: Offset = 0):
    principal.ensure_user(user_id)
    rows, total = await files.list_files(session, user_id=user_id, limit=limit, offset=offset)
    return Envelope(data=Page(items=[UserFileOut.model_validate(r) for r in rows], total=total,
                              limit=limit, offset=offset))


@router.get("/getUserFile", operation_id="getUserFile", response_model=Envelope[UserFileOut],
            summary="A file's metadata")
async def get_user_file(file_id: uuid.UUID, session: Session, principal: CurrentPrincipal):
    row = await files.get_file(session, principal, file_id)
    return Envelope(data=UserFileOut.model_validate(row))


@router.get(
    "/downloadUserFile", operation_id="downloadUserFile", response_class=Response,
    responses={200: {"description": "The file's bytes",
                     "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                         "format": "binary"}}}},
               307: {"description": "Redirect to a short-lived presigned URL (S3 object store)"}},
    summary="Download a file: its bytes, or a redirect to a presigned URL on S3")
async def download_user_file(file_id: uuid.UUID, session: Session, principal: CurrentPrincipal,
                             ctx: Ctx):
    row = await files.get_file(session, principal, file_id)
    download = await files.open_download(ctx.objects, row)
    if download.url is not None:
        return RedirectResponse(download.url, status_code=status.HTTP_307_TEMPORARY_REDIRECT,
                                headers={"Cache-Control": "no-store"})
    return StreamingResponse(
        download.chunks,
        headers={"Content-Type": row.mime, "Content-Disposition": download.disposition,
                 "Content-Length": str(row.size_bytes), "ETag": f'"{row.sha256}"',
                 "X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store"})


@router.delete("/deleteUserFile", operation_id="deleteUserFile",
               status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               summary="Delete a file: its row and its stored object")
async def delete_user_file(file_id: uuid.UUID, session: Session, principal: CurrentPrincipal,
                           ctx: Ctx):
    await files.delete_file(session, ctx.objects, principal, file_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
