"""Where a run's state lives: a local folder or a filesystem URI (`s3://…`, `gs://…`, any pyarrow one).

`run.storage` is either a local path or a URI, as Ray Train's `RunConfig(storage_path)` accepts: Ray
writes the checkpoints there, and every piece of scalelab that reads them back (the newest complete
checkpoint, `failure.json`, sweep state, export) goes through the few operations below. A location
is kept as the caller gave it: a `Path` (or path string) stays a local path, handled by the standard
library exactly as before; a URI stays a string, resolved with `pyarrow.fs.FileSystem.from_uri` — Ray
Train's own choice, so both read the same bucket the same way.

Credentials never appear in a location: pyarrow takes S3 keys from the environment (or the instance
role) like boto3 does. A custom endpoint (an S3-protocol server such as MinIO, or moto in the tests)
comes from `AWS_ENDPOINT_URL` or from the URI's query, `s3://bucket/path?endpoint_override=host:port&
scheme=http`; `join` keeps that query at the end of every path built from the root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["Location", "artifact_uri", "delete", "describe", "download", "exists", "is_dir", "is_file",
           "is_uri", "join", "list_dir", "list_files", "local_copy", "name", "read_text", "resolve",
           "write_text"]

Location = str | Path  # a local path, or a filesystem URI (a string with "://")


def is_uri(location: Location) -> bool:
    """Whether `location` names a filesystem URI rather than a local path."""
    return isinstance(location, str) and "://" in location


def join(location: Location, *parts: str) -> Location:
    """`location / parts…`: a Path for a local location; for a URI, the parts go before its query."""
    if not is_uri(location):
        return Path(location).joinpath(*parts)
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def name(location: Location) -> str:
    """The last path component (`step_00000012` of `s3://b/runs/x/step_00000012?…`)."""
    if not is_uri(location):
        return Path(location).name
    return urlsplit(str(location)).path.rstrip("/").rsplit("/", 1)[-1]


def describe(location: Location) -> str:
    """The location for messages: a URI without its query (which may carry endpoint settings)."""
    return str(location).partition("?")[0] if is_uri(location) else str(location)


def artifact_uri(location: Location) -> str:
    """The URI MLflow's artifact stores understand: a local folder as `file://…`, a URI without its
    query (MLflow's S3 store takes its endpoint from `MLFLOW_S3_ENDPOINT_URL` / `AWS_ENDPOINT_URL`)."""
    if is_uri(location):
        return describe(location)
    return Path(location).expanduser().resolve().as_uri()


def resolve(location: Location):  # -> tuple[pyarrow.fs.FileSystem, str]
    """(filesystem, path on it) of a URI, as Ray Train resolves its storage path."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(str(location))


def _info(location: Location):
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: Location) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    import pyarrow.fs

    return _info(location).type != pyarrow.fs.FileType.NotFound


def is_file(location: Location) -> bool:
    if not is_uri(location):
        return Path(location).is_file()
    import pyarrow.fs

    return _info(location).type == pyarrow.fs.FileType.File


def is_dir(location: Location) -> bool:
    """A folder; on an object store, any prefix that holds objects."""
    if not is_uri(location):
        return Path(location).is_dir()
    import pyarrow.fs

    return _info(location).type == pyarrow.fs.FileType.Directory


def list_dir(location: Location) -> list[str]:
    """Names of the entries directly under `location` (files and folders); [] when it does not exist."""
    if not is_uri(location):
        folder = Path(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    import pyarrow.fs

    fs, path = resolve(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def list_files(location: Location) -> set[str]:
    """Relative paths (`a/b.pt`) of every file below `location`: one listing, however deep (on an
    object store a recursive listing is a few LIST requests, where a walk would be one per folder)."""
    if not is_uri(location):
        root = Path(location)
        files = root.rglob("*") if root.is_dir() else ()
        return {p.relative_to(root).as_posix() for p in files if p.is_file()}
    import pyarrow.fs

    fs, path = resolve(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = path.rstrip("/") + "/"
    return {i.path.removeprefix(prefix) for i in infos if i.type == pyarrow.fs.FileType.File}


def read_text(location: Location) -> str:
    """A small text file's content; FileNotFoundError naming it when missing."""
    if not is_uri(location):
        return Path(location).read_text()
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"{describe(location)}: no such file") from None


def write_text(location: Location, text: str) -> None:
    """Write a small text file whole: a reader never sees half of it (locally a rename; an object
    store's PUT replaces an object at once)."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def delete(location: Location) -> None:
    """Remove a file if it is there."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = resolve(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def download(location: Location, local: str | Path) -> Path:
    """Copy the folder `location` (all of it) into the local folder `local`; returns `local`."""
    import pyarrow.fs

    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    if not is_uri(location):
        shutil.copytree(location, local, dirs_exist_ok=True)
        return local
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{describe(location)}: no such folder")
    pyarrow.fs.copy_files(path, str(local), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


@contextlib.contextmanager
def local_copy(location: Location, prefix: str = "scalelab-") -> Iterator[Path]:
    """A local folder with `location`'s content: the folder itself when it is local (no copy), else a
    temporary download removed afterwards (loading a checkpoint reads whole files anyway)."""
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield download(location, os.path.join(tmp, name(location) or "root"))
