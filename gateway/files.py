"""Files over HTTP (admins only), shaped like OpenAI's Files API: the way data reaches jobs
created over the API. An upload is stored as CORRAL_HOME/files/{id}/{name}, and a job names it
by its id (`"inputs": ["file-…"]`); nothing a client sends names a server path."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from broker.confine import FILE_ID, files_dir, uploaded_path
from gateway.auth import Limited, admin
from gateway.errors import APIError, InvalidRequest
from gateway.state import Gateway, GatewayDep

router = APIRouter(prefix="/v1/files", dependencies=[Depends(admin)])

_COPY_CHUNK = 1 << 20


class FileNotFound(APIError):
    status = 404

    def __init__(self) -> None:
        super().__init__("No such file.", param="file_id", code="file_not_found")


class TooLarge(APIError):
    status = 413


def _safe_name(filename: str | None) -> str:
    """The upload's base name in safe characters, keeping its suffix (readers go by it)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(filename or "upload").name).lstrip(".")[:100]
    return name or "upload"


def _file_object(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {
        "id": path.parent.name,
        "object": "file",
        "bytes": stat.st_size,
        "created_at": int(stat.st_mtime),
        "filename": path.name,
        "purpose": "corral-job",
    }


def _store(upload: UploadFile, target: Path, limit: int) -> int:
    target.parent.mkdir(parents=True, exist_ok=False)
    written = 0
    with target.open("wb") as out:
        while chunk := upload.file.read(_COPY_CHUNK):
            written += len(chunk)
            if written > limit:
                out.close()
                shutil.rmtree(target.parent, ignore_errors=True)
                raise TooLarge(
                    f"The file is larger than this server's limit of {limit} bytes.", code="file_too_large"
                )
            out.write(chunk)
    return written


@router.post("")
async def upload(request: Request, gateway: GatewayDep, _: Limited) -> dict[str, Any]:
    """multipart/form-data with `file` (and OpenAI's `purpose`, accepted and ignored)."""
    limit = gateway.settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        raise APIError("Send the upload with a Content-Length.", code="length_required")
    if int(declared) > limit + 65536:
        raise TooLarge(f"The file is over this server's limit of {limit} bytes.", code="file_too_large")
    form = await request.form(max_files=1, max_fields=4)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("multipart form field `file` is required", param="file")
        file_id = f"file-{secrets.token_hex(12)}"
        target = files_dir(gateway.settings) / file_id / _safe_name(upload.filename)
        await asyncio.to_thread(_store, upload, target, limit)
    finally:
        await form.close()
    return _file_object(target)


@router.get("")
async def list_files(gateway: GatewayDep) -> dict[str, Any]:
    def listed() -> list[dict[str, Any]]:
        root = files_dir(gateway.settings)
        found = [uploaded_path(gateway.settings, d.name) for d in root.iterdir()] if root.is_dir() else []
        return sorted((_file_object(p) for p in found if p), key=lambda f: -f["created_at"])

    return {"object": "list", "data": await asyncio.to_thread(listed)}


def _find(gateway: Gateway, file_id: str) -> Path:
    path = uploaded_path(gateway.settings, file_id) if FILE_ID.fullmatch(file_id) else None
    if path is None:
        raise FileNotFound()
    return path


@router.get("/{file_id}")
async def get_file(file_id: str, gateway: GatewayDep) -> dict[str, Any]:
    return _file_object(_find(gateway, file_id))


@router.delete("/{file_id}")
async def delete_file(file_id: str, gateway: GatewayDep) -> dict[str, Any]:
    path = _find(gateway, file_id)
    await asyncio.to_thread(shutil.rmtree, path.parent, True)
    return {"id": file_id, "object": "file", "deleted": True, "deleted_at": int(time.time())}
