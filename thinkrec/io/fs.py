"""URIs -> filesystems. The one place that knows about local paths, file:// and s3://.

Credentials for S3 are never passed here: pyarrow and boto3 both read the standard AWS chain
(environment, shared profile, IRSA web identity on Kubernetes). Only the endpoint and region,
which are not secrets, come from config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Storage:
    """Resolves URIs under one output root. Picklable, so Ray tasks and actors can carry it."""

    root: str
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"

    @classmethod
    def from_config(cls, cfg: Any) -> Storage:
        s = cfg.storage
        return cls(root=s.output_root, s3_endpoint=s.s3_endpoint, s3_region=s.s3_region)

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    def fs(self, uri: str | None = None) -> tuple[pafs.FileSystem, str]:
        return filesystem(uri or self.root, self.s3_endpoint, self.s3_region)

    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri).decode())

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Publish a small object atomically: tmp + rename locally, one PUT on S3."""
        fs, path = self.fs(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def delete(self, uri: str) -> None:
        fs, path = self.fs(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    def relative(self, uri: str) -> str:
        """``uri`` relative to the output root (unchanged when outside it), so that hashes of what a
        stage read stay the same when a whole run directory is moved or copied."""
        root = self.root.rstrip("/") + "/"
        return uri[len(root) :] if uri.startswith(root) else uri

    def copy_tree(self, src: str, dst: str, last: str = "_SUCCESS") -> int:
        """Copy every file under ``src`` to ``dst`` (each a local path or a URI in this store), files
        named ``last`` after all others: a copy cut short never shows a ``_SUCCESS`` over missing
        files. Returns the number of files copied."""
        fs, src_path = self.fs(src)
        dst_fs, dst_path = self.fs(dst)
        infos = fs.get_file_info(pafs.FileSelector(src_path, recursive=True))
        files = sorted(
            (i.path for i in infos if i.type == pafs.FileType.File),
            key=lambda p: (os.path.basename(p) == last, p),
        )
        for path in files:
            rel = os.path.relpath(path, src_path)
            target = f"{dst_path}/{rel}"
            if isinstance(dst_fs, pafs.LocalFileSystem):
                os.makedirs(os.path.dirname(target), exist_ok=True)
            pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=dst_fs)
        return len(files)

    def local_path(self, uri: str) -> str | None:
        """The local path of a local URI, None for object stores."""
        fs, path = self.fs(uri)
        return path if isinstance(fs, pafs.LocalFileSystem) else None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(root: str, *parts: str) -> str:
    out = root.rstrip("/")
    for p in parts:
        if p:
            out = f"{out}/{p.strip('/')}"
    return out


def filesystem(
    uri: str, s3_endpoint: str | None = None, s3_region: str = "us-east-1"
) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI. Local paths are made absolute."""
    if is_s3(uri):
        scheme = "https"
        endpoint = s3_endpoint
        if endpoint and "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme=scheme,
            region=s3_region,
            allow_bucket_creation=False,
            check_directory_existence_before_creation=False,
        )
        return fs, uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def boto3_client(s3_endpoint: str | None = None, s3_region: str = "us-east-1") -> Any:
    """A boto3 S3 client on the standard credential chain, with the same endpoint override."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name=s3_region)
